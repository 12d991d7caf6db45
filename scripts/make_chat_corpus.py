#!/usr/bin/env python3
"""A deterministic synthetic chat corpus for fine-tuning the built-in model (issue 14): multi-turn GLM chats
about Jane Austen's novels, with and without reasoning, with and without tool calls, rendered through the
model's own chat template and tokenized with its own tokenizer. No download, no text but the project's.

Recipe (every choice is drawn from one seeded random.Random, so the same arguments give the same bytes):
 - Ground truth: scripts/chat_facts.py, a hand-written table of the six novels' people (95), families (22),
   marriages (27), other relations (20), homes (17) and 15 numbers the text states; and the training text of
   scripts/prepare_austen.py (DATA/train/*.txt only: DATA/val and tests/data/text/austen_heldout.txt are never
   read), cut into paragraphs (headings dropped) and sentences.
 - Items, each with a stable key; md5(key) puts 20 % of them in the held-out split, so held-out conversations
   ask facts, quote paragraphs, search words and name cities that training conversations never do:
   fact    who is whose sister / brother / father / mother / husband / wife / aunt / cousin / friend, where
           someone lives, who lives somewhere, which novel someone is in, the heroine, the author, the year;
   count   arithmetic on counts and dates: how many sisters someone has (family size - 1), differences and sums
           of the stated numbers (incomes, ages, children), years between two novels' publication;
   quote   a quotation continued (the paragraph's next sentence), "which novel is this from?" (reasoned from
           the names in it), "give me a passage from X";
   math    small sums and products; chat: greetings, thanks, who are you;
   tools   get_weather (one city or two, celsius or fahrenheit; the observation is synthetic), calculator
           (expressions from the numbers above or random), search_novels (paragraph counts and the first
           matching sentence, computed on the training text), search twice then add with the calculator (a
           three-step chain), and questions a tool is offered for but not needed.
 - Conversations: 1-4 exchanges (50/30/15/5 %), follow-up questions about the same person with a pronoun; a
   system prompt in 70 % (12 variants); tools in 35 % (1-3 of the three tools, shuffled, always those used);
   enable_thinking on in 60 %: then every assistant message gets `reasoning_content`, which the template keeps
   only after the last user message (as GLM's does); tool calls as OpenAI-style messages with dict arguments;
   tool results as role "tool" messages (JSON strings), rendered as <|observation|><tool_response>...
 - Rendering: tests/py/chat_cases.py's jinja2 environment (transformers' apply_chat_template settings) on
   MODEL/chat_template.jinja with add_generation_prompt=False; the closing <|user|> of the last reply appended
   (GLM ends a turn with the next role token: <|user|>, or <|observation|> after tool calls; both are stop ids).
 - Tokens: HF tokenizers on MODEL/tokenizer.json. Loss mask, per token, 1 where the token is a target the model
   must produce: everything an assistant turn generates after its generation prompt (<|assistant|><think> or
   <|assistant|></think>, which the prompt supplies and are 0), through the role token that closes the turn.
   mask[i] = 1 means "train on predicting ids[i] from ids[:i]".
 - Conversations longer than --max-tokens are redrawn (none are cut).

Outputs in --out (default /tmp/chat_corpus): train.npz and heldout.npz (ids uint16 [N], mask uint8 [N],
offsets int64 [C+1]: conversation c is ids[offsets[c]:offsets[c+1]], kind uint8 [C] indexing meta.json's
kinds), train.jsonl / heldout.jsonl (the conversations as messages + tools + enable_thinking), meta.json (sizes,
sha256 of the arrays). In --fixtures (default tests/data/chat, small): fixtures.json (held-out tool-use prompts
with the expected tool calls, and thinking on/off prompts, each with the rendered prompt and its token ids),
samples.txt (rendered conversations with the trained spans marked), README.md (these sizes).

Usage: python3 scripts/prepare_austen.py --out DATA
       python3 scripts/make_chat_corpus.py --data DATA [--out /tmp/chat_corpus] [--train 30000] [--heldout 1000]
Needs numpy, jinja2, tokenizers (no torch).
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "py"))
import chat_facts as F  # noqa: E402
from chat_cases import reference_env  # noqa: E402  (jinja2 configured like transformers)

KINDS = ["fact", "count", "quote", "math", "chat", "tool_weather", "tool_calc", "tool_search", "tool_chain",
         "tool_unneeded"]
HELDOUT_PERCENT = 20
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant who knows Jane Austen's novels well.",
    "You are a scholar of Jane Austen. Answer briefly and accurately.",
    "Answer in one or two sentences.",
    "You are a friendly guide to English novels of the Regency period.",
    "Be concise. If you do not know, say so.",
    "You are an assistant in a small library. Help the reader with questions about the books.",
    "You are a careful assistant. Check facts before you answer.",
    "Reply politely, as a well-read companion would.",
    "You help students who are reading Austen for the first time.",
    "Keep answers short and plain.",
    "You are trellm's built-in model, a small assistant trained on Jane Austen's six novels.",
]

CITIES = ["Bath", "London", "Portsmouth", "Brighton", "Lyme Regis", "Bristol", "Oxford", "Cambridge", "Winchester",
          "Southampton", "Exeter", "Plymouth", "Derby", "Canterbury", "York", "Edinburgh", "Dublin", "Paris", "Lisbon",
          "Naples", "Vienna", "Berlin", "Madrid", "Rome", "Boston", "New York", "Tokyo", "Cairo", "Mumbai", "Sydney",
          "Cape Town", "Toronto", "Lima", "Oslo", "Stockholm", "Amsterdam", "Brussels", "Geneva", "Venice", "Athens",
          "Weymouth", "Ramsgate", "Leicester", "Norwich", "Chester", "Durham", "Glasgow", "Cardiff", "Lincoln", "Kyoto"]
CONDITIONS = ["clear skies", "sunshine", "light rain", "heavy rain", "overcast skies", "fog", "snow", "a strong wind",
              "showers", "thunderstorms", "drizzle", "broken cloud"]
SEARCH_WORDS = ["ball", "letter", "carriage", "rain", "garden", "music", "dance", "marriage", "fortune", "walk",
                "dinner", "horse", "book", "London", "Bath", "church", "sea", "navy", "estate", "card", "pianoforte",
                "picture", "library", "weather", "shrubbery", "farm", "theatre", "Portsmouth", "Brighton", "Kent",
                "Bristol", "officer", "servant", "tea", "breakfast", "journey", "visit", "party", "friendship",
                "happiness", "pride", "prejudice", "sense", "sensibility", "persuasion", "folly", "vanity", "gratitude",
                "compliment", "umbrella", "bonnet", "gown", "cottage", "parsonage", "abbey", "novel", "poetry", "health",
                "orchard", "boat", "sailor", "uncle", "cousin", "wedding", "ring", "muslin", "soup", "apple", "storm",
                "moon", "window", "staircase", "sketch", "harp", "song", "sermon", "clergyman", "lawyer", "apothecary",
                "gooseberry", "chaise", "barouche", "curricle", "lottery", "whist", "quadrille", "ribbon", "shawl"]

TOOLS = {
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    "calculator": {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "e.g. 12 * 7"}}, "required": ["expression"]}}},
    "search_novels": {"type": "function", "function": {
        "name": "search_novels", "description": "Count the paragraphs of Jane Austen's novels that contain a word.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "a word or name"},
            "novel": {"type": "string", "description": "a novel's title; all six if omitted"}},
            "required": ["query"]}}},
}


def split_of(key):
    """'heldout' for a stable 20 % of item keys, else 'train'."""
    return "heldout" if int(hashlib.md5(key.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT else "train"


def join_names(names):
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def num(n):
    return NUM_WORDS[n] if 0 <= n < len(NUM_WORDS) else f"{n:,}"


def fmt(v):
    return f"{v:,}" if isinstance(v, int) else str(v)


# ---------------------------------------------------------------------------------------------- the facts
class Facts:
    """The fact table with its derived relations."""

    def __init__(self):
        self.p = F.PEOPLE
        self.family_of, self.parents, self.spouse, self.rel, self.home = {}, {}, {}, {}, {}
        for fam in F.FAMILIES:
            kids, father, mother, surname, complete = fam
            for k in kids:
                self.family_of.setdefault(k, fam)
                self.parents[k] = (father, mother)
        for h, w in F.MARRIAGES:
            self.spouse[h], self.spouse[w] = w, h
        for a, r, b in F.RELATIONS:
            self.rel.setdefault(b, []).append((r, a))
        for people, house, where in F.HOMES:
            for x in people:
                self.home[x] = (house, where, people)

    def novel(self, x):
        return self.p[x][0]

    def title(self, x):
        return F.NOVELS[self.p[x][0]]["title"]

    def full(self, x):
        return self.p[x][1]

    def short(self, x):
        return self.p[x][2]

    def female(self, x):
        return self.p[x][3] == "f"

    def siblings(self, x):
        fam = self.family_of.get(x)
        return [] if not fam else [k for k in fam[0] if k != x]


class Subject:
    """How a question names its subject: by name, or (in a follow-up) by pronoun."""

    def __init__(self, facts, x, pronoun):
        f = facts.female(x)
        name = facts.short(x)
        self.subj = ("she" if f else "he") if pronoun else name
        self.poss = ("her" if f else "his") if pronoun else name + "'s"
        self.obj = ("her" if f else "him") if pronoun else name
        self.pronoun = pronoun


def fact_items(facts):
    """Every fact question as (key, subject id or None, builder(rng, subject) -> (question, reasoning, answer))."""
    items = []
    P = facts

    def add(key, subject, fn):
        items.append((key, subject, fn))

    for x in P.p:
        t = P.title(x)
        sibs = P.siblings(x)
        fam = P.family_of.get(x)
        for sex, word in (("f", "sister"), ("m", "brother")):
            same = [s for s in sibs if P.p[s][3] == sex]
            if same:
                def fn(rng, s, x=x, same=same, word=word, fam=fam, t=t):
                    names = join_names(P.full(y) for y in same)
                    q = rng.choice([f"Who is {s.poss} {word}?" if len(same) == 1 else f"Who are {s.poss} {word}s?",
                                    f"Does {s.subj} have a {word}?", f"Name {s.poss} {word}s." if len(same) > 1
                                    else f"Name {s.poss} {word}."])
                    if fam[4]:
                        r = (f"{P.full(x)} is one of the {num(len(fam[0]))} {fam[3]} children in {t}: "
                             f"{join_names(P.short(k) for k in fam[0])}. Leaving {P.short(x)} out, the {word}"
                             f"{'s are' if len(same) > 1 else ' is'} {join_names(P.short(k) for k in same)}.")
                        a = ("Yes. " if q.startswith("Does") else "") + (
                            f"{P.short(x)}'s {word}{'s are' if len(same) > 1 else ' is'} {names}.")
                    else:
                        r = f"{P.full(x)} belongs to the {fam[3]} family in {t}; the novel names {names} among them."
                        a = ("Yes. " if q.startswith("Does") else "") + f"{P.short(x)} has a {word} named {names}" + (
                            "." if len(same) == 1 else ", among others.")
                    return q, r, a
                add(f"{word}:{x}", x, fn)
            elif fam and fam[4] and len(fam[0]) > 1:
                def fn(rng, s, x=x, word=word, fam=fam, t=t):
                    q = f"Does {s.subj} have a {word}?"
                    r = (f"The {fam[3]} children in {t} are {join_names(P.short(k) for k in fam[0])}; "
                         f"none of {P.short(x)}'s siblings is a {'girl' if word == 'sister' else 'boy'}.")
                    a = f"No, {P.short(x)} has no {word}. {P.short(x)}'s " + (
                        f"siblings are {join_names(P.short(k) for k in fam[0] if k != x)}." if len(fam[0]) > 2 else
                        f"only sibling is {join_names(P.full(k) for k in fam[0] if k != x)}.")
                    return q, r, a
                add(f"no{word}:{x}", x, fn)
        father, mother = P.parents.get(x, (None, None))
        for par, word in ((father, "father"), (mother, "mother")):
            if par:
                def fn(rng, s, x=x, par=par, word=word, t=t):
                    q = rng.choice([f"Who is {s.poss} {word}?"] + ([] if s.pronoun else [f"Who is the {word} of {s.obj}?"]))
                    r = f"In {t}, {P.full(x)} is the {'daughter' if P.female(x) else 'son'} of {P.full(par)}."
                    return q, r, f"{P.short(x)}'s {word} is {P.full(par)}."
                add(f"{word}:{x}", x, fn)
        if x in P.spouse:
            y = P.spouse[x]

            def fn(rng, s, x=x, y=y, t=t):
                role = "wife" if P.female(y) else "husband"
                q = rng.choice([f"Whom does {s.subj} marry?", f"Who is {s.poss} {role}?", f"Who does {s.subj} marry?"])
                r = f"In {t}, {P.full(x)} and {P.full(y)} are married by the end of the novel."
                return q, r, f"{P.short(x)}'s {role} is {P.full(y)}."
            add(f"spouse:{x}", x, fn)
        for r_, a_ in P.rel.get(x, []):
            def fn(rng, s, x=x, rel=r_, a=a_, t=t):
                q = rng.choice([f"Who is {s.poss} {rel}?"] + ([] if s.pronoun else [f"Who is the {rel} of {s.obj}?"]))
                r = f"In {t}, {P.full(a)} is {P.full(x)}'s {rel}."
                return q, r, f"{P.full(a)} is {P.short(x)}'s {rel}."
            add(f"rel:{r_}:{x}", x, fn)

            def fn2(rng, s, x=x, rel=r_, a=a_, t=t):
                q = f"What is {P.short(a)} to {P.short(x)}?"
                r = f"Both are in {t}; {P.short(a)} is {P.short(x)}'s {rel}."
                return q, r, f"{P.full(a)} is {P.full(x)}'s {rel}."
            add(f"relinv:{r_}:{a_}:{x}", None, fn2)
        if x in P.home:
            house, where, _ = P.home[x]

            def fn(rng, s, x=x, house=house, where=where, t=t):
                q = rng.choice([f"Where does {s.subj} live?", f"What is the name of {s.poss} home?"])
                r = f"In {t}, {P.full(x)} lives at {house}, {where}."
                return q, r, f"{P.short(x)} lives at {house}, {where}."
            add(f"home:{x}", x, fn)

        def fn(rng, s, x=x, t=t):
            q = rng.choice([f"In which novel does {P.full(x)} appear?", f"Which book is {P.full(x)} from?"])
            n = F.NOVELS[P.novel(x)]
            r = f"{P.full(x)} is a character of {t}, which Jane Austen published in {n['year']}."
            return q, r, f"{P.full(x)} appears in {t}."
        add(f"novel:{x}", None, fn)
    for people, house, where in F.HOMES:
        def fn(rng, s, people=people, house=house, where=where):
            t = P.title(people[0])
            q = rng.choice([f"Who lives at {house}?", f"Who lives at {house} in {t}?"])
            r = f"{house}, {where}, is the home of {join_names(P.full(k) for k in people)} in {t}."
            return q, r, f"{join_names(P.full(k) for k in people)} live{'s' if len(people) == 1 else ''} at {house}."
        add(f"house:{house}", None, fn)
    for nid, n in F.NOVELS.items():
        h = n["heroine"]

        def fn(rng, s, n=n, h=h):
            q = rng.choice([f"Who is the heroine of {n['title']}?", f"Who is the main character of {n['title']}?"])
            r = f"{n['title']} follows {P.full(h)}."
            return q, r, f"The heroine of {n['title']} is {P.full(h)}."
        add(f"heroine:{nid}", None, fn)

        def fn(rng, s, n=n):
            q = rng.choice([f"Who wrote {n['title']}?", f"When was {n['title']} published?"])
            r = f"{n['title']} is one of Jane Austen's six novels; it was published in {n['year']}."
            return q, r, f"Jane Austen wrote {n['title']}; it was published in {n['year']}."
        add(f"book:{nid}", None, fn)
    return items


def count_items(facts):
    """Arithmetic on counts and dates, as (key, subject, builder)."""
    P, items = facts, []
    for x in P.p:
        fam = P.family_of.get(x)
        if not fam or not fam[4] or len(fam[0]) < 2:
            continue
        for sex, word in (("f", "sister"), ("m", "brother")):
            same = [k for k in fam[0] if P.p[k][3] == sex and k != x]
            total = [k for k in fam[0] if P.p[k][3] == sex]

            def fn(rng, s, x=x, fam=fam, same=same, total=total, word=word, sex=sex):
                q = f"How many {word}s does {s.subj} have?"
                kind = ("daughter" if sex == "f" else "son") + ("" if len(total) == 1 else "s")
                is_ = P.p[x][3] == sex
                r = (f"The {fam[3]} family in {P.title(x)} has {num(len(total))} {kind}"
                     + (f": {join_names(P.short(k) for k in total)}" if total else "") + ". "
                     + (f"{P.short(x)} is one of them, so {len(total)} - 1 = {len(same)}." if is_ else
                        f"{P.short(x)} is not one of them, so the answer is {len(same)}."))
                a = f"{P.short(x)} has {num(len(same))} {word}{'' if len(same) == 1 else 's'}" + (
                    f": {join_names(P.short(k) for k in same)}." if same else ".")
                return q, r, a
            items.append((f"count:{word}:{x}", x, fn))
    nums = {k: (subj, v, unit, phrase) for k, subj, v, unit, phrase in F.NUMBERS}
    for k, (subj, v, unit, phrase) in nums.items():
        def fn(rng, s, subj=subj, v=v, unit=unit, phrase=phrase):
            q = f"What is {subj}?" if unit else f"How many {subj} are there?"
            r = f"The text says: \"{phrase}\". That is {fmt(v)}{' ' + unit if unit else ''}."
            return q, r, f"{subj[0].upper() + subj[1:]}: {fmt(v)}{' ' + unit if unit else ''}."
        items.append((f"number:{k}", None, fn))
    keys = [k for k in nums if k != "taylor_years"]
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if nums[a][2] != nums[b][2]:
                continue
            hi, lo = (a, b) if nums[a][1] >= nums[b][1] else (b, a)
            (sh, vh, unit, ph), (sl, vl, _, pl) = nums[hi], nums[lo]

            def fn(rng, s, sh=sh, vh=vh, ph=ph, sl=sl, vl=vl, pl=pl, unit=unit):
                u = " " + unit if unit else ""
                Sh = sh[0].upper() + sh[1:]
                if rng.random() < 0.5 and vh != vl:
                    q = f"How much greater is {sh} than {sl}?" if unit else f"How many more {sh} are there than {sl}?"
                    r = f"{Sh}: \"{ph}\", so {fmt(vh)}. {sl[0].upper() + sl[1:]}: \"{pl}\", so {fmt(vl)}. {vh} - {vl} = {vh - vl}."
                    a_ = (f"{Sh} is {fmt(vh)}{u} and {sl} {fmt(vl)}{u}: the difference is {fmt(vh - vl)}{u}." if unit else
                          f"There are {fmt(vh)} {sh} and {fmt(vl)} {sl}, so {fmt(vh - vl)} more.")
                else:
                    q = f"What is {sh} plus {sl}?" if unit else f"How many {sh} and {sl} are there together?"
                    r = f"{Sh}: {fmt(vh)}. {sl[0].upper() + sl[1:]}: {fmt(vl)}. {vh} + {vl} = {vh + vl}."
                    a_ = (f"{Sh} ({fmt(vh)}) plus {sl} ({fmt(vl)}) makes {fmt(vh + vl)}{u}." if unit else
                          f"{fmt(vh)} {sh} and {fmt(vl)} {sl} make {fmt(vh + vl)} together.")
                return q, r, a_
            items.append((f"arith:{a}:{b}", None, fn))
    nov = list(F.NOVELS.values())
    for i, a in enumerate(nov):
        for b in nov[i + 1:]:
            def fn(rng, s, a=a, b=b):
                q = rng.choice([f"How many years after {a['title']} was {b['title']} published?",
                                f"How many years passed between {a['title']} and {b['title']}?"])
                r = f"{a['title']} came out in {a['year']}, {b['title']} in {b['year']}. {b['year']} - {a['year']} = {b['year'] - a['year']}."
                d = b["year"] - a["year"]
                a_ = (f"{num(d).capitalize()} year{'' if d == 1 else 's'}: {a['title']} in {a['year']}, {b['title']} in {b['year']}."
                      if d else f"None: both were published in {a['year']}.")
                return q, r, a_
            items.append((f"years:{a['title']}:{b['title']}", None, fn))

    def fn(rng, s):
        q = "Emma is nearly twenty-one and Miss Taylor was with the Woodhouses sixteen years. How old was Emma when Miss Taylor came?"
        return q, "21 - 16 = 5.", "Emma was about five years old when Miss Taylor came to Hartfield."
    items.append(("special:taylor", None, fn))

    def fn(rng, s):
        q = "Anne Elliot is twenty-seven, and her engagement to Wentworth was eight years earlier. How old was she then?"
        return q, "27 - 8 = 19.", "Anne was nineteen when she was engaged to Captain Wentworth."
    items.append(("special:anne", None, fn))
    return items


# ---------------------------------------------------------------------------------------------- the text
SENT_SPLIT = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bCol\.)(?<=[.!?])\s+(?=[\"A-Z])")


def load_paragraphs(data):
    """{novel: [paragraph, ...]} from DATA/train (headings and very short lines dropped)."""
    out = {}
    for nid in F.NOVELS:
        path = os.path.join(data, "train", nid + ".txt")
        text = open(path, encoding="utf-8").read()
        paras = [p.strip() for p in text.split("\n\n")]
        out[nid] = [p for p in paras if len(p) >= 40 and not p.isupper()]
    return out


class Corpus:
    def __init__(self, paras):
        self.paras = paras
        self.cache = {}

    def search(self, word, novel=None):
        """(number of paragraphs containing the word, first such sentence) in one novel or all."""
        key = (word, novel)
        if key not in self.cache:
            flags = 0 if word[0].isupper() else re.IGNORECASE
            pat = re.compile(r"\b" + re.escape(word) + r"\b", flags)
            n, first = 0, None
            for nid in ([novel] if novel else list(F.NOVELS)):
                for p in self.paras[nid]:
                    if pat.search(p):
                        n += 1
                        if first is None:
                            first = next((s for s in SENT_SPLIT.split(p) if pat.search(s)), p)
            if first and len(first) > 220:
                first = first[:217].rsplit(" ", 1)[0] + "..."
            self.cache[key] = (n, first)
        return self.cache[key]


def quoted(s):
    """A quotation in double quotes (a dialogue line's own quote marks dropped)."""
    return '"' + s.strip('"') + '"'


def quote_items(corpus):
    """Paragraph-based items: (key, novel, paragraph index)."""
    items = []
    for nid, paras in corpus.paras.items():
        for i, p in enumerate(paras):
            if 60 <= len(p) <= 900:
                items.append((f"quote:{nid}:{i}", nid, i))
    return items


def quote_builder(corpus, rng, nid, i):
    p = corpus.paras[nid][i]
    t = F.NOVELS[nid]["title"]
    sents = SENT_SPLIT.split(p)
    mode = rng.random()
    if len(sents) >= 2 and mode < 0.45:
        start = sents[0]
        if not 20 <= len(start) <= 240:
            return None
        cont = sents[1]
        if len(cont) > 280:
            cont = cont[:277].rsplit(" ", 1)[0] + "..."
        qs = quoted(start)
        q = rng.choice([f"Continue this passage from {t}: {qs}", f"How does this line from {t} go on? {qs}",
                        f"What comes after {qs} in {t}?", f"Finish the quotation: {qs}"])
        r = rng.choice([f"The line is from {t}. The next sentence of the passage follows it.",
                        f"This is {t}. I will give the sentence that comes next.",
                        f"A passage of {t}; it continues with one more sentence."])
        return q, r, cont
    if mode < 0.75:
        marks = [m for m in F.MARKERS[nid] if re.search(r"\b" + re.escape(m) + r"\b", p)]
        if not marks:
            return None
        s = next((s for s in sents if marks[0] in s), sents[0])
        if len(s) > 300:
            return None
        q = rng.choice([f"Which novel is this passage from? {quoted(s)}", f"Which Austen novel has this line: {quoted(s)}",
                        f"Where is this from? {quoted(s)}"])
        r = f"The passage names {marks[0]}, who belongs to {t}." if marks[0][0].isupper() else f"It mentions {marks[0]}."
        if marks[0] in ("Longbourn", "Netherfield", "Pemberley", "Meryton", "Rosings", "Norland", "Highbury", "Hartfield",
                        "Mansfield", "Sotherton", "Northanger", "Fullerton", "Kellynch", "Uppercross"):
            r = f"The passage mentions {marks[0]}, a place in {t}."
        return q, r, f"It is from {t}."
    if len(p) > 520:
        return None
    word = rng.choice([w for w in SEARCH_WORDS if re.search(r"\b" + w + r"\b", p, re.I)] or [None])
    if word:
        q = rng.choice([f"Give me a passage from {t} that mentions {word}.", f"Quote something from {t} about {word}."])
        r = f"The user wants a passage of {t} with the word \"{word}\". I will quote one paragraph."
    else:
        q = rng.choice([f"Give me a short passage from {t}.", f"Quote a paragraph of {t}.",
                        f"Write a few lines in the style of {t}."])
        r = f"I will quote one paragraph of {t}."
    return q, r, p


# ---------------------------------------------------------------------------------------------- conversations
def call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


class Generator:
    def __init__(self, facts, corpus, split, seed):
        self.rng = random.Random(seed)
        self.facts, self.corpus, self.split = facts, corpus, split
        keep = lambda items: [it for it in items if split_of(it[0]) == split]  # noqa: E731
        self.fact = keep(fact_items(facts))
        self.count = keep(count_items(facts))
        self.quote = keep(quote_items(corpus))
        self.cities = [c for c in CITIES if split_of("city:" + c) == split]
        self.words = [w for w in SEARCH_WORDS if split_of("search:" + w) == split]
        self.asked = set()

    # One exchange: (kind, [messages after the user's], user text, reasoning per assistant message)
    def qa(self, items, kind, follow=None):
        """A question from `items`; after a question about a person, often a follow-up about them by pronoun."""
        rng = self.rng
        about = [it for it in items if follow and it[1] == follow and it[0] not in self.asked]
        if about and rng.random() < 0.6:
            key, subj, fn = rng.choice(about)
            self.asked.add(key)
            q, r, a = fn(rng, Subject(self.facts, subj, True))
            if rng.random() < 0.5:
                q = "And " + q[0].lower() + q[1:]
            return kind, q, [(r, a, None)], subj
        key, subj, fn = rng.choice(items)
        while key in self.asked:
            key, subj, fn = rng.choice(items)
        self.asked.add(key)
        q, r, a = fn(rng, Subject(self.facts, subj, False) if subj else None)
        if kind == "tool_unneeded":
            r = "No tool is needed for this. " + r
        return kind, q, [(r, a, None)], subj

    def quote_qa(self):
        while True:
            key, nid, i = self.rng.choice(self.quote)
            out = quote_builder(self.corpus, self.rng, nid, i)
            if out:
                q, r, a = out
                return "quote", q, [(r, a, None)], None

    def math_qa(self):
        rng = self.rng
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        v = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        q = rng.choice([f"What is {a} {op} {b}?", f"What is {a} {word} {b}?", f"Compute {a} {op} {b}."])
        return "math", q, [(f"{a} {op} {b} = {v}.", f"{a} {op} {b} = {v}.", None)], None

    def chat_qa(self, turn):
        rng = self.rng
        if turn == 0:
            q = rng.choice(["Hello!", "Hi there.", "Good morning!", "Who are you?", "What can you do?", "Hello, who am I talking to?"])
            r = "A greeting; I should introduce myself and say what I can help with."
            a = rng.choice(["Good day! I know Jane Austen's six novels: who is related to whom, where people live, "
                            "how a passage goes on. Ask me anything about them.",
                            "Hello! I am a small assistant trained on Jane Austen's novels. I can answer questions "
                            "about their people and quote their passages.",
                            "Good morning! Ask me about Emma, Persuasion, Pride and Prejudice or the other novels, "
                            "and I will do my best."])
        else:
            q = rng.choice(["Thank you!", "Thanks, that helps.", "Lovely, thank you.", "Great, thanks!"])
            r = "The user thanks me; a short reply is enough."
            a = rng.choice(["You are very welcome.", "My pleasure. Ask me anything else about the novels.",
                            "Happy to help!", "Not at all. Is there anything more you would like to know?"])
        return "chat", q, [(r, a, None)], None

    def weather_qa(self):
        rng = self.rng
        n = 1 if rng.random() < 0.7 else 2
        cities = rng.sample(self.cities, n)
        unit = "fahrenheit" if rng.random() < 0.25 else "celsius"
        sym = "°F" if unit == "fahrenheit" else "°C"
        obs = []
        for c in cities:
            t = rng.randint(-5, 32)
            if unit == "fahrenheit":
                t = round(t * 9 / 5 + 32)
            obs.append({"city": c, "temperature": t, "unit": unit, "conditions": rng.choice(CONDITIONS),
                        "humidity": rng.randint(30, 98)})
        fahr = " in fahrenheit" if unit == "fahrenheit" else ""
        if n == 1:
            c = cities[0]
            q = rng.choice([f"What is the weather in {c}?", f"Is it raining in {c}?", f"How warm is it in {c}{fahr}?",
                            f"What's the weather like in {c} today{fahr}?", f"Check the weather in {c}{fahr}, please."])
            if unit == "fahrenheit" and "fahrenheit" not in q:
                q = q.rstrip("?.") + ", in fahrenheit?"
        else:
            q = rng.choice([f"Compare the weather in {cities[0]} and {cities[1]}{fahr}.",
                            f"Which is warmer now, {cities[0]} or {cities[1]}?{' Use fahrenheit.' if fahr else ''}",
                            f"What is the weather in {cities[0]} and in {cities[1]}{fahr}?"])
        calls = [call("get_weather", {"city": c, **({"unit": unit} if unit == "fahrenheit" else {})}) for c in cities]
        r1 = f"The user asks about the weather in {join_names(cities)}. I will call get_weather" + (
            " once for each city." if n == 2 else ".")
        desc = [f"{o['city']} has {o['temperature']} {sym} and {o['conditions']}" for o in obs]
        if n == 1:
            o = obs[0]
            r2 = f"The tool says {o['temperature']} {sym}, {o['conditions']}, humidity {o['humidity']} %."
            a = rng.choice([f"In {o['city']} it is {o['temperature']} {sym} with {o['conditions']}.",
                            f"It is {o['temperature']} {sym} in {o['city']} just now, with {o['conditions']} "
                            f"and {o['humidity']} % humidity."])
        else:
            a0, a1 = obs
            d = a0["temperature"] - a1["temperature"]
            r2 = f"{desc[0]}; {desc[1]}. {a0['temperature']} - {a1['temperature']} = {d}."
            if d == 0:
                a = f"{desc[0]}, and {desc[1]}: both are equally warm."
            else:
                w = a0["city"] if d > 0 else a1["city"]
                a = f"{desc[0]}, and {desc[1]}, so {w} is warmer by {abs(d)} degrees."
        steps = [(r1, "", calls), (r2, a, None)]
        return "tool_weather", q, steps, [[json.dumps(o, ensure_ascii=False) for o in obs]], ["get_weather"]

    def calc_qa(self):
        rng = self.rng
        if rng.random() < 0.5:
            k, subj, v, unit, phrase = rng.choice([n for n in F.NUMBERS if n[3] == "pounds a year"])
            yrs = rng.randint(2, 12)
            q = f"{subj[0].upper() + subj[1:]} is {fmt(v)} {unit}. How much is that over {yrs} years? Use the calculator."
            expr, val = f"{v} * {yrs}", v * yrs
            a = f"Over {yrs} years that comes to {fmt(val)} pounds."
        else:
            a_, b_ = rng.randint(11, 9999), rng.randint(2, 999)
            op = rng.choice(["+", "-", "*", "/"])
            if op == "/":
                a_ = a_ - a_ % b_ + b_
            expr = f"{a_} {op} {b_}"
            val = {"+": a_ + b_, "-": a_ - b_, "*": a_ * b_, "/": a_ // b_}[op]
            q = rng.choice([f"What is {expr}?", f"Please calculate {expr}.", f"Can you work out {expr} for me?"])
            a = f"{expr} = {fmt(val)}."
        r1 = f"This needs arithmetic: I will ask the calculator for {expr}."
        r2 = f"The calculator returned {val}."
        steps = [(r1, "", [call("calculator", {"expression": expr})]), (r2, a, None)]
        return "tool_calc", q, steps, [[json.dumps({"result": val})]], ["calculator"]

    def search_args(self, word, novel):
        n, first = self.corpus.search(word, novel)
        title = F.NOVELS[novel]["title"] if novel else None
        args = {"query": word, **({"novel": title} if title else {})}
        res = {"query": word, "novel": title or "all six novels", "paragraphs": n}
        if first:
            res["first_match"] = first
        return args, res

    def search_qa(self):
        rng = self.rng
        word = rng.choice(self.words)
        novel = rng.choice(list(F.NOVELS)) if rng.random() < 0.6 else None
        args, res = self.search_args(word, novel)
        where = res["novel"]
        q = rng.choice([f"How many paragraphs of {where} mention \"{word}\"?", f"Search {where} for \"{word}\".",
                        f"Does the word \"{word}\" appear in {where}?"])
        r1 = f"I will search {where} for \"{word}\" with search_novels."
        n = res["paragraphs"]
        r2 = f"The search found {n} paragraph{'' if n == 1 else 's'}."
        if n:
            a = f"\"{word}\" appears in {fmt(n)} paragraph{'' if n == 1 else 's'} of {where}. The first: \"{res['first_match']}\""
        else:
            a = f"No: \"{word}\" does not appear in {where}."
        steps = [(r1, "", [call("search_novels", args)]), (r2, a, None)]
        return "tool_search", q, steps, [[json.dumps(res, ensure_ascii=False)]], ["search_novels"]

    def chain_qa(self):
        rng = self.rng
        word = rng.choice(self.words)
        na, nb = rng.sample(list(F.NOVELS), 2)
        (aa, ra), (ab, rb) = self.search_args(word, na), self.search_args(word, nb)
        ta, tb = ra["novel"], rb["novel"]
        q = rng.choice([f"How many paragraphs mention \"{word}\" in {ta} and {tb} together?",
                        f"Count the paragraphs with \"{word}\" in {ta} and in {tb}, and add them up."])
        r1 = "Two searches, one per novel, then the sum."
        expr = f"{ra['paragraphs']} + {rb['paragraphs']}"
        r2 = f"{ta}: {ra['paragraphs']}, {tb}: {rb['paragraphs']}. Now the calculator for {expr}."
        total = ra["paragraphs"] + rb["paragraphs"]
        r3 = f"The calculator returned {total}."
        a = f"\"{word}\" appears in {ra['paragraphs']} paragraphs of {ta} and {rb['paragraphs']} of {tb}: {total} in all."
        steps = [(r1, "", [call("search_novels", aa), call("search_novels", ab)]),
                 (r2, "", [call("calculator", {"expression": expr})]), (r3, a, None)]
        obs = [[json.dumps(ra, ensure_ascii=False), json.dumps(rb, ensure_ascii=False)], [json.dumps({"result": total})]]
        return "tool_chain", q, steps, obs, ["search_novels", "calculator"]

    def exchange(self, turn, tools_on, follow):
        """One user question and the assistant's steps: dict(kind, q, steps=[(reasoning, content, calls)],
        obs=[[tool result, ...] per step with calls], tools=[names used], subj=person asked about)."""
        rng = self.rng
        x = rng.random()
        if tools_on and x < 0.74:
            fn = self.weather_qa if x < 0.25 else self.calc_qa if x < 0.42 else self.search_qa if x < 0.62 else self.chain_qa
            kind, q, steps, obs, names = fn()
            return {"kind": kind, "q": q, "steps": steps, "obs": obs, "tools": names, "subj": None}
        if tools_on:
            kind, q, steps, subj = self.qa(self.fact, "tool_unneeded", follow)
        elif x < 0.40:
            kind, q, steps, subj = self.qa(self.fact, "fact", follow)
        elif x < 0.58:
            kind, q, steps, subj = self.qa(self.count, "count", follow)
        elif x < 0.86:
            kind, q, steps, subj = self.quote_qa()
        elif x < 0.93:
            kind, q, steps, subj = self.math_qa()
        else:
            kind, q, steps, subj = self.chat_qa(turn)
        return {"kind": kind, "q": q, "steps": steps, "obs": [], "tools": [], "subj": subj}

    def conversation(self):
        rng = self.rng
        n_ex = rng.choices([1, 2, 3, 4], [50, 30, 15, 5])[0]
        tools_on = rng.random() < 0.35
        thinking = rng.random() < 0.6
        msgs, kinds, used, follow = [], [], set(), None
        self.asked = set()
        if rng.random() < 0.7:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for turn in range(n_ex):
            ex = self.exchange(turn, tools_on, follow)
            follow = ex["subj"]
            kinds.append(ex["kind"])
            used.update(ex["tools"])
            msgs.append({"role": "user", "content": ex["q"]})
            obs = iter(ex["obs"])
            for r, content, calls in ex["steps"]:
                m = {"role": "assistant", "content": content}
                if calls and rng.random() < 0.2:
                    m["content"] = rng.choice(["Let me check.", "One moment.", "I will look that up."])
                if thinking:
                    m["reasoning_content"] = r
                if calls:
                    m["tool_calls"] = calls
                msgs.append(m)
                if calls:
                    results = next(obs)
                    assert len(results) == len(calls)
                    msgs.extend({"role": "tool", "content": res} for res in results)
        tools = None
        if tools_on:
            names = sorted(set(used) | {n for n in TOOLS if rng.random() < 0.5}) or [rng.choice(sorted(TOOLS))]
            rng.shuffle(names)
            tools = [TOOLS[n] for n in names]
        # A conversation's kind (for the statistics): its most tool-like exchange, else its first.
        tool_kinds = [k for k in kinds if k.startswith("tool_")]
        return {"messages": msgs, "tools": tools, "enable_thinking": thinking,
                "kind": max(tool_kinds, key=KINDS.index) if tool_kinds else kinds[0]}


# ---------------------------------------------------------------------------------------------- rendering
class Renderer:
    def __init__(self, model_dir):
        from tokenizers import Tokenizer
        self.tpl = reference_env().from_string(open(os.path.join(model_dir, "chat_template.jinja"), encoding="utf-8").read())
        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        ids = {s: self.tok.token_to_id(s) for s in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                                   "<|observation|>", "<think>", "</think>")}
        assert all(v is not None for v in ids.values()), ids
        self.ids = ids
        self.closers = {ids["<|user|>"], ids["<|observation|>"], ids["<|system|>"], ids["<|endoftext|>"]}

    def render(self, conv, add_generation_prompt=False):
        kw = {"enable_thinking": conv["enable_thinking"]}
        if conv.get("tools") is not None:
            kw["tools"] = conv["tools"]
        return self.tpl.render(messages=conv["messages"], add_generation_prompt=add_generation_prompt, **kw)

    def text(self, conv):
        return self.render(conv) + "<|user|>"

    def mask(self, ids):
        """1 on what an assistant turn generates after its generation prompt, through the closing role token."""
        I = self.ids
        m = np.zeros(len(ids), np.uint8)
        state = 0  # 0 outside, 1 right after <|assistant|>, 2 inside a reply
        for i, t in enumerate(ids):
            if state == 0:
                if t == I["<|assistant|>"]:
                    state = 1
            elif state == 1:
                assert t in (I["<think>"], I["</think>"]), f"token {t} after <|assistant|>"
                state = 2
            else:
                m[i] = 1
                if t in self.closers:
                    state = 0
                assert t != I["<|assistant|>"]
        assert state == 0, "conversation ends inside a reply"
        return m


def build_split(gen, renderer, n, max_tokens):
    """n conversations of at most max_tokens tokens (longer ones are redrawn, never cut)."""
    convs, ids, masks, offs, kinds, redrawn = [], [], [], [0], [], 0
    while len(convs) < n:
        batch = [gen.conversation() for _ in range(min(2000, n - len(convs)))]
        for c, e in zip(batch, renderer.tok.encode_batch([renderer.text(c) for c in batch])):
            if len(e.ids) > max_tokens:
                redrawn += 1
                continue
            convs.append(c)
            ids.append(np.asarray(e.ids, np.uint16))
            masks.append(renderer.mask(e.ids))
            offs.append(offs[-1] + len(e.ids))
            kinds.append(KINDS.index(c["kind"]))
    return (convs, np.concatenate(ids), np.concatenate(masks), np.asarray(offs, np.int64), np.asarray(kinds, np.uint8),
            redrawn)


def check_masks(renderer, convs, ids, mask, offs, k=200):
    """Every assistant message's visible text lies inside its trained span, and nothing of a user's does; and
    the trained spans start exactly where inference would start generating: the tokens of the prompt for an
    assistant message (the messages before it, add_generation_prompt=True) are a prefix of the conversation's,
    followed by mask-1 tokens. (Not for replies before the last user message of a thinking-on conversation: the
    template drops their reasoning, so their prompt ended in <think> but the history shows </think>.)"""
    tok = renderer.tok
    for c in range(min(k, len(convs))):
        a, b = offs[c], offs[c + 1]
        seg, m = ids[a:b].tolist(), mask[a:b]
        msgs = convs[c]["messages"]
        last_user = max(i for i, x in enumerate(msgs) if x["role"] == "user")
        for j, msg in enumerate(msgs):
            if msg["role"] != "assistant" or (convs[c]["enable_thinking"] and j < last_user):
                continue
            p = tok.encode(renderer.render(dict(convs[c], messages=msgs[:j]), add_generation_prompt=True)).ids
            assert seg[:len(p)] == p and m[len(p)] == 1 and not m[len(p) - 1], (c, j)
        trained = tok.decode([t for t, x in zip(seg, m) if x], skip_special_tokens=False)
        untrained = tok.decode([t for t, x in zip(seg, m) if not x], skip_special_tokens=False)
        for msg in convs[c]["messages"]:
            text = msg.get("content", "").strip()
            if msg["role"] == "assistant" and text:
                assert text in trained, (text, trained)
            if msg["role"] in ("user", "tool") and len(text) > 30:
                assert text not in trained, (text, trained)
                assert text in untrained


def stats(name, convs, ids, mask, offs, kinds, redrawn):
    lens = np.diff(offs)
    s = {"conversations": len(convs), "tokens": int(len(ids)), "assistant_tokens": int(mask.sum()),
         "mean_tokens": round(float(lens.mean()), 1), "max_tokens": int(lens.max()),
         "thinking_on": sum(c["enable_thinking"] for c in convs), "with_tools": sum(c["tools"] is not None for c in convs),
         "with_tool_calls": sum(any("tool_calls" in m for m in c["messages"]) for c in convs),
         "multi_turn": sum(sum(m["role"] == "user" for m in c["messages"]) > 1 for c in convs),
         "with_system_prompt": sum(c["messages"][0]["role"] == "system" for c in convs),
         "by_kind": {k: int((kinds == i).sum()) for i, k in enumerate(KINDS)}, "redrawn": redrawn,
         "sha256_ids": hashlib.sha256(ids.tobytes()).hexdigest(), "sha256_mask": hashlib.sha256(mask.tobytes()).hexdigest()}
    print(f"{name}: {s['conversations']:,} conversations, {s['tokens']:,} tokens, {s['assistant_tokens']:,} assistant "
          f"(trained) tokens; mean {s['mean_tokens']} / max {s['max_tokens']} tokens; thinking on {s['thinking_on']:,}, "
          f"tools {s['with_tools']:,} (tool calls {s['with_tool_calls']:,}), multi-turn {s['multi_turn']:,}", flush=True)
    return s


# ---------------------------------------------------------------------------------------------- fixtures
def fixtures(facts, corpus, renderer, seed):
    """Held-out prompts for a later C++/pytest test: tool-use prompts with the expected calls, thinking on/off."""
    gen = Generator(facts, corpus, "heldout", seed)
    out = {"tool_calls": [], "thinking": []}
    wanted = [("tool_weather", True, 1), ("tool_weather", False, 1), ("tool_weather", True, 2), ("tool_calc", True, 1),
              ("tool_calc", False, 1), ("tool_search", True, 1), ("tool_search", False, 1), ("tool_chain", True, 2)]
    makers = {"tool_weather": gen.weather_qa, "tool_calc": gen.calc_qa, "tool_search": gen.search_qa,
              "tool_chain": gen.chain_qa}
    for kind, thinking, ncalls in wanted:
        for _ in range(200):
            k, q, steps, obs, names = makers[kind]()
            if len(steps[0][2]) == ncalls:
                break
        system = [{"role": "system", "content": gen.rng.choice(SYSTEM_PROMPTS)}] if gen.rng.random() < 0.5 else []
        msgs = system + [{"role": "user", "content": q}]
        tools = [TOOLS[n] for n in sorted(TOOLS)]
        conv = {"messages": msgs, "tools": tools, "enable_thinking": thinking}
        prompt = renderer.render(conv, add_generation_prompt=True)
        r, content, calls = steps[0]
        reply = (f"{r}</think>" if thinking else "") + content + "".join(
            "<tool_call>" + c["function"]["name"] + "".join(f"<arg_key>{a}</arg_key><arg_value>{v}</arg_value>"
                                                              for a, v in c["function"]["arguments"].items()) + "</tool_call>"
            for c in calls)
        out["tool_calls"].append({
            "label": f"{kind} thinking={'on' if thinking else 'off'} calls={len(calls)}", "messages": msgs,
            "tools": tools, "enable_thinking": thinking, "prompt": prompt,
            "prompt_ids": renderer.tok.encode(prompt).ids,
            "expected_tool_calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls],
            "reference_reply": reply})
    for i, thinking in enumerate([True, False, True, False]):
        kind, q, steps, subj = gen.qa(gen.fact if i < 2 else gen.count, "fact")
        msgs = [{"role": "user", "content": q}]
        conv = {"messages": msgs, "tools": None, "enable_thinking": thinking}
        prompt = renderer.render(conv, add_generation_prompt=True)
        r, a, _ = steps[0]
        out["thinking"].append({"label": f"thinking={'on' if thinking else 'off'}", "messages": msgs,
                                "enable_thinking": thinking, "prompt": prompt, "prompt_ids": renderer.tok.encode(prompt).ids,
                                "expect_reasoning": thinking, "reference_reply": (f"{r}</think>" if thinking else "") + a})
    return out


def samples_text(renderer, convs, ids, mask, offs, kinds, n=10):
    picked, seen = [], set()
    for c, k in enumerate(kinds.tolist()):
        key = (k, convs[c]["enable_thinking"])
        if key not in seen:
            seen.add(key)
            picked.append(c)
        if len(picked) >= n:
            break
    lines = ["Rendered training conversations (scripts/make_chat_corpus.py). Below each, the trained spans (mask 1),",
             "one per line: what the model learns to generate after each generation prompt.", ""]
    for c in picked:
        a, b = offs[c], offs[c + 1]
        seg, m = ids[a:b].tolist(), mask[a:b].tolist()
        spans, cur = [], []
        for t, x in zip(seg, m):
            if x:
                cur.append(t)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        conv = convs[c]
        lines.append(f"=== {KINDS[kinds[c]]}, thinking {'on' if conv['enable_thinking'] else 'off'}, "
                     f"{b - a} tokens, {sum(m)} trained")
        lines.append(renderer.tok.decode(seg, skip_special_tokens=False))
        lines.append("--- trained:")
        lines.extend("  " + renderer.tok.decode(s, skip_special_tokens=False) for s in spans)
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder made by scripts/prepare_austen.py (only train/ is read)")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-glm"), help="chat_template.jinja + tokenizer.json")
    ap.add_argument("--out", default="/tmp/chat_corpus")
    ap.add_argument("--fixtures", default=os.path.join(ROOT, "tests", "data", "chat"), help="'' to skip")
    ap.add_argument("--train", type=int, default=30000, help="training conversations")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out conversations")
    ap.add_argument("--max-tokens", type=int, default=1000, help="longest conversation (fine-tune windows are 1024)")
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args()
    t0 = time.time()
    data = os.path.abspath(args.data)
    assert os.path.isdir(os.path.join(data, "train")), f"{data}/train: not a prepare_austen.py output"
    facts = Facts()
    corpus = Corpus(load_paragraphs(data))
    renderer = Renderer(args.model)
    os.makedirs(args.out, exist_ok=True)
    meta = {"kinds": KINDS, "args": {k: v for k, v in vars(args).items() if k not in ("data", "out", "fixtures")},
            "tokenizer_sha256": hashlib.sha256(open(os.path.join(args.model, "tokenizer.json"), "rb").read()).hexdigest(),
            "template_sha256": hashlib.sha256(open(os.path.join(args.model, "chat_template.jinja"), "rb").read()).hexdigest()}
    results = {}
    for split, n, seed in (("train", args.train, args.seed), ("heldout", args.heldout, args.seed + 1000)):
        gen = Generator(facts, corpus, split, seed)
        print(f"{split}: {len(gen.fact)} fact items, {len(gen.count)} count items, {len(gen.quote)} paragraphs, "
              f"{len(gen.cities)} cities, {len(gen.words)} search words", flush=True)
        convs, ids, mask, offs, kinds, redrawn = build_split(gen, renderer, n, args.max_tokens)
        check_masks(renderer, convs, ids, mask, offs)
        np.savez(os.path.join(args.out, f"{split}.npz"), ids=ids, mask=mask, offsets=offs, kind=kinds)
        with open(os.path.join(args.out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for c in convs:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        meta[split] = stats(split, convs, ids, mask, offs, kinds, redrawn)
        results[split] = (convs, ids, mask, offs, kinds)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if args.fixtures:
        os.makedirs(args.fixtures, exist_ok=True)
        fx = fixtures(facts, corpus, renderer, args.seed + 2000)
        with open(os.path.join(args.fixtures, "fixtures.json"), "w", encoding="utf-8") as f:
            json.dump(fx, f, ensure_ascii=False, indent=1)
        with open(os.path.join(args.fixtures, "samples.txt"), "w", encoding="utf-8") as f:
            f.write(samples_text(renderer, *results["train"]))
        with open(os.path.join(args.fixtures, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme(meta, fx))
        print(f"fixtures: {len(fx['tool_calls'])} tool-call prompts, {len(fx['thinking'])} thinking prompts -> {args.fixtures}")
    print(f"wrote {args.out} in {time.time() - t0:.1f} s")


def readme(meta, fx):
    tr, ho = meta["train"], meta["heldout"]
    row = lambda n, s: (f"| {n} | {s['conversations']:,} | {s['tokens']:,} | {s['assistant_tokens']:,} | "  # noqa: E731
                        f"{s['mean_tokens']} / {s['max_tokens']} | {s['thinking_on']:,} | {s['with_tool_calls']:,} | {s['multi_turn']:,} |")
    return "\n".join([
        "# Synthetic chat data (issue 14)",
        "",
        "Made by `python3 scripts/make_chat_corpus.py --data DATA` (DATA from `scripts/prepare_austen.py`); the recipe is",
        "the script's docstring. The corpus itself (token ids + loss mask, `train.npz` / `heldout.npz`) is written to",
        "`--out` (default /tmp/chat_corpus), not here; this folder keeps what tests use and what people read:",
        "",
        "- `fixtures.json`: held-out prompts (facts, cities and search words no training conversation uses).",
        f"  `tool_calls` ({len(fx['tool_calls'])}): messages + tools + enable_thinking, the rendered `prompt` and its",
        "  `prompt_ids`, `expected_tool_calls` (name + arguments, as `src/runtime/glm_output` should parse them) and",
        f"  the `reference_reply` of the corpus. `thinking` ({len(fx['thinking'])}): prompts with thinking on (a reply",
        "  must split into non-empty reasoning and content) and off (no reasoning).",
        "- `samples.txt`: rendered training conversations with the trained spans (mask 1) listed under each.",
        "",
        "| split | conversations | tokens | assistant (trained) tokens | mean / max tokens | thinking on | with tool calls | multi-turn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("train", tr), row("held out", ho),
        "",
        f"Deterministic: train ids sha256 `{tr['sha256_ids'][:16]}…`, mask `{tr['sha256_mask'][:16]}…` (tokenizer",
        f"sha256 `{meta['tokenizer_sha256'][:16]}…`). Conversations by kind (the most tool-like exchange, else the first; train): "
        + ", ".join(f"{k} {v:,}" for k, v in tr["by_kind"].items()) + ".",
        ""])


if __name__ == "__main__":
    main()

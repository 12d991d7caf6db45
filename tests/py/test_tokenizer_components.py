"""Components the real files do not use, checked against HF tokenizers on variants of the synthetic GLM
tokenizer: normalizers Strip/Prepend/Replace (literal and regex)/Sequence, Split behaviors (all five, invert),
Digits, ByteLevel with add_prefix_space and use_regex, added tokens with lstrip/rstrip/single_word."""
import copy
import json
import os
import subprocess

import pytest
from tokenizers import Tokenizer

import tok_strings

TOOL = os.environ.get("TRELLM_TOKENIZER_TOOL")
TOKDIR = os.environ.get("TRELLM_TOKENIZER_DIR")
GLM = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def split(pattern, behavior, invert=False, regex=True):
    return {"type": "Split", "pattern": {"Regex" if regex else "String": pattern}, "behavior": behavior, "invert": invert}


VARIANTS = {
    "normalizers": {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Strip", "strip_left": True, "strip_right": True}, {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": "  "}, "content": " "},
        {"type": "Replace", "pattern": {"Regex": "[0-9]+"}, "content": "#"}, {"type": "NFC"}]}},
    "isolated-digits": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, split(GLM, "Isolated"), BL]}},
    "contiguous-digits": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False}, BL]}},
    "removed": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(r"\s+", "Removed"), BL]}},
    "merged-prev": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(r"[,.!?]", "MergedWithPrevious"), BL]}},
    "merged-next": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(" ", "MergedWithNext", regex=False), BL]}},
    "contiguous": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(r"\p{P}", "Contiguous"), BL]}},
    "inverted": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(r"\p{L}+", "Isolated", invert=True), BL]}},
    "bytelevel-regex-prefix": {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                 "use_regex": True}},
    "empty-matches": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(r"(?=[A-Z])", "Isolated"), BL]}},
    "ignore-merges": {"model.ignore_merges": True},
    "strip-flags": {"added_flags": True},
}


def make_variant(base, name):
    j = copy.deepcopy(base)
    v = VARIANTS[name]
    for k, val in v.items():
        if k == "model.ignore_merges":
            j["model"]["ignore_merges"] = val
        elif k == "added_flags":
            for i, a in enumerate(j["added_tokens"]):
                a["lstrip"] = i % 3 == 0
                a["rstrip"] = i % 3 == 1
                a["single_word"] = i % 4 == 2
                a["normalized"] = i % 5 == 3
        else:
            j[k] = val
    return j


@pytest.mark.skipif(not TOOL or not TOKDIR, reason="run through ctest")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_component_parity(name, tmp_path):
    base = json.load(open(os.path.join(TOKDIR, "glm4-synthetic", "tokenizer.json"), encoding="utf-8"))
    j = make_variant(base, name)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
    hf = Tokenizer.from_file(str(path))
    specials = [a["content"] for a in j["added_tokens"]]
    texts = tok_strings.make_strings(1500, 31 + len(name), specials)
    texts += ["  lead and trail  ", "a1b22c333", "Hello,World!!  x", "CamelCaseWordsHere", " <think> x <tool_call>y "]
    reqs = "\n".join(json.dumps({"encode": t}) for t in texts) + "\n"
    proc = subprocess.run([TOOL, "batch", str(path)], input=reqs, capture_output=True, text=True, encoding="utf-8")
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(x) for x in proc.stdout.split("\n") if x]
    bad = [(t, g, hf.encode(t, add_special_tokens=False).ids) for t, g in zip(texts, got)
           if g.get("ids") != hf.encode(t, add_special_tokens=False).ids]
    print(f"{name}: {len(texts) - len(bad)}/{len(texts)} identical")
    assert not bad, f"{len(bad)} differ; first: {bad[0]!r}"

"""Parity of trellm's tokenizer with HF `tokenizers` (the oracle) on real and synthetic tokenizer.json files:
10,000 generated strings per file (Unicode, CJK, emoji, whitespace runs, code, long numbers, special-token
strings whole/truncated/spaced, NFC-sensitive sequences), encoded with and without special tokens, plus
decode and streaming decode of random id sequences (invalid UTF-8 included) and of the encoded ids.

Run by CTest (tests/py/CMakeLists.txt), which sets TRELLM_TOKENIZER_TOOL and TRELLM_TOKENIZER_DIR.
Extra files can be checked with TRELLM_EXTRA_TOKENIZERS=/path/a/tokenizer.json:/path/b/tokenizer.json."""
import json
import os
import subprocess

import pytest
from tokenizers import Tokenizer

import tok_strings

TOOL = os.environ.get("TRELLM_TOKENIZER_TOOL")
TOKDIR = os.environ.get("TRELLM_TOKENIZER_DIR")
NAMES = ["qwen3", "deepseek-v3", "olmo2-dolma2", "gpt-neox-olmo", "glm4-synthetic", "glm4-synthetic-bos"]
N_STRINGS = 10_000
N_DECODE = 2_000

FILES = [(n, os.path.join(TOKDIR or "", n, "tokenizer.json")) for n in NAMES]
FILES += [(os.path.basename(os.path.dirname(p)) or p, p)
          for p in os.environ.get("TRELLM_EXTRA_TOKENIZERS", "").split(":") if p]


def run_tool(path, requests):
    proc = subprocess.run([TOOL, "batch", path], input="\n".join(json.dumps(r) for r in requests) + "\n",
                          capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stderr
    # split on "\n" only: str.splitlines() would also break at U+2028, \x1c, ... inside the JSON text
    replies = [json.loads(line) for line in proc.stdout.split("\n") if line]
    assert len(replies) == len(requests)
    return replies


@pytest.mark.skipif(not TOOL or not TOKDIR, reason="run through ctest (needs TRELLM_TOKENIZER_TOOL/_DIR)")
@pytest.mark.parametrize("name,path", FILES, ids=[f[0] for f in FILES])
def test_parity_with_hf_tokenizers(name, path):
    hf = Tokenizer.from_file(path)
    spec = json.load(open(path, encoding="utf-8"))
    specials = [a["content"] for a in spec.get("added_tokens", [])]
    # Keep the special strings varied but bounded (DeepSeek has > 800 added tokens).
    specials = specials[:60] + specials[60::max(1, len(specials) // 40)]
    seed = sum(map(ord, name))
    texts = tok_strings.make_strings(N_STRINGS, seed, specials)
    assert len(texts) >= 10_000

    want_plain = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    want_special = [e.ids for e in hf.encode_batch(texts, add_special_tokens=True)]
    special_ids = sorted({hf.token_to_id(s) for s in specials if hf.token_to_id(s) is not None})
    id_seqs = tok_strings.make_id_sequences(N_DECODE, seed + 1, hf.get_vocab_size(with_added_tokens=True), special_ids)
    id_seqs += want_plain[:N_DECODE]  # round trips of real encodings

    reqs = [{"encode": t} for t in texts] + [{"encode": t, "special": True} for t in texts]
    reqs += [{"decode": ids} for ids in id_seqs] + [{"decode": ids, "skip": True} for ids in id_seqs]
    got = run_tool(path, reqs)
    n = len(texts)
    m = len(id_seqs)

    mismatches = []
    for i, t in enumerate(texts):
        if got[i].get("ids") != want_plain[i]:
            mismatches.append(("encode", t, got[i], want_plain[i]))
        if got[n + i].get("ids") != want_special[i]:
            mismatches.append(("encode+special", t, got[n + i], want_special[i]))
    for k, ids in enumerate(id_seqs):
        for skip, reply in ((False, got[2 * n + k]), (True, got[2 * n + m + k])):
            want = hf.decode(ids, skip_special_tokens=skip)
            if reply.get("text") != want or reply.get("stream") != want:
                mismatches.append(("decode skip=%s" % skip, ids, reply, want))
    total = 2 * n + 2 * m
    print(f"{name}: {total - len(mismatches)}/{total} identical ({n} strings, {m} id sequences)")
    assert not mismatches, f"{len(mismatches)} of {total} differ; first: {mismatches[:3]!r}"

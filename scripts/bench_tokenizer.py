#!/usr/bin/env python3
"""Encoding speed, trellm vs HF tokenizers, same text, same machine, same run (single-threaded both).

The text: Python's standard-library sources (code and English comments) plus generated multilingual text
(tests/py/tok_strings.py), ~8 MB. Each side encodes the whole text as one string; best of 3 after a warm-up. HF is also timed on
encode_batch over the text's lines (its common use; one thread), which avoids its slow path for one huge string.
Usage: python3 scripts/bench_tokenizer.py [--build build] [--out bench/results]"""
import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "py"))
import tok_strings  # noqa: E402
import tokenizers  # noqa: E402


def corpus(target_bytes=8_000_000):
    parts, size = [], 0
    libdir = os.path.dirname(os.__file__)
    for f in sorted(glob.glob(os.path.join(libdir, "**", "*.py"), recursive=True)):
        if "site-packages" in f or "test" in f:
            continue
        try:
            t = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(t)
        size += len(t.encode())
        if size > target_bytes * 7 // 8:
            break
    parts.extend(tok_strings.make_strings(12000, 5))
    return "\n".join(parts)


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--names", default="qwen3,glm4-synthetic,deepseek-v3")
    a = ap.parse_args()
    tool = os.path.join(a.build, "tests", "runtime", "tokenizer_tool")
    text = corpus()
    nbytes = len(text.encode())
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        for name in a.names.split(","):
            tj = os.path.join(a.build, "testdata", "tokenizers", name, "tokenizer.json")
            hf = tokenizers.Tokenizer.from_file(tj)
            hf_ids = hf.encode(text, add_special_tokens=False).ids  # warm-up
            best = 1e30
            for _ in range(3):
                t0 = time.perf_counter()
                hf_ids = hf.encode(text, add_special_tokens=False).ids
                best = min(best, time.perf_counter() - t0)
            # HF's usual path: encode_batch over lines (RAYON_NUM_THREADS=1 keeps it on one thread).
            lines = text.split("\n")
            hf.encode_batch(lines[:2000], add_special_tokens=False)
            best_batch = 1e30
            for _ in range(3):
                t0 = time.perf_counter()
                hf.encode_batch(lines, add_special_tokens=False)
                best_batch = min(best_batch, time.perf_counter() - t0)
            ours = json.loads(subprocess.run([tool, "bench", tj, path, "3"], capture_output=True, text=True,
                                             check=True).stdout)
            row = {"date": datetime.date.today().isoformat(), "machine": "CPU: " + cpu_model(), "commit": commit,
                   "command": "python3 scripts/bench_tokenizer.py", "tokenizer": name, "text_bytes": nbytes,
                   "tokens": len(hf_ids), "same_token_count": ours["tokens"] == len(hf_ids),
                   "trellm_mb_s": round(ours["mb_per_s"], 2), "hf_tokenizers_mb_s": round(nbytes / best / 1e6, 2),
                   "hf_tokenizers_batch_lines_mb_s": round(nbytes / best_batch / 1e6, 2),
                   "hf_tokenizers_version": tokenizers.__version__}
            print(json.dumps(row))
            rows.append(row)
    finally:
        os.unlink(path)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "tokenizer.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Calibration token rows for `trellm quantize` of the built-in model, from its *training* split only.

Reads the train/ folder made by scripts/prepare_austen.py (never val/ or heldout.txt: the quality table is
measured on the held-out text), tokenizes every novel with the model's tokenizer.json and joins them the way
scripts/train_tiny_glm.py does for training (<|endoftext|> before each document), then takes `--rows` windows of
`--seq-len` tokens at evenly spaced offsets over the whole stream, so every novel contributes in proportion to
its length (the first rows of a plain concatenation would be mostly Emma). Writes them as a .ids file (one row
per line, whitespace-separated ids), which `trellm quantize --calibration FILE.ids --seq-len L` cuts back into
the same rows.

Usage:
  python3 scripts/prepare_austen.py --out /tmp/austen
  python3 scripts/austen_calibration.py --data /tmp/austen --out /tmp/austen_calib.ids [--rows 256 --seq-len 1024]
"""
import argparse
import os

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder made by scripts/prepare_austen.py (its train/ is used)")
    ap.add_argument("--out", required=True, help="the .ids file to write")
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "models", "tiny-glm", "tokenizer.json"))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    eot = tok.token_to_id("<|endoftext|>")
    train = os.path.join(args.data, "train")
    ids = []
    for f in sorted(os.listdir(train)):
        if f.endswith(".txt"):
            ids.append(eot)
            ids.extend(tok.encode(open(os.path.join(train, f), encoding="utf-8").read()).ids)
    n, L = len(ids), args.seq_len
    if n < L:
        raise SystemExit(f"{train}: only {n} tokens, fewer than --seq-len {L}")
    rows = min(args.rows, n // L)
    stride = (n - L) / max(rows - 1, 1)
    with open(args.out, "w") as f:
        for r in range(rows):
            off = int(round(r * stride))
            f.write(" ".join(str(t) for t in ids[off:off + L]) + "\n")
    print(f"{train}: {n} tokens; wrote {rows} rows of {L} tokens ({rows * L} tokens, "
          f"{100.0 * rows * L / n:.1f} % of the training split) to {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The training text of the built-in model: Jane Austen's six novels from the Debian package r-cran-janeaustenr.

Source: Debian package `r-cran-janeaustenr` 1.0.0-1 (CRAN janeaustenr by Julia Silge, package license MIT; the
novels themselves are public domain, taken by that package from Project Gutenberg). The package stores each novel
as an R character vector (one element per printed line) in the lazy-load database data/Rdata.{rdx,rdb}; this
script reads it with the `rdata` PyPI package (MIT), unwraps the printed lines into paragraphs and splits every
novel into a training part and a held-out part (the last HOLDOUT of its paragraphs, so the evaluation text is
never seen in training, not even a nearby window of it).

Writes OUT/train/<novel>.txt, OUT/val/<novel>.txt (paragraphs separated by a blank line), OUT/heldout.txt (all
held-out parts, the file of the perplexity table) and OUT/heldout_snippet.txt (a fixed ~4 KB excerpt of it, the
CI perplexity check).

Usage: python3 scripts/prepare_austen.py --out /tmp/austen_data [--deb r-cran-janeaustenr_1.0.0-1_all.deb]
(without --deb it runs `apt-get download r-cran-janeaustenr` in a temporary folder; needs `pip install rdata`).
"""
import argparse
import glob
import gzip
import os
import re
import subprocess
import tempfile
import warnings
import zlib

NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
HOLDOUT = 0.04


def read_lazyload_db(data_dir):
    """{name: value} of an R lazy-load database (data/Rdata.rdx index + Rdata.rdb zlib-compressed objects)."""
    import rdata
    warnings.simplefilter("ignore")  # rdata warns that a bare serialization stream has no file magic
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(open(os.path.join(data_dir, "Rdata.rdx"), "rb").read())))
    blob = open(os.path.join(data_dir, "Rdata.rdb"), "rb").read()
    out = {}
    for name, (off, length) in index["variables"].items():
        raw = blob[int(off):int(off) + int(length)]
        # Each object: 4-byte big-endian uncompressed length, then a zlib stream of R's serialization.
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(raw[4:])))
    return out


def paragraphs(lines):
    """Printed lines -> paragraphs: wrapped lines joined with spaces, blank lines separate paragraphs;
    Gutenberg's _italics_ markers dropped."""
    paras, cur = [], []
    for line in list(lines) + [""]:
        line = str(line).strip()
        if line:
            cur.append(line)
        elif cur:
            p = re.sub(r"\s+", " ", " ".join(cur)).replace("_", "")
            paras.append(p)
            cur = []
    return paras


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--deb", help="r-cran-janeaustenr .deb (default: apt-get download it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if not deb:
            subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True)
            deb = glob.glob(os.path.join(tmp, "r-cran-janeaustenr_*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
        books = read_lazyload_db(os.path.join(tmp, "x", "usr/lib/R/site-library/janeaustenr/data"))
    for sub in ("train", "val"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    held, total = [], {"train": 0, "val": 0}
    for name in NOVELS:
        paras = paragraphs(books[name])
        cut = int(len(paras) * (1 - HOLDOUT))
        for sub, part in (("train", paras[:cut]), ("val", paras[cut:])):
            text = "\n\n".join(part) + "\n"
            with open(os.path.join(args.out, sub, name + ".txt"), "w", encoding="utf-8") as f:
                f.write(text)
            total[sub] += len(text.encode())
        held.append("\n\n".join(paras[cut:]) + "\n")
        print(f"{name}: {len(paras)} paragraphs, {cut} train / {len(paras) - cut} held out")
    with open(os.path.join(args.out, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(held))
    # The CI snippet: whole paragraphs from the start of Emma's held-out part, about 4 KB.
    snippet, paras = "", open(os.path.join(args.out, "val", "emma.txt"), encoding="utf-8").read().split("\n\n")
    for p in paras:
        if len(snippet) + len(p) > 4000:
            break
        snippet += p.strip() + "\n\n"
    with open(os.path.join(args.out, "heldout_snippet.txt"), "w", encoding="utf-8") as f:
        f.write(snippet.rstrip("\n") + "\n")
    print(f"train {total['train'] / 1e6:.2f} MB, held out {total['val'] / 1e6:.3f} MB, snippet {len(snippet)} chars")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Rows of bench/results/default_model_quality.md (markdown) and default_model_quality.jsonl from the logs folder
scripts/quality_table.sh writes: per variant NAME (k2..k8 trellis with calibration, k3_plain without, rtn4/rtn3)
  NAME.ppl.json        `trellm perplexity --ref models/tiny-glm --json`
  NAME.werr.json       scripts/exl3_weight_error.py --json (trellis variants)
  NAME.rtn.json        scripts/rtn_quantize.py's summary (RTN variants)
  NAME.quant_seconds   wall time of `trellm quantize`
and env.txt (key=value: date, commit, host, cpu, gpu, threads).

Columns: variant | bits/weight of the decoder Linears | perplexity | vs bf16 | mean KL | max KL | top-1 |
rel. weight MSE. Trellis bits are "K (stored)": the nominal K, then the bits the EXL3 tensors take per real weight
(padding of every dimension to 128 and the fp16 channel scales included). The bf16 row comes from the reference
perplexity the runs report (all runs must agree on it).

Usage: python3 scripts/quality_table.py --logs DIR [--jsonl FILE] [--markdown FILE]   (prints the rows too)
"""
import argparse
import glob
import json
import os

ORDER = ["k2", "k3", "k4", "k5", "k6", "k8", "k3_plain", "rtn4", "rtn3"]


def label(name):
    if name.startswith("rtn"):
        return f"RTN int{name[3:]} g128"
    if name.endswith("_plain"):
        return f"trellis K = {name[1:-6]}, no calibration (plain Viterbi)"
    return f"trellis K = {name[1:]} (LDLQ)"


def made_by(name, env):
    if name.startswith("rtn"):
        return f"python3 scripts/rtn_quantize.py --model models/tiny-glm --bits {name[3:]} --group 128 --out {name}"
    k = name[1:].split("_")[0]
    cal = "" if name.endswith("_plain") else (" --calibration austen_calib.ids --seq-len 1024 --calibration-rows 256"
                                                " --hessian-cache hessians")
    return f"trellm quantize --model models/tiny-glm --out {name} --bits {k} --head-bits 6{cal} --device cuda"


def load(path):
    with open(path) as f:
        return json.load(f)


def records(logs):
    env = {}
    if os.path.exists(os.path.join(logs, "env.txt")):
        for line in open(os.path.join(logs, "env.txt")):
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                env[k] = v
    found = {os.path.basename(p)[:-len(".ppl.json")] for p in glob.glob(os.path.join(logs, "*.ppl.json"))}
    names = [n for n in ORDER if n in found] + sorted(found - set(ORDER))
    out, ref = [], None
    for name in names:
        p = load(os.path.join(logs, name + ".ppl.json"))
        if ref is None:
            ref = p["ref_perplexity"]
        elif abs(p["ref_perplexity"] - ref) > 1e-9 * ref:
            raise SystemExit(f"{name}: reference perplexity {p['ref_perplexity']} differs from {ref}")
        r = {"date": env.get("date"), "machine": env.get("machine"), "commit": env.get("commit"),
             "text": p["text"], "ctx": p["ctx"], "variant": name, "label": label(name)}
        werr = os.path.join(logs, name + ".werr.json")
        rtn = os.path.join(logs, name + ".rtn.json")
        if os.path.exists(werr):
            w = load(werr)
            r["bits_per_weight_linear"] = w["decoder_bits"]
            r["stored_bits_per_weight_linear"] = round(w["decoder_stored_bpw"], 4)
            r["relative_weight_mse"] = round(w["decoder"], 6)
        elif os.path.exists(rtn):
            w = load(rtn)
            r["bits_per_weight_linear"] = w["bits_per_weight"]
            r["relative_weight_mse"] = round(w["relative_weight_mse"], 6)
        r["made_by"] = made_by(name, env)
        qs = os.path.join(logs, name + ".quant_seconds")
        if os.path.exists(qs):
            r["quantize_seconds"] = int(open(qs).read().strip())
        r["command"] = (f"trellm --threads {env.get('ppl_threads', '?')} perplexity --model {name} "
                        f"--ref models/tiny-glm --text {p['text']} --device cpu --json")
        r.update({"tokens": p["tokens"], "predicted": p["predicted"], "perplexity": round(p["perplexity"], 4),
                  "vs_bf16_pct": round(100 * (p["perplexity"] / p["ref_perplexity"] - 1), 2),
                  "mean_kl": round(p["mean_kl"], 6), "max_kl": round(p["max_kl"], 4),
                  "top1_agree": round(p["top1_agree"], 4), "seconds": round(p["seconds"], 1)})
        out.append(r)
    return out, ref


def markdown(rows, ref):
    lines = ["| variant | bits/weight (decoder linears) | perplexity | vs bf16 | mean KL | max KL | top-1 | "
             "rel. weight MSE |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if ref is not None:
        lines.append(f"| bf16 | 16 | {ref:.3f} | — | 0 | 0 | 100 % | 0 |")
    for r in rows:
        bits = r.get("bits_per_weight_linear")
        if bits is None:
            b = "?"
        elif "stored_bits_per_weight_linear" in r:
            b = f"{bits:g} ({r['stored_bits_per_weight_linear']:.2f})"
        else:
            b = f"{bits:g}"
        mse = f"{100 * r['relative_weight_mse']:.2f} %" if "relative_weight_mse" in r else "—"
        lines.append(f"| {r['label']} | {b} | {r['perplexity']:.3f} | {r['vs_bf16_pct']:+.2f} % | "
                     f"{r['mean_kl']:.4f} | {r['max_kl']:.3g} | {100 * r['top1_agree']:.1f} % | {mse} |")
    return "\n".join(lines) + "\n"


def write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logs", required=True)
    ap.add_argument("--jsonl")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    rows, ref = records(args.logs)
    md = markdown(rows, ref)
    if args.jsonl:
        write(args.jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if args.markdown:
        write(args.markdown, md)
    print(md, end="")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The tables of bench/results/default_model_quality.md (markdown), default_model_quality.jsonl (one record per
variant) and an SVG of the curves, from the logs folder scripts/quality_table.sh writes. Per variant NAME:
  NAME.ppl.json        `trellm perplexity --json` on the held-out text (with --ref models/tiny-glm and/or --mtp)
  NAME.werr.json       scripts/exl3_weight_error.py --json (trellis variants: K, stored bits, weight error)
  NAME.rtn.json        scripts/rtn_quantize.py's summary (RTN variants: bits, group, scheme, stored bits)
  NAME.quant_seconds, NAME.quant_command, NAME.bytes (model.safetensors), NAME.ppl_threads
  NAME.chat.json       `trellm perplexity --mtp --device cuda` on held-out chat ids (MTP variants)
  NAME.spec.jsonl      `trellm bench --speculative mtp --json` (acceptance per draft count)
  s3.vs_shipped, NAME.main_vs_s3   byte comparisons
and env.txt (key=value: date, commit, machine, ppl_threads).

Variants: kK (trellis K with LDLQ; lm_head and MTP layer bf16, as RTN keeps them), k3_plain (no calibration),
rtnK[a]_gG (RTN intK, group G, a = asymmetric), s3 / s3_mtpM (the shipped recipe: K = 3, lm_head K = 6, the MTP
layer bf16 / at K = M), bf16 (models/tiny-glm itself, for its MTP drafts).

Bits are *stored bits per real weight* of the decoder Linears (the 5.29 M weights of the attention projections,
dense MLP, routed and shared experts): trellis = every byte of their .trellis/.suh/.svh/.mcg tensors (tiles padded
to 128 in both dimensions, fp16 channel scales) over the unpadded weights; RTN = K per weight plus each group's
fp16 scale (and K-bit zero), short last groups counted as stored. The comparison at equal bits interpolates each
curve piecewise linearly in (bits, log KL) and (bits, perplexity) between its measured points.

Usage: python3 scripts/quality_table.py --logs DIR [--jsonl FILE] [--markdown FILE] [--svg FILE]  (prints the markdown)
"""
import argparse
import glob
import json
import math
import os
import re


def load(path):
    with open(path) as f:
        return json.load(f)


def kind(name):
    """(family, sort key) of a variant name; family None for names this script does not know."""
    m = re.fullmatch(r"k(\d)", name)
    if m:
        return "trellis", int(m.group(1))
    if name == "k3_plain":
        return "trellis, no calibration", 3
    m = re.fullmatch(r"rtn(\d)(a?)_g(\d+)", name)
    if m:
        return f"RTN {'asym' if m.group(2) else 'sym'} g{m.group(3)}", int(m.group(1))
    m = re.fullmatch(r"s3(_mtp(\d))?", name)
    if m:
        return "shipped recipe", int(m.group(2) or 16)
    if name == "bf16":
        return "bf16", 16
    return None, 0


def label(name):
    fam, k = kind(name)
    if fam == "trellis":
        return f"trellis K = {k} (LDLQ)"
    if fam == "trellis, no calibration":
        return "trellis K = 3, no calibration (plain Viterbi)"
    if fam and fam.startswith("RTN"):
        m = re.fullmatch(r"rtn(\d)(a?)_g(\d+)", name)
        return f"RTN int{m.group(1)} g{m.group(3)}{' asym' if m.group(2) else ''}"
    if fam == "shipped recipe":
        return "K = 3, lm_head 6, MTP layer " + ("bf16" if k == 16 else f"K = {k}")
    if fam == "bf16":
        return "bf16 (models/tiny-glm)"
    return name


def records(logs):
    env = {}
    if os.path.exists(os.path.join(logs, "env.txt")):
        for line in open(os.path.join(logs, "env.txt")):
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                env[k] = v
    names = {os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(logs, "*.ppl.json"))}
    names |= {os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(logs, "*.chat.json"))}
    names = sorted(names, key=lambda n: (str(kind(n)[0]), kind(n)[1], n))
    out, ref = [], None
    for name in names:
        f = lambda ext: os.path.join(logs, name + ext)  # noqa: E731
        fam, k = kind(name)
        r = {"date": env.get("date"), "machine": env.get("machine"), "commit": env.get("commit"), "variant": name,
             "label": label(name), "family": fam}
        if os.path.exists(f(".ppl.json")):
            p = load(f(".ppl.json"))
            if "ref_perplexity" in p:
                if ref is None:
                    ref = p["ref_perplexity"]
                elif abs(p["ref_perplexity"] - ref) > 1e-9 * ref:
                    raise SystemExit(f"{name}: reference perplexity {p['ref_perplexity']} differs from {ref}")
            r.update({"text": p["text"], "ctx": p["ctx"], "tokens": p["tokens"], "predicted": p["predicted"],
                      "perplexity": round(p["perplexity"], 4), "seconds": round(p["seconds"], 1)})
            if "mean_kl" in p:
                r.update({"ref_perplexity": round(p["ref_perplexity"], 4),
                          "vs_bf16_pct": round(100 * (p["perplexity"] / p["ref_perplexity"] - 1), 3),
                          "mean_kl": round(p["mean_kl"], 6), "max_kl": round(p["max_kl"], 4),
                          "top1_agree": round(p["top1_agree"], 4)})
            if "mtp_agreement" in p:
                r.update({"mtp_positions": p["mtp_positions"], "mtp_agreement": round(p["mtp_agreement"], 4),
                          "mtp_accuracy": round(p["mtp_accuracy"], 4)})
            threads = open(f(".ppl_threads")).read().strip() if os.path.exists(f(".ppl_threads")) else "?"
            mode = (" --ref models/tiny-glm" if "mean_kl" in p else "") + (" --mtp" if "mtp_agreement" in p else "")
            r["command"] = (f"trellm --threads {threads} perplexity --model {name if name != 'bf16' else 'models/tiny-glm'}"
                            f" --text {p['text']} --device cpu --json{mode}")
        if os.path.exists(f(".werr.json")):
            w = load(f(".werr.json"))
            r["bits_per_weight_linear"] = w["decoder_bits"]
            r["stored_bits_per_weight"] = round(w["decoder_stored_bpw"], 4)
            if "decoder_padded_bpw" in w:
                r["stored_bits_per_padded_weight"] = round(w["decoder_padded_bpw"], 4)
            r["relative_weight_mse"] = round(w["decoder"], 6)
            if "mtp_bits" in w:
                r["mtp_bits"] = round(w["mtp_bits"], 4)
                r["mtp_stored_bits_per_weight"] = round(w["mtp_stored_bpw"], 4)
                r["mtp_relative_weight_mse"] = round(w["mtp"], 6)
        elif os.path.exists(f(".rtn.json")):
            w = load(f(".rtn.json"))
            r["bits_per_weight_linear"] = w["bits_per_weight"]
            r["stored_bits_per_weight"] = round(w.get("stored_bits_per_weight", w["bits_per_weight"]), 4)
            r["relative_weight_mse"] = round(w["relative_weight_mse"], 6)
            r["made_by"] = (f"python3 scripts/rtn_quantize.py --model models/tiny-glm --bits {w.get('bits')} --group "
                            f"{w.get('group')} --scheme {w.get('scheme', 'sym')} --out {name}")
        if os.path.exists(f(".quant_command")):
            r["made_by"] = open(f(".quant_command")).read().strip()
        for ext, key in ((".quant_seconds", "quantize_seconds"), (".bytes", "model_bytes")):
            if os.path.exists(f(ext)):
                r[key] = int(open(f(ext)).read().strip())
        if os.path.exists(f(".chat.json")):
            c = load(f(".chat.json"))
            r.update({"chat_mtp_agreement": round(c["mtp_agreement"], 4), "chat_mtp_positions": c["mtp_positions"],
                      "chat_perplexity": round(c["perplexity"], 4), "chat_device": c.get("device")})
        if os.path.exists(f(".spec.jsonl")):
            acc = {}
            for line in open(f(".spec.jsonl")):
                j = json.loads(line)
                m = re.search(r"K=(\d+)", j.get("shape", ""))
                if j.get("metric") == "acceptance" and m:
                    acc[int(m.group(1))] = round(j["value"], 4)
                if j.get("metric") == "speedup_measured" and m:
                    r.setdefault("spec_speedup", {})[m.group(1)] = round(j["value"], 3)
            r["spec_acceptance"] = {str(k): v for k, v in sorted(acc.items())}
        for ext, key in ((".vs_shipped", "vs_shipped"), (".main_vs_s3", "main_vs_s3")):
            if os.path.exists(f(ext)):
                r[key] = open(f(ext)).read().strip()
        out.append(r)
    return out, ref


# ---- the curves ----
def curve(rows, family):
    return sorted((r for r in rows if r["family"] == family and "mean_kl" in r and "stored_bits_per_weight" in r),
                  key=lambda r: (r["stored_bits_per_weight"], r["variant"]))


def interp(pts, x, key, log=False):
    """Piecewise-linear interpolation of rows `pts` (sorted by stored bits) at bits x; None outside the range."""
    for a, b in zip(pts, pts[1:]):
        xa, xb = a["stored_bits_per_weight"], b["stored_bits_per_weight"]
        if xa <= x <= xb:
            ya, yb = a[key], b[key]
            if log:
                ya, yb = math.log(max(ya, 1e-12)), math.log(max(yb, 1e-12))
            y = ya + (yb - ya) * (x - xa) / (xb - xa) if xb > xa else ya
            return math.exp(y) if log else y
    if pts and abs(x - pts[0]["stored_bits_per_weight"]) < 1e-9:
        return pts[0][key]
    return None


def bits_to_reach(pts, target, key, higher_better=False, log=False, xkey="stored_bits_per_weight"):
    """The fewest bits at which the curve reaches `target` (first crossing, interpolated); -inf when its lowest
    point already does, +inf when no point does, None for an empty curve."""
    if not pts:
        return None
    good = (lambda v: v >= target) if higher_better else (lambda v: v <= target)
    if good(pts[0][key]):
        return -math.inf  # already at the lowest measured point: below the curve's range
    for a, b in zip(pts, pts[1:]):
        if good(b[key]):
            ya, yb, t = a[key], b[key], target
            if log:
                ya, yb, t = (math.log(max(v, 1e-12)) for v in (ya, yb, t))
            f = (t - ya) / (yb - ya) if yb != ya else 1.0
            return a[xkey] + f * (b[xkey] - a[xkey])
    return math.inf


def fmt(v, spec, none="—"):
    return none if v is None else format(v, spec)


def fmt_reach(v, pts, xkey="stored_bits_per_weight"):
    """bits_to_reach's result: '< lowest' / '> highest measured' outside the curve's range."""
    if v is None:
        return "—"
    if v == -math.inf:
        return f"< {pts[0][xkey]:.2f}"
    if v == math.inf:
        return f"> {pts[-1][xkey]:.2f}"
    return f"{v:.2f}"


def markdown(rows, ref):
    L = []
    main = [r for r in rows if "mean_kl" in r and (r["family"] in ("trellis", "trellis, no calibration")
                                                    or (r["family"] or "").startswith("RTN"))]
    ship = [r for r in rows if r["family"] == "shipped recipe" and "mean_kl" in r]
    L.append("### Every variant, by stored bits per real weight of the decoder Linears\n")
    L.append("The trellis kK and RTN rows quantize the decoder Linears only (lm_head, embeddings and the MTP layer "
             "bf16); the shipped-recipe row has lm_head at K = 6. \"per padded weight\": the trellis bits over the "
             "128-padded shapes, what K costs where no padding is needed.\n")
    L.append("| variant | K | stored bits / real weight | (per padded weight) | perplexity | vs bf16 | mean KL | "
             "max KL | top-1 | rel. weight MSE |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if ref is not None:
        L.append(f"| bf16 | 16 | 16 | | {ref:.3f} | — | 0 | 0 | 100 % | 0 |")
    for r in sorted(main + ship, key=lambda r: (r.get("stored_bits_per_weight", 99), r["variant"])):
        k = r.get("bits_per_weight_linear")
        kk = re.match(r"rtn(\d)", r["variant"])
        kcol = kk.group(1) if kk else (f"{k:g}" if k is not None else "?")
        mse = f"{100 * r['relative_weight_mse']:.2f} %" if "relative_weight_mse" in r else "—"
        L.append(f"| {r['label']} | {kcol} | {fmt(r.get('stored_bits_per_weight'), '.3f', '?')} | "
                 f"{fmt(r.get('stored_bits_per_padded_weight'), '.3f', '')} | {r['perplexity']:.3f} | "
                 f"{r['vs_bf16_pct']:+.2f} % | {r['mean_kl']:.4f} | {r['max_kl']:.3g} | {100 * r['top1_agree']:.1f} % | {mse} |")

    tr = curve(rows, "trellis")
    fams = sorted({r["family"] for r in rows if (r["family"] or "").startswith("RTN")},
                  key=lambda f: (f.split()[1], int(f.split()[2][1:])))
    if len(tr) >= 2 and fams:
        L.append("\n### Trellis at the bits of each RTN variant (trellis curve interpolated)\n")
        L.append("| RTN variant | stored bits | RTN ppl vs bf16 | trellis at these bits | RTN mean KL | trellis at these "
                 "bits | RTN top-1 | trellis | bits trellis needs for RTN's KL | for its ppl | for its top-1 |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for fam in fams:
            for r in curve(rows, fam):
                x = r["stored_bits_per_weight"]
                kl = interp(tr, x, "mean_kl", log=True)
                pp = interp(tr, x, "vs_bf16_pct")
                t1 = interp(tr, x, "top1_agree")
                bk = bits_to_reach(tr, r["mean_kl"], "mean_kl", log=True)
                bp = bits_to_reach(tr, r["vs_bf16_pct"], "vs_bf16_pct")
                bt = bits_to_reach(tr, r["top1_agree"], "top1_agree", higher_better=True)
                L.append(f"| {r['label']} | {x:.3f} | {r['vs_bf16_pct']:+.2f} % | {fmt(pp, '+.2f')} % | "
                         f"{r['mean_kl']:.4f} | {fmt(kl, '.4f')} | {100 * r['top1_agree']:.1f} % | "
                         f"{fmt(None if t1 is None else 100 * t1, '.1f')} % | {fmt_reach(bk, tr)} | {fmt_reach(bp, tr)} | "
                         f"{fmt_reach(bt, tr)} |")
        L.append("\n### Each RTN family at the bits of each trellis K (RTN curves interpolated; mean KL)\n")
        L.append("| trellis | stored bits | trellis mean KL | " + " | ".join(fams) + " |")
        L.append("|---|---:|---:|" + "---:|" * len(fams))
        for r in tr:
            x = r["stored_bits_per_weight"]
            cells = [fmt(interp(curve(rows, f), x, "mean_kl", log=True), ".4f") for f in fams]
            L.append(f"| {r['label']} | {x:.3f} | {r['mean_kl']:.4f} | " + " | ".join(cells) + " |")
        # The same question on 128-aligned shapes (GLM-4.7-Flash's): trellis costs its per-padded-weight bits there,
        # RTN its nominal K + overhead / G; the quality at each K is the one measured here.
        if all("stored_bits_per_padded_weight" in r for r in tr):
            L.append("\n### If the shapes needed no padding (GLM-4.7-Flash's): bits for RTN's mean KL\n")
            L.append("| RTN variant | bits (K + scale/zero per group) | trellis bits for the same KL (per padded weight) |")
            L.append("|---|---:|---:|")
            for fam in fams:
                for r in curve(rows, fam):
                    b = bits_to_reach(tr, r["mean_kl"], "mean_kl", log=True, xkey="stored_bits_per_padded_weight")
                    L.append(f"| {r['label']} | {r['bits_per_weight_linear']:.3f} | "
                             f"{fmt_reach(b, tr, 'stored_bits_per_padded_weight')} |")

    mt = [r for r in rows if r["family"] in ("shipped recipe", "bf16")]
    if mt:
        L.append("\n### The MTP layer: kept bf16 or quantized (main model K = 3, lm_head K = 6)\n")
        L.append("| variant | MTP stored bits / weight | model.safetensors | MTP draft agreement, prose (CPU) | accuracy | "
                 "agreement, chat (GPU) | speculative acceptance K = 1 / 2 / 3 (GPU) | main model |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in sorted(mt, key=lambda r: (r["family"] != "bf16", -kind(r["variant"])[1])):
            mb = r.get("mtp_stored_bits_per_weight")
            mb = "16 (bf16)" if mb is None else f"{mb:.3f}"
            size = f"{r['model_bytes'] / 1e6:.2f} MB" if "model_bytes" in r else ("18.56 MB" if r["variant"] == "bf16" else "?")
            acc = r.get("spec_acceptance", {})
            accs = " / ".join(f"{100 * acc[k]:.1f} %" for k in sorted(acc)) if acc else "—"
            same = r.get("main_vs_s3", r.get("vs_shipped", ""))
            L.append(f"| {r['label']} | {mb} | {size} | {fmt(None if 'mtp_agreement' not in r else 100 * r['mtp_agreement'], '.2f')} % | "
                     f"{fmt(None if 'mtp_accuracy' not in r else 100 * r['mtp_accuracy'], '.2f')} % | "
                     f"{fmt(None if 'chat_mtp_agreement' not in r else 100 * r['chat_mtp_agreement'], '.2f')} % | {accs} | "
                     f"{same.split(' ')[0] if same else ''} |")
    return "\n".join(L) + "\n"


def svg(rows, ref):
    """Two panels against stored bits per real weight: mean KL (log scale) and perplexity vs bf16 (%)."""
    series = [("trellis", "#d62728", True)] + [(f, c, True) for f, c in (
        ("RTN sym g128", "#1f77b4"), ("RTN sym g64", "#17becf"), ("RTN sym g32", "#2ca02c"),
        ("RTN asym g128", "#9467bd"), ("RTN asym g32", "#8c564b"))] + [("trellis, no calibration", "#ff7f0e", False)]
    data = {f: curve(rows, f) for f, _, _ in series}
    if not any(data.values()):
        return None
    W, H, M = 460, 320, 55
    xs = [r["stored_bits_per_weight"] for v in data.values() for r in v]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    kls = [r["mean_kl"] for v in data.values() for r in v if r["mean_kl"] > 0]
    k0, k1 = math.floor(math.log10(min(kls))), math.ceil(math.log10(max(kls)))
    pps = [r["vs_bf16_pct"] for v in data.values() for r in v]
    p0, p1 = min(0.0, min(pps)), min(max(pps), 10.0)  # clipped: the int2 rows would flatten the rest
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 40}" font-family="sans-serif" font-size="11">']

    def panel(ox, title, ymap, yticks):
        X = lambda x: ox + M + (x - x0) / (x1 - x0) * (W - M - 15)  # noqa: E731
        out.append(f'<text x="{ox + W / 2}" y="14" text-anchor="middle" font-size="13">{title}</text>')
        out.append(f'<rect x="{ox + M}" y="25" width="{W - M - 15}" height="{H - 55}" fill="none" stroke="#888"/>')
        for xt in range(x0, x1 + 1):
            out.append(f'<line x1="{X(xt):.1f}" y1="{H - 30}" x2="{X(xt):.1f}" y2="25" stroke="#eee"/>')
            out.append(f'<text x="{X(xt):.1f}" y="{H - 16}" text-anchor="middle">{xt}</text>')
        for yv, lab in yticks:
            out.append(f'<line x1="{ox + M}" y1="{ymap(yv):.1f}" x2="{ox + W - 15}" y2="{ymap(yv):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{ox + M - 4}" y="{ymap(yv) + 4:.1f}" text-anchor="end">{lab}</text>')
        out.append(f'<text x="{ox + W / 2}" y="{H - 2}" text-anchor="middle">stored bits per real weight (decoder Linears)</text>')
        return X

    def plot(X, ymap, key):
        for f, col, line in series:
            pts = [(X(r["stored_bits_per_weight"]), ymap(r[key])) for r in data[f] if key != "mean_kl" or r[key] > 0]
            if line and len(pts) > 1:
                out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.5" points="' +
                           " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
            for x, y in pts:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{col}"/>')

    ykl = lambda v: 25 + (k1 - math.log10(v)) / (k1 - k0) * (H - 55)  # noqa: E731
    X = panel(0, "mean KL(bf16 || variant), nats", ykl, [(10.0 ** e, f"1e{e}") for e in range(k0, k1 + 1)])
    plot(X, ykl, "mean_kl")
    ypp = lambda v: 25 + (p1 - min(v, p1)) / ((p1 - p0) or 1) * (H - 55)  # noqa: E731
    step = max(0.5, round((p1 - p0) / 6 * 2) / 2)
    X = panel(W, (f"perplexity vs bf16 ({ref:.3f}), %" if ref else "perplexity vs bf16, %") + " (clipped at +10)", ypp,
              [(v * step, f"{v * step:+g}") for v in range(int(math.floor(p0 / step)), int(math.ceil(p1 / step)) + 1)])
    plot(X, ypp, "vs_bf16_pct")
    for i, (f, col, _) in enumerate(s for s in series if data[s[0]]):
        out.append(f'<circle cx="{2 * W - 165}" cy="{40 + 14 * i}" r="3" fill="{col}"/>'
                   f'<text x="{2 * W - 157}" y="{44 + 14 * i}">{f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


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
    ap.add_argument("--svg")
    args = ap.parse_args()
    rows, ref = records(args.logs)
    md = markdown(rows, ref)
    if args.jsonl:
        write(args.jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if args.markdown:
        write(args.markdown, md)
    if args.svg:
        s = svg(rows, ref)
        if s:
            write(args.svg, s)
    print(md, end="")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Ablations of an EXL3 model: take the Linears of some parts of the model from another checkpoint.

`--base` is an EXL3 directory made by `trellm quantize`; `--donor` is either another EXL3 directory of the same
model (e.g. the same calibration at a higher K) or the unquantized HF checkpoint it was made from. For every
Linear of the chosen `--parts`, the base's tensors (suh, svh, trellis, bias, codebook marker) are dropped and
the donor's tensors of that Linear (trellis-coded, or the dense `.weight`) are written instead; everything else
is the base's, byte for byte. The loader decides per Linear from the tensors present (docs/format.md), so the
result is a valid mixed model.

Because `trellm quantize` captures every Hessian from the unquantized model and seeds each Linear's sign flips
with seed + its index, a Linear's codes do not depend on the K of the others: mixing the K=3 and K=4 outputs
of one calibration gives exactly the files a quantize run with those per-part K would write.

Parts: attention (q_a/q_b/q, kv_a_proj_with_mqa, kv_b, o_proj), dense (layer 0's MLP), shared (shared experts),
experts (routed experts), head (lm_head).

Usage: python3 scripts/exl3_mix.py --base Q3 --donor models/tiny-glm --parts attention --out Q3_attn_bf16
"""
import argparse
import json
import os
import re
import shutil
import struct

ATTN = r"model\.layers\.\d+\.self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
PARTS = {
    "attention": ATTN,
    "dense": r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    "shared": r"model\.layers\.\d+\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)",
    "experts": r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)",
    "head": r"lm_head",
}
SUFFIXES = ("weight", "suh", "svh", "trellis", "bias", "mcg", "mul1")


def read_safetensors(d):
    """[(name, dtype, shape, bytes)] of every tensor of a model directory (one file or an index of shards)."""
    files = ["model.safetensors"]
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        files = sorted(set(json.load(open(idx))["weight_map"].values()))
    out = []
    for fn in files:
        with open(os.path.join(d, fn), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = f.read()
        header.pop("__metadata__", None)
        for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = h["data_offsets"]
            out.append((name, h["dtype"], h["shape"], data[a:b]))
    return out


def write_safetensors(path, tensors):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, _, raw in tensors:
            f.write(raw)


def linear_key(name, parts):
    """The module key when `name` is a tensor of a Linear of one of `parts`, else None."""
    module, _, suffix = name.rpartition(".")
    if suffix not in SUFFIXES:
        return None
    for p in parts:
        if re.fullmatch(PARTS[p], module):
            return module
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--donor", required=True)
    ap.add_argument("--parts", required=True, help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    parts = args.parts.split(",")
    for p in parts:
        if p not in PARTS:
            raise SystemExit(f"--parts: unknown part {p!r} (known: {', '.join(PARTS)})")
    base, donor = read_safetensors(args.base), read_safetensors(args.donor)
    from_donor = {}
    for t in donor:
        k = linear_key(t[0], parts)
        if k:
            from_donor.setdefault(k, []).append(t)
    out, replaced = [], set()
    for t in base:
        k = linear_key(t[0], parts)
        if k is None:
            out.append(t)
        elif k not in replaced:
            if k not in from_donor:
                raise SystemExit(f"{args.donor}: has no tensors of {k}")
            out.extend(from_donor[k])
            replaced.add(k)
    if not replaced:
        raise SystemExit(f"{args.base}: no Linear of parts {parts}")
    os.makedirs(args.out, exist_ok=True)
    for f in os.listdir(args.base):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(args.base, f), os.path.join(args.out, f))
    write_safetensors(os.path.join(args.out, "model.safetensors"), out)
    # quantization_config.bits: the real average K of the decoder Linears (128-padded numel), dense = 16.
    num = den = 0
    for name, dtype, shape, _ in out:
        module, _, suffix = name.rpartition(".")
        if module == "lm_head" or not re.fullmatch(r"model\.layers\.\d+\..*", module):
            continue
        if suffix == "trellis":
            n = shape[0] * 16 * shape[1] * 16
            num, den = num + n * shape[2] // 16, den + n
        elif suffix == "weight" and linear_key(name, list(PARTS)) and len(shape) == 2:
            n = -(-shape[0] // 128) * 128 * -(-shape[1] // 128) * 128
            num, den = num + 16 * n, den + n
    cfg = json.load(open(os.path.join(args.base, "config.json")))
    cfg["quantization_config"]["bits"] = round(num / den, 4)
    json.dump(cfg, open(os.path.join(args.out, "config.json"), "w"), indent=2)
    qc_path = os.path.join(args.out, "quantization_config.json")
    if os.path.exists(qc_path):  # tensor_storage lists the trellis-coded Linears: the donor's entries for ours
        qc = json.load(open(qc_path))
        qc["bits"] = cfg["quantization_config"]["bits"]
        donor_qc = os.path.join(args.donor, "quantization_config.json")
        donor_storage = json.load(open(donor_qc)).get("tensor_storage", {}) if os.path.exists(donor_qc) else {}
        for k in replaced:
            qc.get("tensor_storage", {}).pop(k, None)
            if k in donor_storage:
                qc["tensor_storage"][k] = donor_storage[k]
        json.dump(qc, open(qc_path, "w"), indent=2)
    print(f"{args.out}: {len(replaced)} Linears of {','.join(parts)} from {args.donor}; decoder average "
          f"{num / den:.3f} bits")


if __name__ == "__main__":
    main()

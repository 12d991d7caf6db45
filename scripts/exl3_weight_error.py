#!/usr/bin/env python3
"""Relative weight error of an EXL3 model against the checkpoint it was quantized from, per part:
sum ||W - W_hat||^2 / sum ||W||^2 over the Linears of each part, where W_hat is decoded from the stored trellis
with the independent numpy decoder tests/py/exl3_numpy.py (TRELLIS.md §1-§3, MCG codebook; the decoder
test_quantize.py checks trellm's files with). The "decoder" total covers the same Linears as
scripts/rtn_quantize.py's relative_weight_mse (every Linear of the decoder layers), so the two are comparable;
lm_head is reported on its own.

Also the storage of the decoder Linears: "decoder_bits" = the average K weighted by real weights (out x in),
"decoder_stored_bpw" = bits of their EXL3 tensors (trellis, suh, svh, mcg) per real weight; it is above K because
the format pads every dimension to 128 (the built-in model's 64-wide expert down_proj doubles) and adds the fp16
channel scales; "decoder_padded_bpw" = the same bits per stored (128-padded) weight, what the format costs on
shapes that need no padding. A quantized MTP layer (model.layers.<num_hidden_layers>.*) is its own part "mtp"
(error, and "mtp_bits" / "mtp_stored_bpw" as above), outside the decoder totals.

Usage: python3 scripts/exl3_weight_error.py --model Q --source models/tiny-glm [--json]
Needs numpy only. Single-file checkpoints (model.safetensors), as the built-in model's.
"""
import argparse
import json
import os
import re
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "py"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from exl3_numpy import dequantize  # noqa: E402
from rtn_quantize import bf16_to_f32  # noqa: E402

PARTS = [("attention", r"model\.layers\.\d+\.self_attn\..*"),
         ("shared expert", r"model\.layers\.\d+\.mlp\.shared_experts\..*"),
         ("routed experts", r"model\.layers\.\d+\.mlp\.experts\..*"),
         ("dense mlp", r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"),
         ("lm_head", r"lm_head")]


def tensors(path):
    """{name: numpy array} of one safetensors file (BF16 as f32, F16, F32, I16, I32)."""
    dt = {"F16": np.float16, "F32": np.float32, "I16": np.int16, "I32": np.int32, "BF16": np.uint16}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        v = np.frombuffer(data[a:b], dtype=dt[h["dtype"]]).reshape(h["shape"])
        out[name] = bf16_to_f32(v) if h["dtype"] == "BF16" else v
    return out


def weight_error(model, source):
    for d in (model, source):
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            raise SystemExit(f"{d}: no model.safetensors (sharded checkpoints are not handled)")
    q, src = tensors(os.path.join(model, "model.safetensors")), tensors(os.path.join(source, "model.safetensors"))
    layers = json.load(open(os.path.join(source, "config.json")))["num_hidden_layers"]
    parts = [p for p in PARTS]
    parts.insert(0, ("mtp", r"model\.layers\.(%s)\..*" % "|".join(str(layers + k) for k in range(8))))
    err, energy = {}, {}
    weights = stored_bits = k_weighted = padded = 0
    mtp_weights = mtp_bits = mtp_k = 0
    for name in sorted(q):
        if not name.endswith(".trellis"):
            continue
        key = name[:-len(".trellis")]
        w = src[key + ".weight"].astype(np.float64)  # [out, in]
        out_dim, in_dim = w.shape
        w_hat = dequantize(q, key)[:in_dim, :out_dim].T
        part = next(p for p, rx in parts if re.fullmatch(rx, key))
        err[part] = err.get(part, 0.0) + float(((w - w_hat) ** 2).sum())
        energy[part] = energy.get(part, 0.0) + float((w ** 2).sum())
        bits = 8 * sum(q[key + t].nbytes for t in (".trellis", ".suh", ".svh", ".mcg") if key + t in q)
        if part == "mtp":
            mtp_weights += w.size
            mtp_k += w.size * (q[name].shape[-1] // 16)
            mtp_bits += bits
        elif part != "lm_head":
            weights += w.size
            k_weighted += w.size * (q[name].shape[-1] // 16)
            stored_bits += bits
            padded += q[key + ".suh"].size * q[key + ".svh"].size
    if not err:
        raise SystemExit(f"{model}: no trellis-coded Linears")
    res = {p: err[p] / energy[p] for p in err}
    dec = [p for p in err if p not in ("lm_head", "mtp")]
    res["decoder"] = sum(err[p] for p in dec) / sum(energy[p] for p in dec)
    res["decoder_weights"] = weights
    res["decoder_bits"] = k_weighted / weights
    res["decoder_stored_bpw"] = stored_bits / weights
    res["decoder_padded_bpw"] = stored_bits / padded
    if mtp_weights:
        res["mtp_weights"] = mtp_weights
        res["mtp_bits"] = mtp_k / mtp_weights
        res["mtp_stored_bpw"] = mtp_bits / mtp_weights
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = weight_error(args.model, args.source)
    if args.json:
        print(json.dumps(res))
    else:
        for p, v in res.items():
            print(f"{p:20s} {v:.6g}" if p.startswith(("decoder_", "mtp_")) else f"{p:20s} {100 * v:7.3f} %")


if __name__ == "__main__":
    main()

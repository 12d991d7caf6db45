#!/usr/bin/env python3
"""Round-to-nearest (RTN) baselines for the quantization quality table: writes a fake-quantized copy of a bf16
Glm4MoeLite checkpoint, i.e. a dense checkpoint whose linear weights hold the values an int-K group-G RTN format
would reconstruct, so `trellm perplexity --model OUT --ref BF16` measures what that format costs.

Schemes (the usual "intK gG" baselines): for every linear weight W [out, in] of the decoder layers (attention
projections, dense MLP, routed and shared experts), each row is cut into groups of G consecutive inputs, and
  sym  (--scheme sym, default): a group gets one scale s = max|w| / (2^(K-1) - 1), rounded to fp16 as a real
       format would store it; w -> s * clamp(round(w / s), -2^(K-1), 2^(K-1) - 1). Stores K bits a weight and
       16 bits a group (llama.cpp's Q4_0 is this at K = 4, G = 32).
  asym (--scheme asym): min/max over the group, s = (max - min) / (2^K - 1) in fp16 and an integer zero point
       z = clamp(round(-min / s), 0, 2^K - 1) of K bits; w -> s * (clamp(round(w / s) + z, 0, 2^K - 1) - z), so all
       2^K levels are used (GPTQ / AWQ store intK this way). Stores K bits a weight and 16 + K bits a group.
Each weight is stored back in bf16 (the checkpoint's dtype; that rounding adds a relative error below 2^-9, far
under the quantization step). Rows shorter than G (e.g. down_proj of 64-wide experts) form one group each, and a
row whose length is not a multiple of G ends with a shorter group: rtn.json's stored_bits_per_weight counts that
exactly (every group's scale and zero over the real weights), bits_per_weight is the nominal K + overhead / G.
Kept in bf16, as EXL3 keeps them: embeddings, lm_head, norms, router weights, the f32 selection bias, and the MTP
layer (model.layers.<num_hidden_layers>.*: perplexity does not run it).

Usage: python3 scripts/rtn_quantize.py --model models/tiny-glm --bits 4 --group 128 [--scheme asym] --out DIR
Needs numpy only (reads and writes safetensors directly: numpy has no bfloat16).
"""
import argparse
import json
import os
import shutil

import numpy as np


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f):
    """Round to nearest even, as torch does."""
    u = f.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def rtn(w, bits, group, scheme="sym"):
    """Fake-quantizes w [out, in] (f32) per row in groups of `group` inputs; returns f32. A row whose length is
    not a multiple of the group ends with a shorter group (the padding zeros take no part in its min/max)."""
    out_dim, in_dim = w.shape
    g = min(group, in_dim)
    pad = (-in_dim) % g
    wp = np.pad(w, ((0, 0), (0, pad))).reshape(out_dim, -1, g)
    if scheme == "sym":
        qmax = 2 ** (bits - 1) - 1
        scale = (np.abs(wp).max(-1, keepdims=True) / qmax).astype(np.float16).astype(np.float32)
        scale[scale == 0] = 1.0  # an all-zero group stays zero
        q = np.clip(np.round(wp / scale), -qmax - 1, qmax)
        return (q * scale).reshape(out_dim, -1)[:, :in_dim]
    if scheme != "asym":
        raise ValueError(f"unknown scheme {scheme!r}")
    valid = np.pad(np.ones_like(w, dtype=bool), ((0, 0), (0, pad))).reshape(out_dim, -1, g)
    lo = np.where(valid, wp, np.inf).min(-1, keepdims=True)
    hi = np.where(valid, wp, -np.inf).max(-1, keepdims=True)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # zero stays exactly representable
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).astype(np.float16).astype(np.float32)
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(wp / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(out_dim, -1)[:, :in_dim]


def stored_bits(shape, bits, group, scheme="sym"):
    """Bits the format stores for a weight [out, in]: K per weight, and per group an fp16 scale (+ a K-bit zero)."""
    out_dim, in_dim = shape
    g = min(group, in_dim)
    groups = out_dim * (-(-in_dim // g))
    return bits * out_dim * in_dim + groups * (16 + (bits if scheme == "asym" else 0))


def is_quantized(name, shape, num_hidden_layers=None):
    """Every 2-D weight of the decoder layers but the router: the Linears `trellm quantize` trellis-codes
    (attention projections including kv_a_proj_with_mqa, dense MLP, routed and shared experts); not those of the
    MTP layer(s), model.layers.<l>.* with l >= num_hidden_layers."""
    if not (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2
            and not name.endswith(".mlp.gate.weight")):
        return False
    return num_hidden_layers is None or int(name.split(".")[2]) < num_hidden_layers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--scheme", choices=["sym", "asym"], default="sym")
    args = ap.parse_args()
    if not 1 <= args.bits <= 8 or (args.scheme == "sym" and args.bits < 2):
        raise SystemExit(f"--bits {args.bits}: sym needs 2..8, asym 1..8")
    layers = json.load(open(os.path.join(args.model, "config.json")))["num_hidden_layers"]
    if not os.path.exists(os.path.join(args.model, "model.safetensors")) or \
            os.path.exists(os.path.join(args.model, "model.safetensors.index.json")):
        raise SystemExit(f"{args.model}: expected a single model.safetensors (sharded checkpoints are not handled)")
    os.makedirs(args.out, exist_ok=True)
    for f in os.listdir(args.model):
        if f != "model.safetensors" and os.path.isfile(os.path.join(args.model, f)):
            shutil.copy(os.path.join(args.model, f), os.path.join(args.out, f))
    tensors, n_q, n_kept, err, energy, n_bits = {}, 0, 0, 0.0, 0.0, 0
    dtypes = read_dtypes(args.model)
    header, _ = _header(os.path.join(args.model, "model.safetensors"))
    for name, dtype in dtypes.items():
        shape = header[name]["shape"]
        raw = read_raw(args.model, name)
        if dtype == "BF16" and is_quantized(name, shape, layers):
            w = bf16_to_f32(raw.view(np.uint16)).reshape(shape)
            wq = rtn(w, args.bits, args.group, args.scheme)
            n_bits += stored_bits(shape, args.bits, args.group, args.scheme)
            err += float(((wq - w) ** 2).sum())
            energy += float((w ** 2).sum())
            raw = f32_to_bf16(wq).view(np.uint8)
            n_q += w.size
        else:
            n_kept += int(np.prod(shape))
        tensors[name] = (raw, shape)
    write_safetensors(tensors, os.path.join(args.out, "model.safetensors"), dtypes)
    what = "symmetric, fp16 scale" if args.scheme == "sym" else f"asymmetric, fp16 scale + {args.bits}-bit zero"
    overhead = 16 + (args.bits if args.scheme == "asym" else 0)
    info = {"method": f"RTN int{args.bits} g{args.group} ({what})", "scheme": args.scheme, "bits": args.bits,
            "group": args.group, "bits_per_weight": args.bits + overhead / args.group,
            "stored_bits_per_weight": n_bits / n_q if n_q else 0.0, "quantized_params": n_q, "kept_params": n_kept,
            "relative_weight_mse": err / energy if energy else 0.0, "source": args.model}
    with open(os.path.join(args.out, "rtn.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


# numpy cannot hold bf16, so the file format is read and written directly (it is simple: an 8-byte
# little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data).
def _header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def read_dtypes(model):
    h, _ = _header(os.path.join(model, "model.safetensors"))
    return {k: v["dtype"] for k, v in h.items() if k != "__metadata__"}


def read_raw(model, name):
    """The tensor's bytes as uint8."""
    path = os.path.join(model, "model.safetensors")
    h, base = _header(path)
    a, b = h[name]["data_offsets"]
    with open(path, "rb") as f:
        f.seek(base + a)
        return np.frombuffer(f.read(b - a), dtype=np.uint8).copy()


def write_safetensors(tensors, path, dtypes):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        raw, shape = tensors[name]
        data = raw.tobytes()
        header[name] = {"dtype": dtypes[name], "shape": list(shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for d in blobs:
            f.write(d)


if __name__ == "__main__":
    main()

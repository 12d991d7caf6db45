#!/usr/bin/env python3
"""Round-to-nearest (RTN) baselines for the quantization quality table: writes a fake-quantized copy of a bf16
Glm4MoeLite checkpoint, i.e. a dense checkpoint whose linear weights hold the values an int-K group-G RTN format
would reconstruct, so `trellm perplexity --model OUT --ref BF16` measures what that format costs.

Scheme (the usual "intK g128" baseline): for every linear weight W [out, in] of the decoder layers (attention
projections, dense MLP, routed and shared experts), each row is cut into groups of G consecutive inputs; a group
gets one scale s = max|w| / (2^(K-1) - 1), rounded to fp16 as a real format would store it, and every weight
becomes s * clamp(round(w / s), -2^(K-1), 2^(K-1) - 1), stored back in bf16 (the checkpoint's dtype; that
rounding adds a relative error below 2^-9, far under the quantization step). Storage cost: K + 16/G bits per weight.
Kept in bf16, as EXL3 keeps them: embeddings, lm_head, norms, router weights and the f32 selection bias.
Rows shorter than G (e.g. down_proj of 64-wide experts) form one group each.

Usage: python3 scripts/rtn_quantize.py --model models/tiny-glm --bits 4 --group 128 --out /tmp/tiny-glm-rtn4
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


def rtn(w, bits, group):
    """Fake-quantizes w [out, in] (f32) per row in groups of `group` inputs; returns f32."""
    out_dim, in_dim = w.shape
    g = min(group, in_dim)
    pad = (-in_dim) % g
    wp = np.pad(w, ((0, 0), (0, pad))).reshape(out_dim, -1, g)
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(wp).max(-1, keepdims=True) / qmax).astype(np.float16).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero group stays zero
    q = np.clip(np.round(wp / scale), -qmax - 1, qmax)
    return (q * scale).reshape(out_dim, -1)[:, :in_dim]


def is_quantized(name, shape):
    """Every 2-D weight of the decoder layers but the router: the Linears `trellm quantize` trellis-codes
    (attention projections including kv_a_proj_with_mqa, dense MLP, routed and shared experts)."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2
            and not name.endswith(".mlp.gate.weight"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.model, "model.safetensors")) or \
            os.path.exists(os.path.join(args.model, "model.safetensors.index.json")):
        raise SystemExit(f"{args.model}: expected a single model.safetensors (sharded checkpoints are not handled)")
    os.makedirs(args.out, exist_ok=True)
    for f in os.listdir(args.model):
        if f != "model.safetensors" and os.path.isfile(os.path.join(args.model, f)):
            shutil.copy(os.path.join(args.model, f), os.path.join(args.out, f))
    tensors, n_q, n_kept, err, energy = {}, 0, 0, 0.0, 0.0
    dtypes = read_dtypes(args.model)
    header, _ = _header(os.path.join(args.model, "model.safetensors"))
    for name, dtype in dtypes.items():
        shape = header[name]["shape"]
        raw = read_raw(args.model, name)
        if dtype == "BF16" and is_quantized(name, shape):
            w = bf16_to_f32(raw.view(np.uint16)).reshape(shape)
            wq = rtn(w, args.bits, args.group)
            err += float(((wq - w) ** 2).sum())
            energy += float((w ** 2).sum())
            raw = f32_to_bf16(wq).view(np.uint8)
            n_q += w.size
        else:
            n_kept += int(np.prod(shape))
        tensors[name] = (raw, shape)
    write_safetensors(tensors, os.path.join(args.out, "model.safetensors"), dtypes)
    info = {"method": f"RTN int{args.bits} g{args.group} (symmetric, fp16 scale)", "bits_per_weight":
            args.bits + 16 / args.group, "quantized_params": n_q, "kept_params": n_kept,
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

"""The trellm CLI end to end: greedy ids equal transformers' (tests/data/hf/*/reference.safetensors),
seeded sampling is reproducible, inspect counts parameters like safetensors does, bad input fails cleanly."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import DATA, trellm

FIXTURES = ["tiny_a", "tiny_a_fused", "tiny_b", "tiny_odd", "tiny_groups"]


@pytest.mark.parametrize("name", FIXTURES)
def test_run_greedy_matches_transformers(name):
    d = os.path.join(DATA, "hf", name)
    ref = load_file(os.path.join(d, "reference.safetensors"))
    prompt = ",".join(str(int(t)) for t in ref["prompt_ids"])
    want = [int(t) for t in ref["decode_tokens"]]
    _, out, err = trellm("run", "--model", d, "--prompt-ids", prompt, "--temperature", 0, "-n", len(want),
                         "--print-ids", "--ignore-eos")
    assert [int(t) for t in out.split()] == want
    assert "tok/s" in err


def test_default_model_and_sampling_reproducible():
    _, a, err = trellm("run", "--prompt-ids", "5,6,7", "-n", 24, "--seed", 42, "--temperature", 1.0, "--print-ids",
                       "--ignore-eos")
    assert "built-in model" in err
    _, b, _ = trellm("run", "--prompt-ids", "5,6,7", "-n", 24, "--seed", 42, "--temperature", 1.0, "--print-ids",
                     "--ignore-eos")
    _, c, _ = trellm("run", "--prompt-ids", "5,6,7", "-n", 24, "--seed", 43, "--temperature", 1.0, "--print-ids",
                     "--ignore-eos")
    assert a == b and len(a.split()) == 24
    assert a != c


def test_top_k_1_is_greedy():
    _, greedy, _ = trellm("run", "--prompt-ids", "9,8,7", "-n", 12, "--temperature", 0, "--print-ids", "--ignore-eos")
    _, topk, _ = trellm("run", "--prompt-ids", "9,8,7", "-n", 12, "--temperature", 0.7, "--top-k", 1, "--seed", 3,
                        "--print-ids", "--ignore-eos")
    assert greedy == topk


def test_stops_at_every_eos_id():
    # tiny_a has eos ids [318, 319]; ask for many tokens and check we stop right after the first EOS, if any.
    d = os.path.join(DATA, "hf", "tiny_a")
    eos = set(json.load(open(os.path.join(d, "config.json")))["eos_token_id"])
    for seed in range(1, 30):
        _, out, _ = trellm("run", "--model", d, "--prompt-ids", "1,2", "-n", 200, "--seed", seed, "--temperature", 3.0,
                           "--print-ids")
        ids = [int(t) for t in out.split()]
        hits = [i for i, t in enumerate(ids) if t in eos]
        if hits:
            assert hits[0] == len(ids) - 1, "generation went on past an EOS id"
            return
    pytest.skip("no EOS sampled in 30 seeds")


def test_inspect_counts_parameters(data_dir):
    d = os.path.join(data_dir, "hf", "tiny_b")
    _, out, _ = trellm("inspect", d)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    total = sum(int(np.prod(t.shape)) for t in tensors.values())
    line = [l for l in out.splitlines() if l.strip().startswith("total")][0]
    assert int(line.split()[1]) == total
    assert "routed experts" in out and "F32" in out


def header_shapes(path):
    """{name: (dtype, shape)} from a safetensors header (bf16 needs no decoding)."""
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    return {k: (v["dtype"], v["shape"]) for k, v in h.items() if k != "__metadata__"}


@pytest.mark.parametrize("model,dense_mtp_linears", [("tiny-glm", None), ("tiny-glm-3bit", 34)])
def test_inspect_shows_the_mtp_layer(model, dense_mtp_linears):
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", model)
    _, out, _ = trellm("inspect", d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    prefix = f"model.layers.{cfg['num_hidden_layers']}."
    mtp = {k: v for k, v in header_shapes(os.path.join(d, "model.safetensors")).items() if k.startswith(prefix)}
    params = sum(int(np.prod(s)) for _, s in mtp.values())
    line = [l for l in out.splitlines() if l.strip().startswith("MTP layer 0")]
    assert line and f"{prefix}*: {len(mtp)} tensors" in line[0], out
    assert f"{params / 1e6:.3f} M parameters" in line[0], (line, params)
    # the parameter table splits it like a decoder layer, and none of it is read per decoded token
    lines = [l.split() for l in out.splitlines() if l.startswith("    mtp ")]
    rows = {" ".join(w[:w.index(next(x for x in w if x[0].isdigit()))]): w for w in lines if not w[1].isdigit()}
    table = [w for w in lines if w[1].isdigit()]  # the trellis table's "mtp" row: counts per K, then dense
    assert {"mtp attention", "mtp routed experts", "mtp shared expert", "mtp eh_proj", "mtp shared_head"} <= set(rows), out
    assert all(r[-1] == "0" for r in rows.values()), rows
    if dense_mtp_linears:  # the 3-bit model keeps the MTP layer in bf16: its Linears are counted as dense
        assert len(table) == 1 and int(table[0][-1]) == dense_mtp_linears and set(table[0][1:-1]) == {"0"}, out
    else:
        assert not table


def test_inspect_without_mtp_layer():
    _, out, _ = trellm("inspect", os.path.join(DATA, "hf", "tiny_a"))
    assert "MTP layer" not in out and "    mtp " not in out


@pytest.mark.parametrize("args,phrase", [
    (["run", "--model", "/nonexistent", "--prompt-ids", "1"], "/nonexistent"),
    (["run", "--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["run", "--prompt-ids", "1,x"], "\"x\" is not a token id"),
    (["run", "--prompt-ids", "1", "--top-p", "0"], "top_p"),
    (["run", "--prompt-ids", "1", "--device", "tpu"], "unknown device"),
    (["inspect", "/nonexistent"], "/nonexistent"),
])
def test_bad_input_is_a_clear_error(args, phrase):
    rc, out, err = trellm(*args, check=False)
    assert rc == 1, (rc, err)
    assert phrase in err, err
    assert "internal error" not in err

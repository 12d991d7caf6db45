"""`trellm quantize` end to end on tests/data/hf/tiny_a: the EXL3 directory it writes is read back by the
`safetensors` package and decoded by an independent numpy implementation of TRELLIS.md (state windows, MCG
codebook, tensor-core walk order, 128-block Hadamards), `trellm inspect` shows the K table, `trellm run` works,
an interrupted run leaves no complete-looking output and a rerun finishes with identical files, text
calibration is tokenized like HF `tokenizers` does, and bad input gives clear errors."""
import filecmp
import json
import os
import shutil

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for the BF16 tensors of tiny_a)
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import DATA, trellm
from exl3_numpy import MCG_MUL, dequantize, mcg, states_of  # noqa: F401  (the independent EXL3 decoder)

TINY = os.path.join(DATA, "hf", "tiny_a")
TOKENIZER = os.path.join(DATA, "tokenizers", "glm4-synthetic", "tokenizer.json")
# Fast settings: --no-scale-search (the search encodes more sample tiles than tiny_a's Linears hold).
ARGS = ["--bits", "3.5", "--no-scale-search", "--seq-len", "128"]


def r128(n):
    return (n + 127) // 128 * 128


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, calib):
    out = str(tmp_path_factory.mktemp("q") / "tiny_a-exl3")
    _, _, err = trellm("quantize", "--model", TINY, "--out", out, "--calibration", calib, *ARGS,
                       "--trace", os.path.join(os.path.dirname(out), "trace.json"))
    return out, err


def source_linears():
    """Module key -> HF weight [out, in] for every Linear of the source (2-D .weight but embedding and router)."""
    src = load_file(os.path.join(TINY, "model.safetensors"))
    return {k[:-7]: v for k, v in src.items()
            if v.ndim == 2 and k != "model.embed_tokens.weight" and ".mlp.gate.weight" not in k}, src


def test_decoder_matches_spec_test_vectors():
    # TRELLIS.md §2.2 (MCG column) and §1.3 (K = 4 stream bytes 0x00..0x7F -> states)
    got = mcg(np.array([0x0000, 0x0001, 0x1234, 0x8000, 0xFFFF], np.uint64)).view(np.uint16)
    assert [hex(v) for v in got] == ["0x3f60", "0x304e", "0x3e0f", "0xb915", "0x3acd"]
    stream = bytes(range(128))
    words = np.frombuffer(stream, ">u4").astype(np.uint32)  # MSB-first stream -> uint32 words
    i16 = words.view(np.uint16).reshape(1, 1, 64)  # little-endian halves: low half first
    assert [hex(v) for v in i16[0, 0, :4]] == ["0x203", "0x1", "0x607", "0x405"]
    s = states_of(i16.view(np.int16))[0, 0]
    assert [hex(int(v)) for v in (s[0], s[1], s[2], s[3], s[7])] == ["0xe7f0", "0x7f00", "0xf000", "0x1", "0x203"]


def test_progress_covers_the_calibration_and_the_encoding(quantized):
    """Not a terminal here, so the bar prints a line per 10 %: the capture pass's tokens, then the Linears."""
    _, err = quantized
    lines = err.splitlines()
    capture = [l for l in lines if "calibration tokens (pass 1)" in l]
    encode = [l for l in lines if " Linears, " in l and "ETA" in l]
    assert capture and "100% 384/384 calibration tokens (pass 1)" in capture[-1], err
    assert encode and encode[-1].startswith("[" + "#" * 30 + "] 100% 29/29 Linears"), err
    assert lines.index(capture[-1]) < lines.index(encode[0])  # the capture comes first


def test_trace_shows_each_threads_work(quantized):
    """--trace: Chrome trace-event JSON; every Linear's group rotated, given its Hessians, factored, encoded and
    written, each layer observed, the spans of a row not overlapping unless nested (one thread does one thing)."""
    out, _ = quantized
    with open(os.path.join(os.path.dirname(out), "trace.json")) as f:
        events = json.load(f)["traceEvents"]
    rows = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    spans = [e for e in events if e["ph"] == "X"]
    assert "main" in rows.values() and spans
    assert all(e["tid"] in rows and e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    names = [e["name"] for e in spans]
    with open(os.path.join(out, "quantization_config.json")) as f:
        linears = set(json.load(f)["tensor_storage"])
    grouped = {n.split(" ", 1)[1].split(" +")[0] for n in names if n.startswith("encode ")}
    firsts = {n.split(" ", 1)[1].split(" +")[0] for n in names if n.startswith("rotate model.") or
              n.startswith("rotate lm_head")}
    assert grouped and grouped == firsts and grouped <= linears, (grouped, firsts)
    covered = sum(1 + int(n.split(" +")[1]) if " +" in n else 1 for n in names if n.startswith("encode "))
    assert covered == len(linears)
    for what in ("write files", "Hessian out", "write the model", "observed pass through layer 0",
                 "quantized pass through layer 0"):
        assert what in names, what
    assert any(n.startswith("block LDL of ") for n in names) and any(n.startswith("LDLQ of ") for n in names)
    for tid in rows:
        row = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e["tid"] == tid)
        stack = []
        for t0, t1 in row:
            while stack and stack[-1] <= t0 + 1e-3:
                stack.pop()
            assert not stack or t1 <= stack[-1] + 1e-3, (rows[tid], t0, t1, stack)  # nested or after
            stack.append(t1)


def test_writes_an_exl3_directory(quantized):
    out, err = quantized
    assert not os.path.exists(out + ".partial")
    files = sorted(os.listdir(out))
    assert "config.json" in files and "model.safetensors" in files and "quantization_config.json" in files
    assert filecmp.cmp(os.path.join(out, "generation_config.json"), os.path.join(TINY, "generation_config.json"), False)
    cfg = json.load(open(os.path.join(out, "config.json")))
    src_cfg = json.load(open(os.path.join(TINY, "config.json")))
    qc = cfg.pop("quantization_config")
    assert cfg == src_cfg  # nothing else changed
    assert qc["quant_method"] == "exl3" and qc["head_bits"] == 6 and qc["codebook"] == "mcg"
    assert qc["calibration"] == {"rows": 3, "cols": 128} and qc["out_scales"] == "always"
    assert qc["version"].startswith("trellm")
    # bits = the real K average of the decoder Linears, weighted by 128-padded numel (as exllamav3 counts)
    t = load_file(os.path.join(out, "model.safetensors"))
    lin, _ = source_linears()
    num = den = 0
    for key, w in lin.items():
        if key == "lm_head":
            continue
        n = r128(w.shape[0]) * r128(w.shape[1])
        num += n * t[key + ".trellis"].shape[-1] // 16
        den += n
    assert abs(qc["bits"] - num / den) < 1e-9
    assert 3.0 < qc["bits"] <= 3.5
    assert "LDLQ" in err and "plain Viterbi" in err
    # quantization_config.json lists every stored tensor of every Linear as the file has it
    qcj = json.load(open(os.path.join(out, "quantization_config.json")))
    assert set(qcj["tensor_storage"]) == set(lin)
    for key, entry in qcj["tensor_storage"].items():
        assert entry["quant_format"] == "exl3" and entry["bits_per_weight"] == t[key + ".trellis"].shape[-1] // 16
        for name, st in entry["stored_tensors"].items():
            assert list(t[name].shape) == st["shape"] and t[name].nbytes == st["n_bytes"]


def test_safetensors_reads_it_and_shapes_follow_the_spec(quantized):
    out, _ = quantized
    t = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            t.update(load_file(os.path.join(out, f)))
    lin, src = source_linears()
    for key, w in lin.items():
        out_f, in_f = w.shape
        tr = t[key + ".trellis"]
        K = tr.shape[-1] // 16
        assert tr.dtype == np.int16 and tr.shape == (r128(in_f) // 16, r128(out_f) // 16, 16 * K), key
        assert K == 6 if key == "lm_head" else K in (3, 4), key
        assert t[key + ".suh"].dtype == np.float16 and t[key + ".suh"].shape == (r128(in_f),)
        assert t[key + ".svh"].dtype == np.float16 and t[key + ".svh"].shape == (r128(out_f),)
        assert t[key + ".mcg"].dtype == np.int32 and t[key + ".mcg"].shape == ()
        assert int(t[key + ".mcg"]) & 0xFFFFFFFF == MCG_MUL
        assert key + ".weight" not in t
        assert not any(n.startswith(key + ".") and n.rsplit(".", 1)[1] not in ("trellis", "suh", "svh", "mcg")
                       for n in t), key
        # decoded independently, the trellis reproduces the source weight (a wrong bit order, walk order or
        # Hadamard gives a relative error near 1.4; K = 3..6 trellis coding about 0.05-0.3)
        wq = dequantize(t, key)[:in_f, :out_f]
        ref = w.astype(np.float64).T
        rel = np.linalg.norm(wq - ref) / np.linalg.norm(ref)
        assert rel < (0.1 if K == 6 else 0.4), (key, K, rel)
    # everything that is not a Linear is kept byte for byte
    for name, v in src.items():
        if name[:-7] not in lin:
            assert t[name].dtype == v.dtype and np.array_equal(t[name], v), name


def test_inspect_shows_the_k_table(quantized):
    out, _ = quantized
    _, text, _ = trellm("inspect", out)
    lines = text.splitlines()
    head = [l for l in lines if l.strip().startswith("part ")][0].split()
    assert "K=3 mcg" in " ".join(head) and "K=6 mcg" in " ".join(head)
    rows = {}
    for l in lines[lines.index([l for l in lines if l.strip().startswith("part ")][0]) + 1:]:
        if not l.strip():
            break
        name, nums = l[:20].strip(), [int(v) for v in l[20:].split()]
        rows[name] = nums
    assert set(rows) == {"attention", "dense mlp", "shared expert", "routed experts", "lm_head"}
    assert sum(sum(v) for v in rows.values()) == 29  # every Linear of tiny_a
    assert rows["attention"][-1] == 0  # no dense Linear left
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    stored = [l for l in lines if "bits per stored weight" in l][0]
    assert abs(float(stored.split()[2]) - cfg["bits"]) < 1e-4
    assert "read per decoded token" in text
    _, listing, _ = trellm("inspect", out, "--tensors")
    assert "model.layers.1.mlp.experts.3.down_proj" in listing


def test_run_the_quantized_model(quantized):
    out, _ = quantized
    _, ids, err = trellm("run", "--model", out, "--prompt-ids", "1,2,3,4,5", "--temperature", 0, "-n", 8,
                         "--print-ids", "--ignore-eos")
    ids = [int(v) for v in ids.split()]
    assert len(ids) == 8 and all(0 <= v < 320 for v in ids)
    assert "tok/s" in err


def test_interrupted_run_resumes_to_identical_files(quantized, calib, tmp_path):
    ref, _ = quantized
    out = str(tmp_path / "resumed")
    rc, _, err = trellm("quantize", "--model", TINY, "--out", out, "--calibration", calib, *ARGS,
                        "--stop-after", 12, check=False)
    assert rc == 3, err
    assert not os.path.exists(out)  # nothing that looks like a model
    assert os.path.isdir(out + ".partial") and not os.path.exists(os.path.join(out + ".partial", "config.json"))
    rc, _, err = trellm("quantize", "--model", TINY, "--out", out, "--calibration", calib, *ARGS, check=False)
    assert rc == 0, err
    assert "12 reused" in err
    assert not os.path.exists(out + ".partial")
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for f in os.listdir(ref):
        assert filecmp.cmp(os.path.join(out, f), os.path.join(ref, f), shallow=False), f


def test_text_calibration_is_tokenized_like_hf(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    model = tmp_path / "m"
    shutil.copytree(TINY, model)
    shutil.copy(TOKENIZER, model / "tokenizer.json")
    text = "1 2 3 4\n5,6;7.8-9(0)\n" * 12 + "!!!???\n"  # ids below tiny_a's vocabulary of 320
    ids = tokenizers.Tokenizer.from_file(TOKENIZER).encode(text).ids
    assert max(ids) < 320 and len(ids) > 128
    (tmp_path / "cal.txt").write_text(text)
    (tmp_path / "cal.ids").write_text(" ".join(map(str, ids)))
    got = []
    for name in ("cal.txt", "cal.ids"):
        out = str(tmp_path / ("out_" + name))
        rc, _, err = trellm("quantize", "--model", model, "--out", out, "--calibration", tmp_path / name, *ARGS,
                            "--stop-after", 1, check=False)
        assert rc == 3, err
        # the finished Linear (whichever the pipeline took first) records the calibration rows' fingerprint; its
        # codes depend on the Hessian
        qdir = os.path.join(out + ".partial", "qtensors")
        files = sorted(f for f in os.listdir(qdir) if f.endswith(".safetensors"))
        assert files, os.listdir(qdir)
        got.append({f: open(os.path.join(qdir, f), "rb").read() for f in files})
    assert got[0].keys() == got[1].keys()
    assert got[0] == got[1]


@pytest.mark.parametrize("extra,phrase", [
    (["--bits", "9"], "--bits 9: must be between 1 and 8"),
    (["--bits", "0.5"], "--bits 0.5"),
    (["--bits", "4", "--head-bits", "12"], "--head-bits 12"),
    (["--bits", "4", "--codebook", "e8p"], "e8p"),
    (["--bits", "4", "--calibration", "/nonexistent.ids"], "/nonexistent.ids"),
    (["--bits", "4", "--seq-len", "64"], "need --calibration"),
    (["--bits", "4", "--mtp-bits", "9"], "--mtp-bits 9: must be 1..8"),
    (["--bits", "4", "--mtp-bits", "3"], "has no MTP layer"),
    (["--bits", "4", "--calibration-inputs", "quantized"], "--calibration-inputs needs --calibration"),
    (["--bits", "4", "--calibration-device", "cpu"], "--calibration-device needs --calibration"),
])
def test_bad_arguments(extra, phrase, tmp_path):
    rc, _, err = trellm("quantize", "--model", TINY, "--out", tmp_path / "o", *extra, check=False)
    assert rc == 1, err
    assert phrase in err, err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(str(tmp_path / "o") + ".partial")


def test_bad_inputs(quantized, tmp_path):
    out, _ = quantized

    def fails(model, phrase, *extra, dest=None):
        rc, _, err = trellm("quantize", "--model", model, "--out", dest or tmp_path / "o", "--bits", 4, *extra,
                            check=False)
        assert rc == 1, err
        assert phrase in err, err
        assert "internal error" not in err

    fails(out, "already quantized")  # EXL3 in, no re-quantizing
    fails(os.path.join(DATA, "hf", "tiny_a_fused"), "experts are stored fused")
    fails(TINY, "already holds a model; pass --force", dest=out)
    fails(TINY, "no tokenizer.json", "--calibration", os.path.join(DATA, "hf", "tiny_a", "config.json"))
    bad = tmp_path / "bad.ids"
    bad.write_text("1 2 x 3")
    fails(TINY, '"x" is not a token id', "--calibration", bad)
    bad.write_text("1 2 320")
    fails(TINY, "outside the vocabulary", "--calibration", bad)
    good = tmp_path / "good.ids"
    good.write_text(" ".join(str(i % 320) for i in range(64)))
    fails(TINY, "use --calibration-inputs original", "--calibration", good, "--calibration-inputs", "quantized",
          "--hessian-cache", tmp_path / "cache")
    other = tmp_path / "llama"
    shutil.copytree(TINY, other)
    cfg = json.load(open(other / "config.json"))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(other / "config.json", "w"))
    fails(other, "model_type")
    assert not os.path.exists(tmp_path / "o")


def test_mtp_layer_is_copied_and_loads(tmp_path, calib):
    """A source with an MTP layer (tests/data/hf/tiny_mtp, model.layers.2.*): the quantizer trellis-codes the decoder
    and lm_head and copies every MTP tensor byte for byte (kept bf16, as in models/tiny-glm-3bit); the result
    loads with its MTP layer (inspect: the layer's line and 19 dense MTP Linears) and its drafts are scored."""
    src = os.path.join(DATA, "hf", "tiny_mtp")
    out = str(tmp_path / "tiny_mtp-exl3")
    trellm("quantize", "--model", src, "--out", out, "--calibration", calib, *ARGS)
    a = load_file(os.path.join(src, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    mtp = [k for k in a if k.startswith("model.layers.2.")]
    assert len(mtp) == 31
    for k in mtp:
        assert b[k].dtype == a[k].dtype and b[k].tobytes() == a[k].tobytes(), k
    assert not any(k.startswith("model.layers.2.") and k.endswith(".trellis") for k in b)
    assert "lm_head.trellis" in b and "model.layers.1.self_attn.o_proj.trellis" in b
    assert json.load(open(os.path.join(out, "config.json")))["num_nextn_predict_layers"] == 1
    _, info, _ = trellm("inspect", out)
    assert "MTP layer 0" in info and "model.layers.2.*: 31 tensors" in info, info
    row = [l.split() for l in info.splitlines() if l.startswith("    mtp ") and l.split()[1].isdigit()]
    assert row and int(row[0][-1]) == 1 + 5 + 3 * 4 + 3 + 1, info  # eh_proj, attention, experts, shared, head
    ids = load_file(os.path.join(src, "reference.safetensors"))["prompt0_ids"]
    p = tmp_path / "ids.txt"
    p.write_text(",".join(str(int(i)) for i in ids))
    _, js, _ = trellm("perplexity", "--json", "--device", "cpu", "--model", out, "--ids", str(p), "--mtp")
    assert json.loads(js)["mtp_positions"] == len(ids) - 2


def test_mtp_bits_codes_the_mtp_layer(tmp_path, calib):
    """--mtp-bits K: every Linear of the MTP layer (eh_proj, attention, experts, shared expert) is trellis-coded at
    K and shared_head.head at --head-bits; decoded with the independent numpy decoder they are close to the source
    weights; norms and the router stay byte copies; inspect counts them; the drafts are scored."""
    src = os.path.join(DATA, "hf", "tiny_mtp")
    out = str(tmp_path / "tiny_mtp-exl3-mtp")
    _, _, err = trellm("quantize", "--model", src, "--out", out, "--calibration", calib, *ARGS,
                       "--head-bits", "4", "--mtp-bits", "3")
    assert "MTP layer 22 Linears" in err, err
    a = load_file(os.path.join(src, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    qcj = json.load(open(os.path.join(out, "quantization_config.json")))["tensor_storage"]
    mtp = {k[:-7]: v.astype(np.float64) for k, v in a.items()
           if k.startswith("model.layers.2.") and v.ndim == 2 and not k.endswith(".mlp.gate.weight")}
    assert len(mtp) == 22
    for key, w in mtp.items():
        K = 4 if key.endswith("shared_head.head") else 3
        assert qcj[key]["bits_per_weight"] == K and b[key + ".trellis"].shape[-1] == 16 * K, key
        w_hat = dequantize(b, key)[:w.shape[1], :w.shape[0]].T
        rel = ((w - w_hat) ** 2).sum() / (w ** 2).sum()
        assert rel < (0.06 if K == 3 else 0.006), (key, rel)  # measured (LDLQ): <= 0.031 at K = 3, 0.002 at K = 4
    for k in ("model.layers.2.enorm.weight", "model.layers.2.hnorm.weight", "model.layers.2.mlp.gate.weight",
              "model.layers.2.shared_head.norm.weight"):
        assert b[k].tobytes() == a[k].tobytes(), k
    _, info, _ = trellm("inspect", out)
    row = [l.split() for l in info.splitlines() if l.startswith("    mtp ") and l.split()[1].isdigit()]
    assert row and int(row[0][-1]) == 0, info  # no dense MTP Linear left
    ids = load_file(os.path.join(src, "reference.safetensors"))["prompt0_ids"]
    p = tmp_path / "ids.txt"
    p.write_text(",".join(str(int(i)) for i in ids))
    _, js, _ = trellm("perplexity", "--json", "--device", "cpu", "--model", out, "--ids", str(p), "--mtp")
    assert json.loads(js)["mtp_positions"] == len(ids) - 2

"""trellm perplexity end to end: the math against numpy on transformers' own logits (tests/data/hf/*/reference
.safetensors), KL against numpy on a model whose logits are exactly half the reference's, window bookkeeping,
the bf16 model (models/tiny-glm): its perplexity equals what transformers measures on the same weights; and the
built-in default, its 3-bit EXL3 quantization (models/tiny-glm-3bit): its perplexity on the held-out snippet
stays under a fixed bound and within a fixed factor of the bf16 model's, with a small KL against it (a
regression in the trellis CPU path, the EXL3 loader or the shipped file fails these)."""
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import DATA, trellm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_GLM = os.path.join(ROOT, "models", "tiny-glm")
TINY_GLM_3BIT = os.path.join(ROOT, "models", "tiny-glm-3bit")
SNIPPET = os.path.join(DATA, "text", "austen_heldout_snippet.txt")

# The default-model checks score the first SNIPPET_TOKENS tokens of the snippet (511 predicted): the CPU
# trellis matmul is the scalar reference (it decodes the weights on every call), ~200 tokens/s on 2 cores, so
# the whole snippet (1013 predicted) would cost ~5 s per model; this costs ~2.5 s for both models together.
SNIPPET_TOKENS = 512
# Measured 2026-12-02 with trellm on the CPU (2 threads; ctx 1024) on those 512 tokens, with the chat fine-tuned
# pair of issue 14: models/tiny-glm-3bit 49.0677, models/tiny-glm (bf16) 49.2055: ratio 0.9972, mean KL 0.01495
# nats, top-1 agreement 91.4 %. (Whole snippet: 36.3812 vs 36.4108, KL 0.01273, top-1 93.2 %.) The bounds follow
# the rule of the first model's (2026-11-25: 51.6839 -> 52.7, KL 0.01189 -> 0.02, top-1 0.924 -> 0.88): the
# measured perplexity + 2 %, 1.7 x the measured KL, the measured top-1 agreement - 4.4 points.
DEFAULT_SNIPPET_PPL = 49.0677
DEFAULT_SNIPPET_BOUND = 50.0      # the measured value + 2 % (50.05, rounded down as 52.72 was)
DEFAULT_VS_BF16_FACTOR = 1.03     # the target (3-bit within 3 % of bf16); measured 0.9972
DEFAULT_KL_BOUND = 0.025          # 1.7 x the measured 0.01495; a wrong decode or scale gives KL >> 0.1
DEFAULT_TOP1_BOUND = 0.87         # measured 0.914
BF16_SNIPPET_PPL_512 = 49.2055    # models/tiny-glm on those tokens (trellm; transformers f32 gives 49.2055 too)
# models/tiny-glm on the whole snippet as transformers 5.17.0 computes it (f32 on the CPU, the windows of
# scripts/train_tiny_glm.py's evaluate(), which `trellm perplexity` uses too), measured 2026-12-02 on the weights
# of issue 14's fine-tune (model.safetensors sha256 b2fed42d...): 1013 tokens scored. finetune_tiny_glm.py records
# the same figure in training_summary.json's "after" when it runs with the snippet in its --data folder.
BF16_SNIPPET_PPL_TRANSFORMERS = 36.4108
BF16_SNIPPET_TOKENS = 1013


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ppl_json(*args):
    _, out, _ = trellm("perplexity", "--json", "--device", "cpu", *args)
    return json.loads(out)


def write_ids(tmp_path, ids, name="ids.txt"):
    p = tmp_path / name
    p.write_text(",".join(str(int(i)) for i in ids))
    return str(p)


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b", "tiny_odd"])
def test_perplexity_matches_numpy_on_transformers_logits(name, tmp_path):
    d = os.path.join(DATA, "hf", name)
    ref = load_file(os.path.join(d, "reference.safetensors"))
    ids, logits = ref["prompt_ids"], ref["prefill_logits"]
    lp = log_softmax(logits[:-1])
    want = float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))
    got = ppl_json("--model", d, "--ids", write_ids(tmp_path, ids), "--ctx", len(ids), "--chunk", 4)
    assert got["windows"] == 1 and got["predicted"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(want, rel=1e-4)


def test_kl_matches_numpy(tmp_path):
    # tiny_b stores f32: halving lm_head halves every logit exactly, so the model's logits are 0.5 x the reference's.
    src = os.path.join(DATA, "hf", "tiny_b")
    half = tmp_path / "tiny_b_half"
    shutil.copytree(src, half)
    w = load_file(os.path.join(src, "model.safetensors"))
    w["lm_head.weight"] = (w["lm_head.weight"] * 0.5).astype(np.float32)
    save_file(w, str(half / "model.safetensors"), metadata={"format": "pt"})
    ref = load_file(os.path.join(src, "reference.safetensors"))
    ids, logits = ref["prompt_ids"], ref["prefill_logits"][:-1]
    lp, lq = log_softmax(logits), log_softmax(0.5 * logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    agree = (logits.argmax(-1) == (0.5 * logits).argmax(-1)).mean()
    got = ppl_json("--model", str(half), "--ref", src, "--ids", write_ids(tmp_path, ids), "--ctx", len(ids))
    assert got["mean_kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert got["max_kl"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert got["top1_agree"] == pytest.approx(float(agree))
    assert got["ref_perplexity"] == pytest.approx(float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean())), rel=1e-4)


def test_kl_of_the_same_weights_is_zero(tmp_path):
    a, fused = os.path.join(DATA, "hf", "tiny_a"), os.path.join(DATA, "hf", "tiny_a_fused")
    ids = load_file(os.path.join(a, "reference.safetensors"))["prompt_ids"]
    got = ppl_json("--model", fused, "--ref", a, "--ids", write_ids(tmp_path, ids), "--ctx", 5)
    assert got["mean_kl"] < 1e-9 and got["top1_agree"] == 1.0
    assert got["perplexity"] == pytest.approx(got["ref_perplexity"], rel=1e-9)


def test_windows_do_not_overlap(tmp_path):
    ids = list(range(1, 24))  # 23 tokens, ctx 5: windows of 5,5,5,5,3 -> 23 - 5 predicted
    got = ppl_json("--model", os.path.join(DATA, "hf", "tiny_a"), "--ids", write_ids(tmp_path, ids), "--ctx", 5)
    assert got["windows"] == 5 and got["predicted"] == 18
    # A 1-token tail is context for nothing: skipped.
    got = ppl_json("--model", os.path.join(DATA, "hf", "tiny_a"), "--ids", write_ids(tmp_path, ids[:21]), "--ctx", 5)
    assert got["windows"] == 4 and got["predicted"] == 16


def test_shipped_model_matches_transformers():
    after = json.load(open(os.path.join(TINY_GLM, "training_summary.json"))).get("after", {})
    want = after.get("snippet_ppl", BF16_SNIPPET_PPL_TRANSFORMERS)
    got = ppl_json("--model", TINY_GLM, "--text", SNIPPET, "--ctx", after.get("heldout_ctx", 1024))
    assert got["predicted"] == after.get("snippet_tokens", BF16_SNIPPET_TOKENS)
    assert got["perplexity"] == pytest.approx(want, rel=2e-3)


@pytest.fixture(scope="module")
def default_vs_bf16():
    """One run of the built-in model on the snippet's first tokens with the bf16 model as --ref."""
    _, out, err = trellm("perplexity", "--json", "--device", "cpu", "--text", SNIPPET, "--max-tokens", SNIPPET_TOKENS,
                         "--ref", TINY_GLM)
    return json.loads(out), err


def test_default_model_is_the_3bit_quantization():
    cfg = json.load(open(os.path.join(TINY_GLM_3BIT, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "exl3" and cfg["quantization_config"]["bits"] == 3
    _, out, err = trellm("tokenize", "--text", "Emma")
    assert os.path.join("models", "tiny-glm-3bit") in err


def test_default_model_perplexity_bound(default_vs_bf16):
    got, err = default_vs_bf16
    assert "built-in model" in err
    assert os.path.realpath(got["model"]) == os.path.realpath(TINY_GLM_3BIT)
    assert got["predicted"] == SNIPPET_TOKENS - 1
    ppl = got["perplexity"]
    assert ppl < DEFAULT_SNIPPET_BOUND, f"perplexity {ppl} on the held-out snippet (measured {DEFAULT_SNIPPET_PPL})"


def test_default_3bit_model_stays_close_to_bf16(default_vs_bf16):
    """The shipped 3-bit model against its bf16 original on the same tokens: perplexity within a fixed factor,
    small KL and high top-1 agreement (numbers measured with the shipped files: see the constants)."""
    got, _ = default_vs_bf16
    ratio = got["perplexity"] / got["ref_perplexity"]
    assert got["ref_perplexity"] == pytest.approx(BF16_SNIPPET_PPL_512, rel=2e-3)  # the bf16 model did not change
    assert ratio < DEFAULT_VS_BF16_FACTOR, f"3-bit / bf16 perplexity {ratio:.4f} (measured 0.9972)"
    assert got["mean_kl"] < DEFAULT_KL_BOUND, f"mean KL {got['mean_kl']} (measured 0.01495)"
    assert got["top1_agree"] > DEFAULT_TOP1_BOUND, f"top-1 agreement {got['top1_agree']} (measured 0.914)"


def test_mtp_agreement_matches_numpy_on_transformers_logits(tmp_path):
    """--mtp on tiny_mtp: the MTP layer's argmax at p against the model's greedy token at p+1 and the text's t[p+2],
    counted as numpy counts them on transformers' own logits (scripts/make_mtp_reference.py)."""
    d = os.path.join(DATA, "hf", "tiny_mtp")
    ref = load_file(os.path.join(d, "reference.safetensors"))
    ids, main, mtp = ref["prompt0_ids"], ref["prompt0_prefill_logits"], ref["prompt0_mtp_logits"]
    P = len(ids)
    draft, nxt = mtp.argmax(-1)[:P - 2], main.argmax(-1)[1:P - 1]
    got = ppl_json("--model", d, "--ids", write_ids(tmp_path, ids), "--ctx", P, "--mtp")
    assert got["mtp_positions"] == P - 2
    assert got["mtp_agreement"] == pytest.approx(float((draft == nxt).mean()))
    assert got["mtp_accuracy"] == pytest.approx(float((draft == ids[2:]).mean()))
    # in chunks of 4 rows (the MTP cache carries over between chunks): the same counts
    assert ppl_json("--model", d, "--ids", write_ids(tmp_path, ids), "--ctx", P, "--mtp", "--chunk", 4)["mtp_agreement"] \
        == got["mtp_agreement"]


def test_shipped_mtp_layer_drafts_what_the_model_says():
    # Measured 2026-12-02 (trellm CPU): 0.6423 on the snippet (0.6056 on all of austen_heldout.txt; transformers
    # 0.6047 on the training script's windows); an untrained layer (the copy of layer 7 it started from) scores 0.028.
    got = ppl_json("--model", TINY_GLM, "--text", SNIPPET, "--mtp")
    assert got["mtp_positions"] == got["predicted"] - 1
    assert got["mtp_agreement"] > 0.60, got


def test_mtp_without_the_layer_is_a_clear_error(tmp_path):
    rc, _, err = trellm("perplexity", "--device", "cpu", "--model", os.path.join(DATA, "hf", "tiny_a"), "--ids",
                        write_ids(tmp_path, [1, 2, 3, 4]), "--mtp", check=False)
    assert rc != 0 and "no MTP layer" in err, err


def test_default_model_writes_readable_text():
    _, out, _ = trellm("run", "--prompt", "Once upon a time", "-n", 48, "--seed", 7, "--device", "cpu")
    words = re.findall(r"[A-Za-z]+", out)
    assert len(words) >= 25
    common = {"the", "and", "of", "to", "a", "in", "was", "her", "she", "he", "it", "his", "that", "not", "be", "had"}
    assert sum(w.lower() in common for w in words) >= 5, out


@pytest.mark.parametrize("args,phrase", [
    (["--text", "/nonexistent.txt"], "/nonexistent.txt"),
    (["--model", os.path.join(DATA, "hf", "tiny_a"), "--ref", TINY_GLM, "--ids", SNIPPET], "vocabulary"),
    (["--text", SNIPPET, "--ctx", "1"], "--ctx"),
    ([], "exactly one of --text"),
])
def test_bad_input_is_a_clear_error(args, phrase):
    rc, _, err = trellm("perplexity", "--device", "cpu", *args, check=False)
    assert rc != 0 and phrase in err, err
    assert "internal error" not in err


def test_rtn_baseline_script(tmp_path):
    """scripts/rtn_quantize.py: every group of a quantized row holds at most 2^K values, symmetric around zero
    on one scale; the rest is untouched; the result loads and drifts from the original by a small, non-zero KL."""
    import subprocess
    import sys
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import rtn_quantize as rq
    src, out = os.path.join(DATA, "hf", "tiny_a"), str(tmp_path / "rtn3")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "rtn_quantize.py"), "--model", src, "--out", out,
                    "--bits", "3", "--group", "16"], check=True, capture_output=True)
    header, _ = rq._header(os.path.join(src, "model.safetensors"))
    n_checked = 0
    for name, dtype in rq.read_dtypes(src).items():
        a, b = rq.read_raw(src, name), rq.read_raw(out, name)
        if not (dtype == "BF16" and rq.is_quantized(name, header[name]["shape"])):
            assert a.tobytes() == b.tobytes(), name
            continue
        shape = header[name]["shape"]
        w = rq.bf16_to_f32(a.view(np.uint16)).reshape(shape)
        q = rq.bf16_to_f32(b.view(np.uint16)).reshape(shape[0], -1, 16)
        scale = np.abs(w.reshape(shape[0], -1, 16)).max(-1, keepdims=True) / 3
        k = q / scale
        assert np.abs(k - np.round(k)).max() < 0.02 and k.min() >= -4.02 and k.max() <= 3.02, name
        n_checked += 1
    assert n_checked >= 10
    ids = load_file(os.path.join(src, "reference.safetensors"))["prompt_ids"]
    got = ppl_json("--model", out, "--ref", src, "--ids", write_ids(tmp_path, ids))
    assert 0 < got["mean_kl"] < 1.0


def test_rtn_asymmetric_scheme_and_stored_bits(tmp_path):
    """scripts/rtn_quantize.py --scheme asym on tiny_mtp (hidden 64, experts 48 wide: with G = 32 a row of 48 is one
    group of 32 and one of 16): every group holds at most 2^K levels (q - z) * s with an integer zero point z in
    [0, 2^K - 1], zero stays exact, the MTP layer and everything outside the decoder Linears are untouched, and
    stored_bits_per_weight counts K per weight plus 16 + K bits per (possibly short) group."""
    import subprocess
    import sys
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import rtn_quantize as rq
    src, out = os.path.join(DATA, "hf", "tiny_mtp"), str(tmp_path / "rtn2a")
    K, G = 2, 32
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "rtn_quantize.py"), "--model", src, "--out", out,
                        "--bits", str(K), "--group", str(G), "--scheme", "asym"], check=True, capture_output=True, text=True)
    info = json.loads(p.stdout)
    header, _ = rq._header(os.path.join(src, "model.safetensors"))
    bits = weights = 0
    for name, dtype in rq.read_dtypes(src).items():
        shape = header[name]["shape"]
        a, b = rq.read_raw(src, name), rq.read_raw(out, name)
        quantized = dtype == "BF16" and len(shape) == 2 and name.startswith("model.layers.") and \
            not name.startswith("model.layers.2.") and not name.endswith(".mlp.gate.weight")
        if not quantized:
            assert a.tobytes() == b.tobytes(), name
            continue
        w = rq.bf16_to_f32(a.view(np.uint16)).reshape(shape).astype(np.float64)
        q = rq.bf16_to_f32(b.view(np.uint16)).reshape(shape).astype(np.float64)
        for g0 in range(0, shape[1], G):
            wg, qg = w[:, g0:g0 + G], q[:, g0:g0 + G]
            lo, hi = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
            s = (hi - lo) / (2 ** K - 1)
            z = np.round(-lo / s)
            assert ((z >= 0) & (z <= 2 ** K - 1)).all(), name
            lvl = qg / s[:, None] + z[:, None]  # integer levels 0..2^K-1 (up to the fp16 scale and bf16 rounding)
            assert np.abs(lvl - np.round(lvl)).max() < 0.05 and lvl.min() > -0.05 and lvl.max() < 2 ** K - 1 + 0.05, name
            assert (qg[wg == 0] == 0).all(), name
            assert np.abs(qg - wg).max() <= 0.52 * s.max() * 1.01 + 1e-6, name
        weights += shape[0] * shape[1]
        bits += K * shape[0] * shape[1] + shape[0] * math.ceil(shape[1] / G) * (16 + K)
    assert weights == info["quantized_params"] > 0
    assert info["stored_bits_per_weight"] == pytest.approx(bits / weights, rel=1e-12)
    assert info["stored_bits_per_weight"] > info["bits_per_weight"] == K + (16 + K) / G  # short 16-wide groups

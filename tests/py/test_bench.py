"""`trellm bench` end to end on a tiny synthetic model on the CPU: every section prints, and --json writes one
well-formed line per figure with the fields BENCHMARKS.md asks for."""
import json
import os
import tempfile

from conftest import trellm


def test_bench_tiny_synthetic_cpu():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "b.jsonl")
        _, out, _ = trellm("bench", "--synthetic", "tiny", "--device", "cpu", "--prompt-lens", "8,32", "--depths", "0,50",
                           "--decode-tokens", 4, "--repeats", 1, "--json", path)
        for section in ("load", "prefill", "decode", "time by part"):
            assert section in out
        figs = [json.loads(l) for l in open(path)]
        keys = {"date", "gpu", "commit", "command", "bench", "metric", "shape", "value", "unit"}
        assert all(keys <= set(f) for f in figs)
        metrics = {(f["bench"], f["metric"], f["shape"].split()[-1]) for f in figs}
        assert ("prefill", "prefill_tok_s", "prompt=32") in metrics
        assert ("decode", "decode_tok_s", "depth=50") in metrics
        assert all(f["value"] > 0 for f in figs if f["metric"].endswith("tok_s"))
        # the deeper decode reads more cache bytes
        mb = {f["shape"].split()[-1]: f["value"] for f in figs if f["metric"] == "bytes_per_token_mb"}
        assert mb["depth=50"] > mb["depth=0"]


def test_bench_needs_one_model_source():
    rc, _, err = trellm("bench", "--device", "cpu", check=False)
    assert rc == 1 and "exactly one of --model" in err


def test_bench_kernel_clocks_says_what_it_needs():
    # The clocks are CUDA's, in a build configured for them, and clock the single-sequence decode only.
    rc, _, err = trellm("bench", "--synthetic", "tiny", "--device", "cpu", "--kernel-clocks", "clocks.csv", check=False)
    assert rc == 1 and "the cpu backend records none" in err and "TRELLM_KERNEL_CLOCKS=ON" in err
    rc, _, err = trellm("bench", "--synthetic", "tiny", "--device", "cpu", "--kernel-clocks", "clocks.csv", "--batch", "1",
                        check=False)
    assert rc == 1 and "does not combine with --batch" in err

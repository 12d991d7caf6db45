#!/usr/bin/env python3
"""Baseline: Hugging Face transformers' Glm4MoeLiteForCausalLM at full GLM-4.7-Flash size, bf16, random weights,
on one GPU. Measures what BENCHMARKS.md's baseline table lists, in the same session as `trellm bench`:
  - prefill of a 2,048-token prompt (tok/s, median of --repeats)
  - generate 32 tokens after a 512-token prompt (tok/s over the 32 tokens, prefill included, like the table)
  - GPU memory after load and peak
and writes one JSON line per figure (BENCHMARKS.md "How to report a figure") to --json.

  python3 scripts/bench_hf.py --json bench/results/e2e.jsonl            # full size (needs ~61 GB of GPU memory)
  python3 scripts/bench_hf.py --tiny                                     # smoke test on any device
"""
import argparse
import datetime
import json
import statistics
import subprocess
import time

import torch
import transformers
from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

RELEASE = dict(vocab_size=154880, hidden_size=2048, intermediate_size=10240, moe_intermediate_size=1536,
               num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20, n_shared_experts=1,
               n_routed_experts=64, num_experts_per_tok=4, kv_lora_rank=512, q_lora_rank=768, qk_rope_head_dim=64,
               qk_nope_head_dim=192, v_head_dim=256, routed_scaling_factor=1.8, n_group=1, topk_group=1,
               norm_topk_prob=True, rms_norm_eps=1e-5, max_position_embeddings=202752,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6}, eos_token_id=[154820, 154827, 154829],
               pad_token_id=154820, tie_word_embeddings=False)
TINY = dict(RELEASE, vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
            kv_lora_rank=64, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
            eos_token_id=[511], pad_token_id=511)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny config (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--gen-prompt", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--json", default="")
    ap.add_argument("--commit", default="", help="trellm commit to record (default: git rev-parse, if available)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    cfg = Glm4MoeLiteConfig(**(TINY if args.tiny else RELEASE))
    torch.manual_seed(0)
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = Glm4MoeLiteForCausalLM(cfg).eval()
    sync(dev)
    load_s = time.time() - t0
    mem_load = torch.cuda.memory_allocated() / 1e9 if dev.type == "cuda" else 0.0
    commit = args.commit
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    commit = commit or "unknown"
    figures = []

    def figure(bench, metric, shape, value, unit):
        figures.append({"date": datetime.date.today().isoformat(), "gpu": gpu, "commit": commit,
                        "command": "python3 scripts/bench_hf.py" + (" --tiny" if args.tiny else ""),
                        "bench": bench, "metric": metric,
                        "shape": f"HF transformers {transformers.__version__} bf16 {'tiny' if args.tiny else 'glm-4.7-flash'} {shape}".strip(),
                        "value": value, "unit": unit})
        print(f"{bench:10s} {metric:28s} {shape:16s} {value:12.2f} {unit}")

    figure("load", "init_s", "", load_s, "s")
    with torch.no_grad():
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=dev)
        model(ids[:, :64])  # warm-up
        rates = []
        for _ in range(args.repeats):
            sync(dev)
            t = time.time()
            model(ids, use_cache=False, logits_to_keep=1)
            sync(dev)
            rates.append(args.prefill / (time.time() - t))
        figure("prefill", "prefill_tok_s", f"prompt={args.prefill}", statistics.median(rates), "tok/s")
        prompt = ids[:, :args.gen_prompt]
        rates = []
        for _ in range(max(1, args.repeats - 1)):
            sync(dev)
            t = time.time()
            out = model.generate(prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False)
            sync(dev)
            assert out.shape[1] == args.gen_prompt + args.gen_tokens
            rates.append(args.gen_tokens / (time.time() - t))
        figure("decode", "generate_tok_s", f"prompt={args.gen_prompt} new={args.gen_tokens} (incl. prefill)",
               statistics.median(rates), "tok/s")
    if dev.type == "cuda":
        figure("memory", "gpu_mem_after_load_gb", "", mem_load, "GB")
        figure("memory", "gpu_mem_peak_gb", "", torch.cuda.max_memory_allocated() / 1e9, "GB")
    if args.json:
        with open(args.json, "a") as f:
            for fig in figures:
                f.write(json.dumps(fig) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tiny random Glm4MoeLiteForCausalLM checkpoints and their logits from Hugging Face transformers (the oracle).

For each fixture: config.json + model.safetensors written by save_pretrained (bf16 / f16 / f32 storage), and
reference.safetensors with
  prompt_ids     I32 [P]       a random prompt
  prefill_logits F32 [P, V]    logits of every prompt position (one forward over the prompt)
  decode_tokens  I32 [S]       S greedy tokens after the prompt
  decode_logits  F32 [S, V]    logits of each decode step (one token at a time through the KV cache)
transformers computes in float32 on the stored weights (upcast), with eager attention.

Traps avoided on purpose (see issue 2): weights are drawn with std 1/sqrt(fan_in) rather than 0.02 so
activations and logits are far from uniform; e_score_correction_bias is random and large enough to change
expert selection; a seed is rejected when any routing decision is a near-tie (gap < 1e-3), where a
legitimate difference in float rounding could flip the choice.

Usage (needs torch + transformers; made with torch 2.11, transformers 5.17):
  python3 scripts/make_hf_reference.py --out tests/data/hf
"""
import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file, load_file

import transformers
from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

FIXTURES = {
    # 2 layers (dense + MoE), 4 experts top-2, bf16 storage.
    "tiny_a": dict(
        dtype="bfloat16", seed=1, prompt=13, steps=20,
        cfg=dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                 n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32,
                 qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=32, routed_scaling_factor=1.8,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=4096,
                 eos_token_id=[318, 319], pad_token_id=318)),
    # first_k_dense_replace = 2: two dense layers, then MoE with top-3 of 6 experts; f32 storage.
    "tiny_b": dict(
        dtype="float32", seed=2, prompt=17, steps=20,
        cfg=dict(vocab_size=384, hidden_size=96, intermediate_size=160, moe_intermediate_size=40,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                 n_routed_experts=6, num_experts_per_tok=3, kv_lora_rank=48, q_lora_rank=40,
                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24, routed_scaling_factor=2.5,
                 first_k_dense_replace=2, mlp_layer_types=["dense", "dense", "sparse", "sparse"],
                 rope_parameters={"rope_type": "default", "rope_theta": 1e4}, max_position_embeddings=4096,
                 eos_token_id=[383], pad_token_id=383)),
    # Odd sizes: hidden 72 (not a power of two), q_lora_rank 37, 3 heads, 5 experts, 2 shared; f16 storage.
    "tiny_odd": dict(
        dtype="float16", seed=3, prompt=11, steps=18,
        cfg=dict(vocab_size=263, hidden_size=72, intermediate_size=56, moe_intermediate_size=24,
                 num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3, n_shared_experts=2,
                 n_routed_experts=5, num_experts_per_tok=2, kv_lora_rank=40, q_lora_rank=37,
                 qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=20, routed_scaling_factor=1.8,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=2048,
                 eos_token_id=[260, 261, 262], pad_token_id=260)),
    # Group-limited routing (2 groups, 1 kept), no q LoRA (plain q_proj), attention biases, tied embeddings,
    # unnormalised top-k weights; bf16 storage.
    "tiny_groups": dict(
        dtype="bfloat16", seed=4, prompt=9, steps=16, embed_std=0.1,
        cfg=dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=False,
                 kv_lora_rank=32, q_lora_rank=None, attention_bias=True, tie_word_embeddings=True,
                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=1.0,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=2048,
                 eos_token_id=[255], pad_token_id=255)),
}

GAP_MIN = 1e-3


def randomize(model, gen, embed_std):
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.data = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            p.data = 0.1 * torch.randn(p.shape, generator=gen)
        elif "embed_tokens" in name:
            # Tied embeddings: a small embedding keeps the current token's own row from dominating the logits.
            p.data = embed_std * torch.randn(p.shape, generator=gen)
        else:
            fan_in = p.shape[-1]
            std = 1.0 / math.sqrt(fan_in)
            if name.endswith("mlp.gate.weight"):
                std *= 2.0  # spread the router scores so sigmoid outputs vary
            p.data = std * torch.randn(p.shape, generator=gen)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.data = 0.3 * torch.randn(b.shape, generator=gen)


class GapProbe:
    """Records the smallest margin of every routing decision (k-th vs (k+1)-th choice score)."""

    def __init__(self, model):
        self.min_gap = float("inf")
        self.hooks = []
        for m in model.modules():
            if type(m).__name__ == "Glm4MoeLiteTopkRouter":
                self.hooks.append(m.register_forward_hook(self.hook))

    def hook(self, mod, args, out):
        logits = out[0].float()
        s = logits.sigmoid() + mod.e_score_correction_bias.float()
        if mod.num_group > 1:  # margins of the group choice as well
            g = s.view(s.shape[0], mod.num_group, -1).topk(2, dim=-1)[0].sum(-1)
            gs = g.sort(dim=-1, descending=True)[0]
            self.min_gap = min(self.min_gap, float((gs[:, mod.topk_group - 1] - gs[:, mod.topk_group]).min()))
            mask = torch.zeros_like(g).scatter_(1, g.topk(mod.topk_group, dim=-1)[1], 1)
            s = s.masked_fill(~mask.repeat_interleave(s.shape[1] // mod.num_group, dim=1).bool(), -1e9)
        ss = s.sort(dim=-1, descending=True)[0]
        self.min_gap = min(self.min_gap, float((ss[:, mod.top_k - 1] - ss[:, mod.top_k]).min()))


def run_reference(model, prompt, steps):
    probe = GapProbe(model)
    with torch.no_grad():
        out = model(input_ids=prompt[None], use_cache=True)
        prefill = out.logits[0].float()
        past = out.past_key_values
        tok = int(prefill[-1].argmax())
        toks, logits = [], []
        for _ in range(steps):
            toks.append(tok)
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            lg = out.logits[0, -1].float()
            logits.append(lg)
            tok = int(lg.argmax())
    for h in probe.hooks:
        h.remove()
    return prefill, torch.tensor(toks, dtype=torch.int32), torch.stack(logits), probe.min_gap


def make(name, spec, out_dir):
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    for attempt in range(50):
        seed = spec["seed"] * 1000 + attempt
        gen = torch.Generator().manual_seed(seed)
        cfg = Glm4MoeLiteConfig(**spec["cfg"])
        model = Glm4MoeLiteForCausalLM(cfg)
        randomize(model, gen, spec.get("embed_std", 1.0))
        dtype = getattr(torch, spec["dtype"])
        model = model.to(dtype)
        model.save_pretrained(path)
        # The oracle: reload what was written, compute in float32 with eager attention.
        ref = Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        prompt = torch.randint(0, cfg.vocab_size, (spec["prompt"],), generator=gen, dtype=torch.int64)
        prefill, toks, dec, gap = run_reference(ref, prompt, spec["steps"])
        # The greedy choice itself must not be a near-tie either.
        top2 = torch.cat([prefill[-1:], dec]).topk(2, dim=-1)[0]
        logit_gap = float((top2[:, 0] - top2[:, 1]).min())
        if gap >= GAP_MIN and logit_gap >= GAP_MIN:
            break
        print(f"{name}: seed {seed} rejected (routing gap {gap:.2e}, logit gap {logit_gap:.2e})")
    else:
        raise SystemExit(f"{name}: no seed without near-ties")
    save_file({"prompt_ids": prompt.to(torch.int32), "prefill_logits": prefill.contiguous(),
               "decode_tokens": toks, "decode_logits": dec.contiguous()},
              os.path.join(path, "reference.safetensors"))
    meta = {"seed": seed, "dtype": spec["dtype"], "min_routing_gap": gap, "min_greedy_logit_gap": logit_gap,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "max_abs_logit": float(max(prefill.abs().max(), dec.abs().max()))}
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: seed {seed}, routing gap {gap:.3e}, logit gap {logit_gap:.3e}, tokens {toks.tolist()}")


def make_fused_copy(src, dst):
    """The same weights with experts in transformers 5's fused 3-D layout (gate_up_proj / down_proj)."""
    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    E, out = cfg["n_routed_experts"], {}
    layers = {}
    for k, v in sd.items():
        if ".mlp.experts." in k:
            pre, rest = k.split(".mlp.experts.")
            e, proj = rest.split(".")[:2]
            layers.setdefault(pre, {}).setdefault(int(e), {})[proj] = v
        else:
            out[k] = v
    for pre, ex in layers.items():
        out[pre + ".mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ex[e]["gate_proj"], ex[e]["up_proj"]], 0) for e in range(E)]).contiguous()
        out[pre + ".mlp.experts.down_proj"] = torch.stack([ex[e]["down_proj"] for e in range(E)]).contiguous()
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json", "reference.safetensors", "reference.json"):
        if os.path.exists(os.path.join(src, f)):
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/hf")
    ap.add_argument("--only", nargs="*", help="fixture names (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, spec in FIXTURES.items():
        if not args.only or name in args.only:
            make(name, spec, args.out)
    if not args.only or "tiny_a" in args.only:
        make_fused_copy(os.path.join(args.out, "tiny_a"), os.path.join(args.out, "tiny_a_fused"))


if __name__ == "__main__":
    main()

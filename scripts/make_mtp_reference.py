#!/usr/bin/env python3
"""Reference outputs of the MTP layer (GLM-4.7-Flash / DeepSeek-V3 multi-token prediction) computed with
transformers' own layer classes: the oracle for trellm's MTP forward (issue 14). transformers skips
model.layers.<num_hidden_layers>.* on load, so the layer is rebuilt by scripts/finetune_tiny_glm.py's MtpLayer,
a subclass of transformers' Glm4MoeLiteDecoderLayer that adds only enorm, hnorm, eh_proj and shared_head:
    x = eh_proj(cat(enorm(e_p), hnorm(h_p)));  x = decoder_layer(x);  logits = shared_head.head(shared_head.norm(x))
with h_p the main model's final hidden state at position p after model.norm and e_p = embed(mtp_input_ids[p]),
zeroed at position 0 (as vLLM's deepseek_mtp does). All in float32 on the stored weights, eager attention, the
per-expert loop. Each fixture is also recomputed by spec_forward(), the same forward written from
shared/GLM47FLASH.md in plain torch without transformers' classes; the script fails if the two differ by more
than 1e-4 relative (1.2e-6 on tiny_mtp).

Fixtures (each one's reference.safetensors holds, per prompt k = 0, 1, ...; one prompt for tiny_mtp):
  prompt{k}_ids         I32 [P]      the prompt
  prompt{k}_hidden      F32 [P, H]   main model's final hidden states after model.norm (the MTP's h input)
  prompt{k}_next_token  I32 [1]      main model's greedy token after the prompt
  prompt{k}_mtp_ids     I32 [P]      the MTP's token input at p: prompt[p+1] for p < P-1, next_token at P-1
  prompt{k}_mtp_logits  F32 [P, V]   MTP logits at each p (predicting the token at p+2); the last row is the
                                     draft a speculative decoder would propose after next_token
  prompt{k}_mtp_hidden  F32 [P, H]   the MTP decoder layer's output before shared_head.norm (what chained drafts
                                     feed back as h)
  prompt{k}_prefill_logits F32 [P, V] (tiny_mtp only) the main model's logits, as make_hf_reference.py's
 - tiny_mtp/: a tiny random checkpoint (tiny_a's config of make_hf_reference.py: 2 layers, dense + MoE, 4
   experts top-2; bf16) with a random MTP layer saved as model.layers.2.* (experts one by one), config.json
   num_nextn_predict_layers 1; weights drawn as make_hf_reference.py draws them (std 1/sqrt(fan_in), random
   e_score_correction_bias), seeds with a routing or greedy near-tie (< 1e-3) rejected, for the main model's
   routers and the MTP's alike. Holds config.json, generation_config.json, model.safetensors, reference.*.
 - tiny_glm_mtp/ (with --model DIR, default models/tiny-glm if it has an MTP layer): references only, for the
   shipped model's own weights (not copied): prompt 0 = the first 16 tokens of
   tests/data/text/austen_heldout_snippet.txt, prompt 1 = the first thinking prompt of
   tests/data/chat/fixtures.json. Re-run whenever the shipped model changes: reference.json records the
   sha256 of the model.safetensors it was made from.

Usage (needs torch + transformers, made for torch 2.11 / transformers 5.17; small enough for a CPU):
  python3 scripts/make_mtp_reference.py --out tests/data/hf [--model models/tiny-glm] [--only tiny_mtp]
"""
import argparse
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import finetune_tiny_glm as FT  # noqa: E402
import make_hf_reference as HR  # noqa: E402

import transformers  # noqa: E402
from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM  # noqa: E402

GAP_MIN = 1e-3


def load_reference_models(path):
    """Main model and MTP layer from a directory: float32, eager attention, per-expert loop."""
    model = Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model.set_experts_implementation("eager")
    mtp = FT.load_mtp(model.config, path).eval()
    assert mtp.mtp_config._attn_implementation == "eager" and mtp.mtp_config._experts_implementation == "eager"
    return model, mtp


@torch.no_grad()
def reference(model, mtp, ids, with_prefill):
    """The tensors of one prompt (see the module docstring) and the smallest greedy margin of the MTP logits."""
    x = torch.as_tensor(ids, dtype=torch.int64)[None]
    h = model.model(input_ids=x, use_cache=False).last_hidden_state  # after model.norm
    main_logits = model.lm_head(h)[0].float()
    nxt = int(main_logits[-1].argmax())
    mtp_ids = torch.cat([x[0, 1:], torch.tensor([nxt])])
    emb = model.model.embed_tokens(mtp_ids)[None]
    pos = torch.arange(len(ids))[None]
    logits, out = mtp.mtp_forward(emb, h, pos, model.model.rotary_emb)
    logits = logits[0].float()
    top2 = logits.topk(2, dim=-1)[0]
    t = {"hidden": h[0].float().contiguous(), "next_token": torch.tensor([nxt], dtype=torch.int32),
         "mtp_ids": mtp_ids.to(torch.int32), "mtp_logits": logits.contiguous(), "mtp_hidden": out[0].float().contiguous(),
         "ids": torch.as_tensor(ids, dtype=torch.int32)}
    if with_prefill:
        t["prefill_logits"] = main_logits.contiguous()
    return t, float((top2[:, 0] - top2[:, 1]).min()), float(main_logits[-1].topk(2)[0].diff().abs())


def spec_forward(path, cfg, mtp_ids, hidden):
    """The MTP forward written from shared/GLM47FLASH.md in plain torch (no transformers class): an independent
    check that MtpLayer wires transformers' layer as the engines do. float32; returns logits [P, V]."""
    from safetensors.torch import load_file
    sd = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    p = f"model.layers.{cfg.num_hidden_layers}."
    W = lambda n: sd[p + n]  # noqa: E731

    def rms(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    eps, P, H = cfg.rms_norm_eps, len(mtp_ids), cfg.num_attention_heads
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    e = sd["model.embed_tokens.weight"][torch.as_tensor(mtp_ids, dtype=torch.int64)]
    e[0] = 0  # position 0
    x = torch.cat([rms(e, W("enorm.weight"), eps), rms(hidden, W("hnorm.weight"), eps)], -1) @ W("eh_proj.weight").T
    # attention (MLA); q_a/kv_a norms use RMSNorm's default eps 1e-6 in transformers
    a = rms(x, W("input_layernorm.weight"), eps)
    q = rms(a @ W("self_attn.q_a_proj.weight").T, W("self_attn.q_a_layernorm.weight"), 1e-6) @ W("self_attn.q_b_proj.weight").T
    q = q.view(P, H, dn + dr)
    kv = a @ W("self_attn.kv_a_proj_with_mqa.weight").T
    c, k_rope = rms(kv[:, :r], W("self_attn.kv_a_layernorm.weight"), 1e-6), kv[:, r:]
    kvb = (c @ W("self_attn.kv_b_proj.weight").T).view(P, H, dn + dv)
    theta = cfg.rope_parameters["rope_theta"]
    ang = torch.arange(P, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, dr, 2, dtype=torch.float64) / dr)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(t):  # adjacent pairs (x0, x1), (x2, x3), ... rotated by position * theta^(-2i/d)
        t0, t1 = t[..., 0::2], t[..., 1::2]
        cs, sn = (cos[:, None], sin[:, None]) if t.dim() == 3 else (cos, sin)
        return torch.stack([t0 * cs - t1 * sn, t1 * cs + t0 * sn], -1).flatten(-2)
    q_rope, k_rope = rope(q[..., dn:]), rope(k_rope)
    score = (torch.einsum("phd,thd->hpt", q[..., :dn], kvb[..., :dn]) + torch.einsum("phd,td->hpt", q_rope, k_rope)) \
        / math.sqrt(dn + dr)
    score = score.masked_fill(torch.ones(P, P, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hpt,thd->phd", score.softmax(-1), kvb[..., dn:]).reshape(P, H * dv)
    x = x + o @ W("self_attn.o_proj.weight").T
    # MoE: sigmoid scores, top-k by score + bias (selection only), normalised, times routed_scaling_factor
    m = rms(x, W("post_attention_layernorm.weight"), eps)
    assert cfg.n_group == 1
    s = torch.sigmoid(m @ W("mlp.gate.weight").T)
    idx = (s + W("mlp.gate.e_score_correction_bias")).topk(cfg.num_experts_per_tok, -1).indices
    w = s.gather(1, idx)
    w = (w / w.sum(-1, keepdim=True) if cfg.norm_topk_prob else w) * cfg.routed_scaling_factor

    def mlp(t, pre):
        return (F.silu(t @ W(pre + "gate_proj.weight").T) * (t @ W(pre + "up_proj.weight").T)) @ W(pre + "down_proj.weight").T
    y = mlp(m, "mlp.shared_experts.")
    for row in range(P):
        for j in range(idx.shape[1]):
            y[row] += w[row, j] * mlp(m[row:row + 1], f"mlp.experts.{int(idx[row, j])}.")[0]
    x = x + y
    return rms(x, W("shared_head.norm.weight"), eps) @ W("shared_head.head.weight").T


def make_tiny(out_dir):
    spec = HR.FIXTURES["tiny_a"]
    path = os.path.join(out_dir, "tiny_mtp")
    os.makedirs(path, exist_ok=True)
    for attempt in range(50):
        seed = 14000 + attempt
        gen = torch.Generator().manual_seed(seed)
        cfg = Glm4MoeLiteConfig(**spec["cfg"], num_nextn_predict_layers=1)
        model = Glm4MoeLiteForCausalLM(cfg)
        HR.randomize(model, gen, spec.get("embed_std", 1.0))
        mtp = FT.MtpLayer(cfg)
        HR.randomize(mtp, gen, 1.0)
        model = model.to(torch.bfloat16)
        mtp = mtp.to(torch.bfloat16)
        mtp.mlp.gate.e_score_correction_bias.data = mtp.mlp.gate.e_score_correction_bias.float()
        model.save_pretrained(path)
        FT.add_mtp_to_dir(path, mtp, cfg)
        ref, rmtp = load_reference_models(path)
        prompt = torch.randint(0, cfg.vocab_size, (spec["prompt"],), generator=gen).tolist()
        probe = HR.GapProbe(ref)
        probe.hooks.append(rmtp.mlp.gate.register_forward_hook(probe.hook))
        t, mtp_gap, main_gap = reference(ref, rmtp, prompt, True)
        for hk in probe.hooks:
            hk.remove()
        if min(probe.min_gap, mtp_gap, main_gap) >= GAP_MIN:
            break
        print(f"tiny_mtp: seed {seed} rejected (routing gap {probe.min_gap:.2e}, MTP logit gap {mtp_gap:.2e}, "
              f"main logit gap {main_gap:.2e})")
    else:
        raise SystemExit("tiny_mtp: no seed without near-ties")
    spec = spec_forward(path, ref.config, t["mtp_ids"].tolist(), t["hidden"])
    spec_err = float((spec - t["mtp_logits"]).abs().max())
    assert spec_err < 1e-4 * max(1.0, float(t["mtp_logits"].abs().max())), f"plain-torch MTP forward differs by {spec_err}"
    save_file({f"prompt0_{k}": v for k, v in t.items()}, os.path.join(path, "reference.safetensors"))
    os.chmod(os.path.join(path, "reference.safetensors"), 0o644)
    meta = {"seed": seed, "dtype": "bfloat16", "mtp_layer": cfg.num_hidden_layers, "min_routing_gap": probe.min_gap,
            "min_mtp_logit_gap": mtp_gap, "main_logit_gap": main_gap, "embedding_zeroed_at_position_0": True,
            "hidden_after_model_norm": True, "torch": torch.__version__, "transformers": transformers.__version__,
            "max_abs_mtp_logit": float(t["mtp_logits"].abs().max()),
            "max_abs_diff_plain_torch_forward": spec_err}
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"tiny_mtp: seed {seed}, routing gap {probe.min_gap:.3e}, MTP logit gap {mtp_gap:.3e}, plain-torch forward "
          f"within {spec_err:.1e}, next token "
          f"{int(t['next_token'])}, MTP argmax {t['mtp_logits'].argmax(-1).tolist()}")


def make_shipped(model_dir, out_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    if not cfg.get("num_nextn_predict_layers"):
        print(f"{model_dir}: no MTP layer (num_nextn_predict_layers 0): tiny_glm_mtp skipped")
        return
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    snippet = open(os.path.join(ROOT, "tests", "data", "text", "austen_heldout_snippet.txt"), encoding="utf-8").read()
    chat = json.load(open(os.path.join(ROOT, "tests", "data", "chat", "fixtures.json"), encoding="utf-8"))
    prompts = [tok.encode(snippet).ids[:16], chat["thinking"][0]["prompt_ids"]]
    model, mtp = load_reference_models(model_dir)
    path = os.path.join(out_dir, "tiny_glm_mtp")
    os.makedirs(path, exist_ok=True)
    tensors, gaps, agree = {}, [], []
    for k, ids in enumerate(prompts):
        t, g, _ = reference(model, mtp, ids, False)
        err = float((spec_forward(model_dir, model.config, t["mtp_ids"].tolist(), t["hidden"]) - t["mtp_logits"]).abs().max())
        assert err < 1e-4 * max(1.0, float(t["mtp_logits"].abs().max())), f"plain-torch MTP forward differs by {err}"
        tensors.update({f"prompt{k}_{n}": v for n, v in t.items()})
        gaps.append(g)
        # teacher-forced agreement inside the prompt: MTP argmax at p vs the main model's greedy token at p+1
        main_next = model.lm_head(t["hidden"][1:]).argmax(-1)
        agree.append(float((t["mtp_logits"][:-1].argmax(-1) == main_next).float().mean()))
    save_file(tensors, os.path.join(path, "reference.safetensors"))
    os.chmod(os.path.join(path, "reference.safetensors"), 0o644)
    sha = hashlib.sha256(open(os.path.join(model_dir, "model.safetensors"), "rb").read()).hexdigest()
    meta = {"model": model_dir, "model_safetensors_sha256": sha,
            "prompts": ["austen_heldout_snippet.txt, first 16 tokens", "tests/data/chat/fixtures.json thinking[0]"],
            "min_mtp_logit_gap": gaps, "prompt_agreement": agree, "embedding_zeroed_at_position_0": True,
            "torch": torch.__version__, "transformers": transformers.__version__}
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"tiny_glm_mtp: {[len(p) for p in prompts]} tokens, MTP logit gaps {[f'{g:.2e}' for g in gaps]}, "
          f"agreement within the prompts {agree}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/hf")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-glm"), help="the shipped model (with an MTP layer)")
    ap.add_argument("--only", nargs="*", choices=["tiny_mtp", "tiny_glm_mtp"])
    args = ap.parse_args()
    torch.manual_seed(0)
    if not args.only or "tiny_mtp" in args.only:
        make_tiny(args.out)
    if not args.only or "tiny_glm_mtp" in args.only:
        make_shipped(args.model, args.out)


if __name__ == "__main__":
    main()

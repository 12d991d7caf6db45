#!/usr/bin/env python3
"""Trains the built-in model: a small Glm4MoeLiteForCausalLM (the GLM-4.7-Flash architecture: MLA attention,
a dense first layer, then sigmoid-routed MoE layers with a shared expert) on Jane Austen's novels.

Steps (docs/default_model.md has the why of each choice):
 1. tokenizer: a byte-level BPE trained with HF `tokenizers` on the training text (GLM-4.7's pre-split regex,
    ByteLevel without regex, no normalizer), 4064 merges-vocabulary tokens plus GLM's 32 special tokens at the
    top (ids 4064..4095, in GLM's own order), saved as tokenizer.json + tokenizer_config.json, and the GLM-4.x
    chat template as chat_template.jinja. With --tokenizer DIR an existing one is reused instead.
 2. the model, trained in bf16 with fp32 master weights (AdamW, warm-up then cosine on the wall clock: the run
    lasts --minutes however fast the GPU is), random windows of --seq tokens, residual/embedding dropout
    (forward hooks; training only, not part of the architecture), evaluation on the held-out text every
    --eval-every steps, and the weights with the best held-out loss kept.
    MoE balance: DeepSeek-V3's auxiliary-loss-free rule. transformers keeps e_score_correction_bias as a
    zero buffer that nothing trains; here, after every step, each router's bias moves by +gamma for experts that
    got fewer than the mean number of tokens in that step and -gamma for those that got more (gamma follows
    the learning-rate schedule down to 0). The bias only changes which experts are picked, as in inference.
 3. saves the HF directory (bf16 weights, e_score_correction_bias f32, config.json with GLM's three stop ids,
    generation_config.json), reloads it and prints the held-out perplexity of the saved model, evaluated as
    `trellm perplexity` does: non-overlapping windows of --seq tokens, every token but each window's first
    predicted. --tar FILE also packs the directory.

Usage:
  python3 scripts/prepare_austen.py --out DATA
  python3 scripts/train_tiny_glm.py --data DATA --out models/tiny-glm            # ~3 min on one H100
  python3 scripts/train_tiny_glm.py --data DATA --out /tmp/smoke --smoke          # CPU, seconds
Needs torch, transformers (made with 2.11 / 5.17), tokenizers, numpy, safetensors.
"""
import argparse
import json
import math
import os
import shutil
import tarfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLM_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GLM-4.7's special tokens in their order (GLM: 154820...; here 4064...), see shared/GLM47FLASH.md.
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>",
            "<|end_of_transcription|>", "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>", "<think>",
            "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>",
            "</arg_key>", "<arg_value>", "</arg_value>", "/nothink"]
VOCAB = 4096
BPE_VOCAB = VOCAB - len(SPECIALS)


def model_config(smoke, eos, pad):
    from transformers import Glm4MoeLiteConfig
    layers = 2 if smoke else 8
    return Glm4MoeLiteConfig(
        vocab_size=VOCAB, hidden_size=64 if smoke else 256, intermediate_size=128 if smoke else 512,
        moe_intermediate_size=32 if smoke else 64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4 if smoke else 8, num_experts_per_tok=2,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8, kv_lora_rank=32 if smoke else 128,
        q_lora_rank=32 if smoke else 128, qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=64,
        first_k_dense_replace=1, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=True,
        max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False,
        tie_word_embeddings=False, initializer_range=0.02, eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
        num_nextn_predict_layers=0)


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, out):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((p for t in texts for p in t.split("\n\n")), trainer)
    j = json.loads(tok.to_str())
    assert len(j["model"]["vocab"]) <= BPE_VOCAB
    for i, s in enumerate(SPECIALS):  # specials in the model vocabulary too: that pins their ids (as GLM does)
        j["model"]["vocab"][s] = BPE_VOCAB + i
    j["added_tokens"] = [{"id": BPE_VOCAB + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(SPECIALS)]
    j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
    cfg = {"added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")} for a in j["added_tokens"]},
           "clean_up_tokenization_spaces": False, "do_lower_case": False, "eos_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>", "model_max_length": 2048, "padding_side": "left", "remove_space": False,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    shutil.copy(os.path.join(ROOT, "tests", "data", "templates", "glm4.jinja"), os.path.join(out, "chat_template.jinja"))


def copy_tokenizer(src, out):
    os.makedirs(out, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(src, f), os.path.join(out, f))


def encode_docs(tok, texts, eot):
    """Documents joined as <|endoftext|> doc <|endoftext|> doc ..."""
    ids = []
    for t in texts:
        ids.append(eot)
        ids.extend(tok.encode(t).ids)
    return np.array(ids, dtype=np.int64)


def read_dir(d):
    return [open(os.path.join(d, f), encoding="utf-8").read() for f in sorted(os.listdir(d)) if f.endswith(".txt")]


# ---------------------------------------------------------------------------------------------- training helpers
def add_dropout(model, p):
    def hook(mod, args, out):
        if not mod.training or p == 0:
            return out
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, True),) + tuple(out[1:])
        return F.dropout(out, p, True)
    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


class LoadBalancer:
    """DeepSeek-V3 auxiliary-loss-free balancing: counts each router's picks in a step, then nudges the
    selection bias of under-loaded experts up and of over-loaded ones down by gamma."""

    def __init__(self, model, layers=None):
        """Balances the routers of `layers` (default: the model's decoder layers)."""
        layers = model.model.layers if layers is None else layers
        self.routers = [l.mlp.gate for l in layers if hasattr(l.mlp, "gate")]
        E = self.routers[0].num_experts if self.routers else 1
        dev = next(model.parameters()).device
        self.counts = torch.zeros(len(self.routers), E, device=dev)
        self.window = torch.zeros_like(self.counts)  # since the last report
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(mod, args, out):
            if mod.training:
                idx = out[2].flatten()  # index_add_ rather than bincount: no device sync
                self.counts[i].index_add_(0, idx, torch.ones(idx.shape, device=idx.device))
        return hook

    @torch.no_grad()
    def step(self, gamma):
        for i, r in enumerate(self.routers):
            c = self.counts[i]
            r.e_score_correction_bias += gamma * torch.sign(c.mean() - c)
        self.window += self.counts
        self.counts.zero_()

    def report(self):
        w = self.window
        ratio = (w.max(1).values / w.mean(1).clamp(min=1)).tolist()
        self.window.zero_()
        return "max/mean expert load per MoE layer " + " ".join(f"{r:.2f}" for r in ratio)


@torch.no_grad()
def evaluate(model, ids, seq, device, batch=16):
    """Mean next-token loss over non-overlapping windows of `seq` tokens (each window's first token is context
    only), exactly the windows `trellm perplexity --ctx seq` uses. Returns (mean loss, predicted tokens)."""
    was = model.training
    model.eval()
    wins = [ids[s:s + seq] for s in range(0, len(ids), seq) if len(ids) - s >= 2]
    total, count = 0.0, 0
    for b in range(0, len(wins), batch):
        for w in wins[b:b + batch]:  # ragged last window: one at a time keeps it simple
            x = torch.as_tensor(w, device=device)[None]
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(w) - 1
    model.train(was)
    return total / count, count


def lr_at(step, frac, args):
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * (args.final_lr_frac + (1 - args.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder made by prepare_austen.py (train/, val/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="reuse tokenizer.json/tokenizer_config.json/chat_template.jinja from here")
    ap.add_argument("--smoke", action="store_true", help="tiny config, a few CPU steps: checks the whole pipeline")
    ap.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--final-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--gamma", type=float, default=1e-3, help="bias step of the aux-loss-free balancing")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tar", help="also pack the output folder into this .tar")
    args = ap.parse_args()
    if args.smoke:
        args.seq, args.batch, args.warmup, args.eval_every = 64, 4, 2, 4
        args.max_steps = args.max_steps or 8
    t_start = time.time()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, Glm4MoeLiteForCausalLM
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""), flush=True)

    train_texts, val_texts = read_dir(os.path.join(args.data, "train")), read_dir(os.path.join(args.data, "val"))
    if args.tokenizer:
        copy_tokenizer(args.tokenizer, args.out)
    else:
        train_tokenizer(train_texts, args.out)
    tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    eot, user, obs = (tok.token_to_id(s) for s in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    train_ids, val_ids = encode_docs(tok, train_texts, eot), encode_docs(tok, val_texts, eot)
    if args.smoke:
        val_ids = val_ids[:4 * args.seq]
    print(f"tokens: train {len(train_ids):,}, held out {len(val_ids):,} "
          f"({sum(len(t.encode()) for t in train_texts) / len(train_ids):.2f} bytes/token) "
          f"[{time.time() - t_start:.1f} s]", flush=True)

    cfg = model_config(args.smoke, [eot, user, obs], eot)
    model = Glm4MoeLiteForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; "
          + json.dumps({k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "n_routed_experts",
                                                   "num_experts_per_tok", "moe_intermediate_size",
                                                   "kv_lora_rank", "q_lora_rank")}), flush=True)
    masters = [p.detach().clone().float() for p in model.parameters()]
    model.to(torch.bfloat16)
    for l in model.model.layers:  # selection bias stays f32 (as in GLM's checkpoint)
        if hasattr(l.mlp, "gate"):
            l.mlp.gate.e_score_correction_bias = l.mlp.gate.e_score_correction_bias.float()
    params = list(model.parameters())
    decay = [m for m, p in zip(masters, params) if p.dim() >= 2]
    no_decay = [m for m, p in zip(masters, params) if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")
    add_dropout(model, args.dropout)
    balancer = LoadBalancer(model)
    model.train()

    data = torch.as_tensor(train_ids, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    offs = torch.arange(args.seq + 1, device=device)

    def batch():
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), device=device, generator=gen)
        w = data[starts[:, None] + offs]
        return w[:, :-1], w[:, 1:]

    def train_step(x, y):
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        return loss

    # The experts run through torch's grouped_mm (transformers' default); fall back to the per-expert loop if
    # this torch/GPU cannot do it.
    try:
        x, y = batch()
        train_step(x[:1], y[:1])
    except Exception as e:  # noqa: BLE001
        print(f"grouped_mm experts failed ({type(e).__name__}: {e}); using the eager expert loop", flush=True)
        model.set_experts_implementation("eager")
    model.zero_grad(set_to_none=True)
    balancer.counts.zero_()

    budget = args.minutes * 60
    curve, best = [], (float("inf"), None, -1)
    t0, step, loss_acc, n_acc, tokens = time.time(), 0, 0.0, 0, 0
    print(f"training for {args.minutes} min: batch {args.batch} x {args.seq} tokens, lr {args.lr}, "
          f"dropout {args.dropout}, wd {args.wd}, gamma {args.gamma} [{time.time() - t_start:.1f} s]", flush=True)
    while True:
        frac = (time.time() - t0) / budget
        done = frac >= 1.0 or (args.max_steps and step >= args.max_steps)
        if done or (step and step % args.eval_every == 0):
            vl, _ = evaluate(model, val_ids, args.seq, device)
            tl = loss_acc / max(n_acc, 1)
            curve.append({"step": step, "time_s": round(time.time() - t0, 1), "train_loss": round(tl, 4),
                          "val_loss": round(vl, 4), "val_ppl": round(math.exp(vl), 3)})
            print(f"eval step {step:5d} {time.time() - t0:6.1f}s train {tl:.4f} held-out {vl:.4f} "
                  f"(ppl {math.exp(vl):.2f}) {balancer.report()}", flush=True)
            if vl < best[0]:
                best = (vl, [p.detach().clone() for p in params], step)
            loss_acc, n_acc = 0.0, 0
        if done:
            break
        lr = lr_at(step, frac, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch()
        loss = train_step(x, y)
        for m, p in zip(masters, params):
            m.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)
        balancer.step(args.gamma * lr / args.lr)
        if step % 10 == 0 or args.smoke:  # a sync every 10 steps keeps the host close to the GPU
            loss_acc += float(loss.detach())
            n_acc += 1
        tokens += x.numel()
        step += 1
        if step % 100 == 0:
            el = time.time() - t0
            print(f"step {step:5d} {el:6.1f}s lr {lr:.2e} loss {float(loss):.4f} "
                  f"{tokens / el / 1e3:.0f}k tok/s, epoch {tokens / len(train_ids):.1f}", flush=True)
    train_s = time.time() - t0
    print(f"trained {step} steps, {tokens:,} tokens ({tokens / len(train_ids):.1f} epochs) in {train_s:.1f} s; "
          f"best held-out loss {best[0]:.4f} at step {best[2]}", flush=True)

    with torch.no_grad():  # keep the best weights (bias buffers are not parameters: the final ones are kept)
        torch._foreach_copy_(params, best[1])
    model.generation_config = GenerationConfig(eos_token_id=[eot, user, obs], pad_token_id=eot, do_sample=True,
                                               temperature=0.8, top_p=0.95)
    model.save_pretrained(args.out)
    biases = torch.stack([r.e_score_correction_bias for r in balancer.routers])
    print(f"saved {args.out}; e_score_correction_bias range [{float(biases.min()):.3f}, {float(biases.max()):.3f}]")

    # The saved files, reloaded: the held-out perplexity anyone can reproduce (bf16 weights, f32 compute).
    ref = Glm4MoeLiteForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device)
    vl, n = evaluate(ref, val_ids, args.seq, device)
    snippet_path = os.path.join(args.data, "heldout_snippet.txt")
    sl, sn = evaluate(ref, tok.encode(open(snippet_path, encoding="utf-8").read()).ids, args.seq, device) \
        if os.path.exists(snippet_path) else (float("nan"), 0)
    summary = {"steps": step, "train_seconds": round(train_s, 1), "tokens_seen": tokens,
               "epochs": round(tokens / len(train_ids), 2), "train_tokens": len(train_ids), "params": n_params,
               "final_train_loss": curve[-1]["train_loss"], "best_step": best[2],
               "heldout_loss": round(vl, 4), "heldout_ppl": round(math.exp(vl), 3), "heldout_tokens": n,
               "heldout_ctx": args.seq, "snippet_ppl": round(math.exp(sl), 3), "snippet_tokens": sn,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args),
               "curve": curve}
    with open(os.path.join(args.out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"saved model: held-out perplexity {math.exp(vl):.3f} over {n} tokens (ctx {args.seq}), "
          f"snippet perplexity {math.exp(sl):.3f} over {sn} tokens")
    prompt = tok.encode("Once upon a time").ids
    out = ref.generate(torch.tensor([prompt], device=device), max_new_tokens=60, do_sample=False)
    print("greedy sample: " + json.dumps(tok.decode(out[0].tolist())))
    if args.tar:
        with tarfile.open(args.tar, "w") as t:
            t.add(args.out, arcname=os.path.basename(os.path.normpath(args.out)))
    print(f"total {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()

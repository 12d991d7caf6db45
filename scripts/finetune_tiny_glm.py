#!/usr/bin/env python3
"""Teaches the built-in model to chat and to draft (issue 14), in two stages on top of models/tiny-glm.

Stage A, chat fine-tune: every weight trained on a mix of prose windows (the Austen training text, every token
a target, as in scripts/train_tiny_glm.py) and rows of the synthetic chat corpus (scripts/make_chat_corpus.py;
whole conversations packed into rows of --seq + 1 tokens, padded with <|endoftext|>; the loss only on the mask-1
tokens, i.e. what an assistant turn generates). loss = (1 - c) * prose mean + c * chat mean, c = --chat-frac,
which is also the fraction of each batch's rows that are chat. Same machinery as the original training
(imported from train_tiny_glm.py): bf16 weights with fp32 master copies, AdamW, clipping 1.0, warm-up then a
cosine on the wall clock (--minutes), dropout hooks, DeepSeek-V3's aux-loss-free expert balancing. Every
--eval-every steps: held-out prose loss (the perplexity windows of `trellm perplexity`) and held-out chat loss
(masked tokens of heldout.npz, each conversation from position 0). Kept: the evaluation with the lowest chat
loss among those whose prose perplexity is within --max-ppl-rise of the starting model's; the final one if
none is. The script reports both perplexities (before/after) and what it kept.

Stage B, the MTP layer (GLM-4.7-Flash / DeepSeek-V3 multi-token prediction, shared/GLM47FLASH.md): with the
stage-A model frozen, one extra layer learns to predict token p+2 at position p from the main model's final
hidden state h_p (after model.norm, what vLLM and SGLang feed) and the embedding of token p+1 (the main model's
embed_tokens; zeroed at position 0 as vLLM's deepseek_mtp does):
    x = eh_proj(cat(enorm(embed(t[p+1])), hnorm(h_p)))      # embedding half first
    x = decoder_layer(x)                                    # transformers' own Glm4MoeLiteDecoderLayer, MoE,
                                                            # its own causal attention over the same positions
    logits = shared_head.head(shared_head.norm(x))
MtpLayer below *is* a Glm4MoeLiteDecoderLayer (subclass; only enorm, hnorm, eh_proj and shared_head added), so
the layer math is HF's and its state_dict keys are the checkpoint names under model.layers.<num_hidden_layers>.
Init: the decoder part copied from the main model's last layer, shared_head.norm from model.norm,
shared_head.head = lm_head (frozen by default: DeepSeek-V3 shares the output head), eh_proj = [0.02 N(0,1) | I].
Loss on targets t[p+2] (all prose positions; assistant positions of chat rows):
(1 - a) * cross-entropy with the true token + a * KL(main model's distribution at p+1 || MTP's), a = --mtp-distill.
Reported: top-1 agreement of the MTP's argmax at p with the main model's greedy token at p+1 (the draft a
speculative decoder would have accepted) on held-out prose windows and on held-out chats (assistant positions),
before and after training, and the accuracy against the true token.

Output (--out): the HF directory (save_pretrained of the stage-A model: bf16, experts one by one, f32
e_score_correction_bias) with the MTP tensors added to model.safetensors as model.layers.<N>.* (experts one by
one as well, bf16, e_score_correction_bias f32), config.json "num_nextn_predict_layers": 1, tokenizer files,
training_summary.json. transformers loads the directory and ignores the extra tensors (it warns about
unexpected keys: its ignore list names only layer 47); the script reloads it both ways and checks.

Usage:
  python3 scripts/prepare_austen.py --out DATA
  python3 scripts/make_chat_corpus.py --data DATA --out CHAT
  python3 scripts/finetune_tiny_glm.py --data DATA --chat CHAT --base models/tiny-glm --out OUT \
      [--minutes 2] [--mtp-minutes 2]                                       # GPU: ~6 min on one H100/H200
  python3 scripts/finetune_tiny_glm.py --data DATA --chat CHAT --out /tmp/ft --smoke   # CPU, a few steps
Needs torch, transformers (5.17), tokenizers, numpy, safetensors.
"""
import argparse
import copy
import json
import math
import os
import re
import sys
import tarfile
import time
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_tiny_glm as T  # noqa: E402

from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import (  # noqa: E402
    Glm4MoeLiteDecoderLayer, Glm4MoeLiteRMSNorm)
from transformers.masking_utils import create_causal_mask  # noqa: E402

ROOT = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------------- the MTP layer
class SharedHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = Glm4MoeLiteRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MtpLayer(Glm4MoeLiteDecoderLayer):
    """GLM's MTP module: transformers' decoder layer (index num_hidden_layers, MoE) plus enorm, hnorm, eh_proj and
    shared_head. state_dict() keys are the checkpoint's names below model.layers.<N>. (experts fused in memory,
    as transformers keeps them; mtp_tensors() writes them one by one)."""

    def __init__(self, config):
        cfg = copy.deepcopy(config)
        cfg.mlp_layer_types = list(config.mlp_layer_types)[:config.num_hidden_layers] + ["sparse"]
        super().__init__(cfg, config.num_hidden_layers)
        self.mtp_config = cfg
        H = config.hidden_size
        self.enorm = Glm4MoeLiteRMSNorm(H, config.rms_norm_eps)
        self.hnorm = Glm4MoeLiteRMSNorm(H, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.shared_head = SharedHead(config)

    def mtp_forward(self, embeds, hidden, position_ids, rotary_emb):
        """embeds [B, S, H]: embed(t[p+1]); hidden [B, S, H]: main model's h_p after model.norm; position_ids
        [B, S] or [1, S]: p. Returns (logits [B, S, V] predicting t[p+2], the layer's output [B, S, H])."""
        embeds = embeds.masked_fill((position_ids == 0)[..., None], 0.0)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        mask = create_causal_mask(config=self.mtp_config, inputs_embeds=x, attention_mask=None, past_key_values=None,
                                  position_ids=position_ids)
        x = self(x, attention_mask=mask, position_ids=position_ids,
                 position_embeddings=rotary_emb(x, position_ids=position_ids))
        return self.shared_head.head(self.shared_head.norm(x)), x


def mtp_tensors(mtp, n_layer):
    """{checkpoint name: tensor} for the MTP layer, experts one by one (gate_proj, up_proj, down_proj)."""
    out, p = {}, f"model.layers.{n_layer}."
    for k, v in mtp.state_dict().items():
        v = v.detach().contiguous().cpu()
        if k.endswith("mlp.experts.gate_up_proj"):
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}mlp.experts.{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{p}mlp.experts.{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{p}mlp.experts.{e}.down_proj.weight"] = v[e].clone()
        else:
            out[p + k] = v
    return out


def load_mtp(config, model_dir, dtype=torch.float32):
    """The MTP layer of a saved directory (model.layers.<N>.*, experts one by one or fused), as an MtpLayer."""
    from safetensors import safe_open
    n = config.num_hidden_layers
    p = f"model.layers.{n}."
    files = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    sd = {}
    for fn in files:
        with safe_open(os.path.join(model_dir, fn), "pt") as f:
            for k in f.keys():
                if k.startswith(p):
                    sd[k[len(p):]] = f.get_tensor(k)
    if not sd:
        raise SystemExit(f"{model_dir}: no MTP tensors ({p}*)")
    E = config.n_routed_experts
    if "mlp.experts.0.gate_proj.weight" in sd:
        sd["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd.pop(f"mlp.experts.{e}.gate_proj.weight"), sd.pop(f"mlp.experts.{e}.up_proj.weight")]) for e in range(E)])
        sd["mlp.experts.down_proj"] = torch.stack([sd.pop(f"mlp.experts.{e}.down_proj.weight") for e in range(E)])
    mtp = MtpLayer(config)
    mtp.load_state_dict(sd, strict=True)
    mtp.to(dtype)
    mtp.mlp.gate.e_score_correction_bias.data = mtp.mlp.gate.e_score_correction_bias.float()
    return mtp


def add_mtp_to_dir(out, mtp, config):
    """Appends the MTP tensors to OUT/model.safetensors and sets num_nextn_predict_layers = 1."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(out, "model.safetensors")
    sd = load_file(path)
    extra = mtp_tensors(mtp, config.num_hidden_layers)
    assert not set(sd) & set(extra)
    sd.update(extra)
    save_file(sd, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["num_nextn_predict_layers"] = 1
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return extra


# ---------------------------------------------------------------------------------------------- data
def load_chat(path):
    z = np.load(path)
    return z["ids"].astype(np.int64), z["mask"].astype(np.int64), z["offsets"]


def pack_rows(ids, mask, offs, row_len, pad, seed):
    """Whole conversations (shuffled) packed greedily into rows of row_len tokens; the tail padded with `pad`
    (mask 0). Conversations longer than a row are skipped (counted)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(offs) - 1)
    rows_i, rows_m, cur_i, cur_m, skipped = [], [], [], [], 0

    def flush():
        n = sum(len(a) for a in cur_i)
        rows_i.append(np.concatenate(cur_i + [np.full(row_len - n, pad)]))
        rows_m.append(np.concatenate(cur_m + [np.zeros(row_len - n, np.int64)]))
        cur_i.clear()
        cur_m.clear()
    for c in order:
        a, b = offs[c], offs[c + 1]
        if b - a > row_len:
            skipped += 1
            continue
        if sum(len(x) for x in cur_i) + (b - a) > row_len:
            flush()
        cur_i.append(ids[a:b])
        cur_m.append(mask[a:b])
    if cur_i:
        flush()
    return np.stack(rows_i), np.stack(rows_m), skipped


def conv_batches(ids, mask, offs, limit, pad, batch=32):
    """Held-out conversations, each from position 0, right-padded into batches (causal: padding at the end
    changes nothing before it). Yields (ids [b, L], mask [b, L]) with mask 0 on the padding."""
    n = min(limit, len(offs) - 1) if limit else len(offs) - 1
    for s in range(0, n, batch):
        cs = range(s, min(n, s + batch))
        L = max(offs[c + 1] - offs[c] for c in cs)
        x = np.full((len(cs), L), pad)
        m = np.zeros((len(cs), L), np.int64)
        for j, c in enumerate(cs):
            a, b = offs[c], offs[c + 1]
            x[j, :b - a], m[j, :b - a] = ids[a:b], mask[a:b]
        yield torch.as_tensor(x), torch.as_tensor(m)


@torch.no_grad()
def chat_eval(model, chat, pad, device, limit):
    """Mean loss on the held-out chats' assistant tokens (mask 1)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x, m in conv_batches(*chat, limit, pad):
        x, m = x.to(device), m.to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        w = m[:, 1:].reshape(-1).float()
        total += float((ce * w).sum())
        count += int(w.sum())
    model.train(was)
    return total / max(count, 1), count


class MasterOpt:
    """bf16 parameters with fp32 master copies and AdamW on the masters (as train_tiny_glm.py does)."""

    def __init__(self, params, lr, wd, device):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().clone().float() for p in self.params]
        decay = [m for m, p in zip(self.masters, self.params) if p.dim() >= 2]
        no_decay = [m for m, p in zip(self.masters, self.params) if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")

    def step(self, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr
        for m, p in zip(self.masters, self.params):
            m.grad = p.grad.float()
            p.grad = None
        gn = torch.nn.utils.clip_grad_norm_(self.masters, 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.masters)
        return gn

    def snapshot(self):
        return [p.detach().clone() for p in self.params]

    def restore(self, snap):
        with torch.no_grad():
            torch._foreach_copy_(self.params, snap)
            torch._foreach_copy_(self.masters, [s.float() for s in snap])


class Batches:
    """Training rows: prose windows (every target counts) and packed chat rows (mask-1 targets count)."""

    def __init__(self, prose_ids, chat_rows, chat_mask, seq, batch, chat_frac, device, seed):
        self.prose = torch.as_tensor(prose_ids, device=device)
        self.rows = torch.as_tensor(chat_rows, device=device)
        self.rmask = torch.as_tensor(chat_mask, device=device)
        self.seq, self.device = seq, device
        self.n_chat = max(1, round(batch * chat_frac)) if chat_frac > 0 else 0
        self.n_prose = batch - self.n_chat
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.offs = torch.arange(seq + 1, device=device)

    def __call__(self):
        """x [B, seq+1] and w [B, seq+1] (w[:, i] = 1 when x[:, i] is a target); the first n_prose rows are prose."""
        parts_x, parts_w = [], []
        if self.n_prose:
            s = torch.randint(0, len(self.prose) - self.seq - 1, (self.n_prose,), device=self.device, generator=self.gen)
            x = self.prose[s[:, None] + self.offs]
            parts_x.append(x)
            parts_w.append(torch.ones_like(x))
        if self.n_chat:
            r = torch.randint(0, len(self.rows), (self.n_chat,), device=self.device, generator=self.gen)
            parts_x.append(self.rows[r])
            parts_w.append(self.rmask[r])
        return torch.cat(parts_x), torch.cat(parts_w)


def mixed_loss(per_token, w, n_prose, chat_frac):
    """(1 - c) * mean over the prose rows + c * mean over the chat rows' weighted tokens."""
    parts, total = [], 0.0
    if n_prose:
        lp = (per_token[:n_prose] * w[:n_prose]).sum() / w[:n_prose].sum().clamp(min=1)
        total = total + (1 - chat_frac if n_prose < len(w) else 1.0) * lp
        parts.append(lp)
    if n_prose < len(w):
        lc = (per_token[n_prose:] * w[n_prose:]).sum() / w[n_prose:].sum().clamp(min=1)
        total = total + (chat_frac if n_prose else 1.0) * lc
        parts.append(lc)
    return total, parts


# ---------------------------------------------------------------------------------------------- generation checks
TOOL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_reply(text, thinking_open):
    """GLM output -> (reasoning, content, [(name, {key: value})]): the checks a later C++ test makes."""
    reasoning = ""
    if thinking_open:
        if "</think>" in text:
            reasoning, text = text.split("</think>", 1)
        else:
            reasoning, text = text, ""
    calls = []
    for body in TOOL_RE.findall(text):
        name = body.split("<arg_key>", 1)[0].strip()
        args = dict(re.findall(r"<arg_key>(.*?)</arg_key><arg_value>(.*?)</arg_value>", body, re.S))
        for k, v in args.items():
            try:
                args[k] = json.loads(v)
            except ValueError:
                pass
        calls.append((name, args))
    content = TOOL_RE.sub("", text)
    for stop in ("<|user|>", "<|observation|>", "<|endoftext|>"):
        content = content.split(stop)[0]
    return reasoning.strip(), content.strip(), calls


@torch.no_grad()
def generation_checks(model, tok, fixtures, device, max_new, eos):
    """Greedy replies to the held-out fixture prompts: does the model call the right tool with the right
    arguments; does thinking on give reasoning + content and thinking off no reasoning."""
    model.eval()
    out = {"tool_calls": [], "thinking": []}
    for group in ("tool_calls", "thinking"):
        for case in fixtures[group]:
            x = torch.tensor([case["prompt_ids"]], device=device)
            y = model.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
            text = tok.decode(y[0, x.shape[1]:].tolist(), skip_special_tokens=False)
            reasoning, content, calls = parse_reply(text, case["enable_thinking"])
            r = {"label": case["label"], "reply": text}
            if group == "tool_calls":
                want = [(c["name"], c["arguments"]) for c in case["expected_tool_calls"]]
                r["ok"] = calls == want
                r["name_ok"] = [c[0] for c in calls] == [c[0] for c in want]
            elif case["expect_reasoning"]:
                r["ok"] = bool(reasoning) and bool(content)
            else:  # thinking off: no reasoning at all, not even a stray <think> or </think>
                r["ok"] = "<think>" not in text and "</think>" not in text and bool(content)
            out[group].append(r)
    model.train()
    return out


# ---------------------------------------------------------------------------------------------- MTP stage
@torch.no_grad()
def mtp_eval(model, mtp, windows, device, weights=None):
    """Over (ids [B, L], weights [B, L]) batches: top-1 agreement of the MTP at p with the main model's greedy
    token at p+1, and the MTP's accuracy on the true t[p+2]; counted where the weight of t[p+2] is 1."""
    mtp.eval()
    agree = correct = count = 0
    loss_sum = 0.0
    for x, w in windows:
        x, w = x.to(device), w.to(device)
        if x.shape[1] < 3:
            continue
        h = model.model(input_ids=x, use_cache=False).last_hidden_state
        main_next = model.lm_head(h[:, 1:-1]).argmax(-1)  # main's greedy token after t[p+1] = its guess of t[p+2]
        emb = model.model.embed_tokens(x[:, 1:-1])
        pos = torch.arange(x.shape[1] - 2, device=device)[None]
        logits, _ = mtp.mtp_forward(emb, h[:, :-2], pos, model.model.rotary_emb)
        pred = logits.argmax(-1)
        m = w[:, 2:].bool()
        agree += int(((pred == main_next) & m).sum())
        correct += int(((pred == x[:, 2:]) & m).sum())
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 2:].reshape(-1), reduction="none")
        loss_sum += float((ce * m.reshape(-1)).sum())
        count += int(m.sum())
    mtp.train()
    return {"agreement": agree / max(count, 1), "accuracy": correct / max(count, 1),
            "loss": loss_sum / max(count, 1), "positions": count}


def prose_windows(ids, seq, limit=None):
    wins = [ids[s:s + seq] for s in range(0, len(ids), seq) if len(ids) - s >= 3]
    for w in wins[:limit]:
        t = torch.as_tensor(w)[None]
        yield t, torch.ones_like(t)


def init_mtp(model, mtp, init):
    cfg = model.config
    if init == "last":
        src = model.model.layers[cfg.num_hidden_layers - 1]
        assert hasattr(src.mlp, "gate"), "the last main layer must be MoE to seed the MTP layer"
        missing = mtp.load_state_dict(src.state_dict(), strict=False)
        assert not missing.unexpected_keys, missing
    else:
        mtp.apply(model._init_weights)
    H = cfg.hidden_size
    with torch.no_grad():
        w = torch.zeros(H, 2 * H)
        w[:, :H] = 0.02 * torch.randn(H, H)
        w[:, H:] = torch.eye(H)
        mtp.eh_proj.weight.copy_(w)
        mtp.enorm.weight.fill_(1.0)
        mtp.hnorm.weight.fill_(1.0)
        mtp.shared_head.norm.weight.copy_(model.model.norm.weight.float())
        mtp.shared_head.head.weight.copy_(model.lm_head.weight.float())


def train_mtp(model, args, batches, prose_eval, chat_eval_wins, device, log):
    cfg = model.config
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    mtp = MtpLayer(cfg)
    init_mtp(model, mtp, args.mtp_init)
    mtp.to(device)
    mtp.to(torch.bfloat16)
    mtp.mlp.gate.e_score_correction_bias.data = mtp.mlp.gate.e_score_correction_bias.float()
    if not args.mtp_train_head:
        mtp.shared_head.head.weight.requires_grad_(False)
    n_train = sum(p.numel() for p in mtp.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in mtp.parameters())
    log(f"MTP layer: {n_all / 1e6:.3f} M parameters ({n_train / 1e6:.3f} M trained; shared_head.head "
        f"{'trained' if args.mtp_train_head else 'frozen = lm_head'}), init {args.mtp_init}")
    opt = MasterOpt(mtp.parameters(), args.mtp_lr, args.wd, device)
    balancer = T.LoadBalancer(mtp_wrapper(mtp), layers=[mtp])
    mtp.train()
    before = {"prose": mtp_eval(model, mtp, prose_eval(), device), "chat": mtp_eval(model, mtp, chat_eval_wins(), device)}
    log(f"MTP before training: held-out prose agreement {before['prose']['agreement']:.4f}, chat (assistant) "
        f"{before['chat']['agreement']:.4f}")
    sched = types.SimpleNamespace(lr=args.mtp_lr, warmup=args.mtp_warmup, final_lr_frac=args.final_lr_frac)
    budget, t0, step, curve, acc = args.mtp_minutes * 60, time.time(), 0, [], []
    while True:
        frac = (time.time() - t0) / budget
        done = frac >= 1.0 or (args.mtp_max_steps and step >= args.mtp_max_steps)
        if done or (step and step % args.eval_every == 0):
            ev = {"prose": mtp_eval(model, mtp, prose_eval(), device), "chat": mtp_eval(model, mtp, chat_eval_wins(), device)}
            tl = sum(acc) / max(len(acc), 1)
            acc = []
            curve.append({"step": step, "time_s": round(time.time() - t0, 1), "train_loss": round(tl, 4),
                          "prose_agreement": round(ev["prose"]["agreement"], 4), "chat_agreement": round(ev["chat"]["agreement"], 4),
                          "prose_accuracy": round(ev["prose"]["accuracy"], 4)})
            log(f"mtp eval step {step:5d} {time.time() - t0:6.1f}s train {tl:.4f} agreement prose "
                f"{ev['prose']['agreement']:.4f} chat {ev['chat']['agreement']:.4f}; accuracy prose "
                f"{ev['prose']['accuracy']:.4f} {balancer.report()}")
        if done:
            break
        x, w = batches()
        with torch.no_grad():
            h = model.model(input_ids=x[:, :-1], use_cache=False).last_hidden_state  # [B, T, H], T = seq
            teacher = model.lm_head(h[:, 1:]).float()                                  # main at p+1 = guess of t[p+2]
            emb = model.model.embed_tokens(x[:, 1:-1])                                  # t[p+1], p = 0..T-2
        pos = torch.arange(x.shape[1] - 2, device=device)[None]
        logits, _ = mtp.mtp_forward(emb, h[:, :-1], pos, model.model.rotary_emb)
        logits = logits.float()
        tgt, wt = x[:, 2:], w[:, 2:].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(wt)
        kl = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(logits, -1))).sum(-1)
        per_tok = (1 - args.mtp_distill) * ce + args.mtp_distill * kl
        loss, _ = mixed_loss(per_tok, wt, batches.n_prose, args.chat_frac)
        loss.backward()
        lr = T.lr_at(step, frac, sched)
        opt.step(lr)
        balancer.step(args.gamma * lr / args.mtp_lr)
        if step % 10 == 0 or args.smoke:
            acc.append(float(loss.detach()))
        step += 1
        if step % 100 == 0:
            log(f"mtp step {step:5d} {time.time() - t0:6.1f}s lr {lr:.2e} loss {float(loss):.4f}")
    return mtp, {"steps": step, "train_seconds": round(time.time() - t0, 1), "params": n_all, "trained_params": n_train,
                 "before": before, "after": {"prose": ev["prose"], "chat": ev["chat"]}, "curve": curve}


def mtp_wrapper(mtp):
    """LoadBalancer wants model.parameters(); give it the MTP layer's."""
    w = types.SimpleNamespace()
    w.parameters = mtp.parameters
    return w


# ---------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder made by prepare_austen.py (train/, val/)")
    ap.add_argument("--chat", required=True, help="folder made by make_chat_corpus.py (train.npz, heldout.npz)")
    ap.add_argument("--fixtures", default=os.path.join(ROOT, "tests", "data", "chat", "fixtures.json"))
    ap.add_argument("--base", default=os.path.join(ROOT, "models", "tiny-glm"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="a few CPU steps of each stage on short windows")
    ap.add_argument("--minutes", type=float, default=2.0, help="stage A wall-clock budget")
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chat-frac", type=float, default=0.6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--final-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--gamma", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--chat-eval", type=int, default=1000, help="held-out conversations per evaluation (0: all)")
    ap.add_argument("--max-ppl-rise", type=float, default=0.03, help="kept weights: prose perplexity within this of the start")
    ap.add_argument("--skip-finetune", action="store_true", help="stage B only, on --base as it is")
    ap.add_argument("--mtp-minutes", type=float, default=2.0)
    ap.add_argument("--mtp-max-steps", type=int, default=0)
    ap.add_argument("--mtp-lr", type=float, default=1e-3)
    ap.add_argument("--mtp-warmup", type=int, default=50)
    ap.add_argument("--mtp-distill", type=float, default=0.5, help="weight of the KL to the main model (rest: CE)")
    ap.add_argument("--mtp-init", choices=["last", "random"], default="last")
    ap.add_argument("--mtp-train-head", action="store_true", help="train shared_head.head (default: frozen = lm_head)")
    ap.add_argument("--gen-tokens", type=int, default=96, help="greedy tokens per fixture reply")
    ap.add_argument("--seed", type=int, default=4714)
    ap.add_argument("--tar", help="also pack the output folder into this .tar")
    args = ap.parse_args()
    if args.smoke:
        args.seq, args.batch, args.warmup, args.mtp_warmup, args.eval_every = 128, 4, 2, 2, 3
        args.max_steps = args.max_steps or 4
        args.mtp_max_steps = args.mtp_max_steps or 4
        args.chat_eval = 8
        args.gen_tokens = 12
    t_start = time.time()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, Glm4MoeLiteForCausalLM
    lines = []

    def log(s):
        s = f"[{time.time() - t_start:7.1f}s] {s}"
        print(s, flush=True)
        lines.append(s)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))

    T.copy_tokenizer(args.base, args.out)
    tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    eot, user, obs = (tok.token_to_id(s) for s in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    train_ids = T.encode_docs(tok, T.read_dir(os.path.join(args.data, "train")), eot)
    val_ids = T.encode_docs(tok, T.read_dir(os.path.join(args.data, "val")), eot)
    chat_train = load_chat(os.path.join(args.chat, "train.npz"))
    chat_held = load_chat(os.path.join(args.chat, "heldout.npz"))
    rows, rmask, skipped = pack_rows(*chat_train, args.seq + 1, eot, args.seed)
    if args.smoke:
        val_ids = val_ids[:4 * args.seq]
    fixtures = json.load(open(args.fixtures, encoding="utf-8"))
    if args.smoke:
        fixtures = {"tool_calls": fixtures["tool_calls"][:2], "thinking": fixtures["thinking"][:2]}
    log(f"prose: train {len(train_ids):,} tokens, held out {len(val_ids):,}; chat: {len(chat_train[2]) - 1:,} "
        f"conversations ({len(chat_train[0]):,} tokens, {int(chat_train[1].sum()):,} trained) in {len(rows):,} rows of "
        f"{args.seq + 1} ({skipped} longer than a row skipped); held-out chat {len(chat_held[2]) - 1:,} conversations")

    model = Glm4MoeLiteForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16).to(device)
    for l in model.model.layers:
        if hasattr(l.mlp, "gate"):
            l.mlp.gate.e_score_correction_bias.data = l.mlp.gate.e_score_correction_bias.float()
    batches = Batches(train_ids, rows, rmask, args.seq, args.batch, args.chat_frac, device, args.seed)
    summary = {"args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}

    # Stage A ------------------------------------------------------------------------------------------------
    def evals(m):
        vl, n = T.evaluate(m, val_ids, args.seq, device)
        cl, cn = chat_eval(m, chat_held, eot, device, args.chat_eval)
        return vl, cl, n, cn
    vl0, cl0, n_val, n_chat = evals(model)
    log(f"base model: held-out prose loss {vl0:.4f} (ppl {math.exp(vl0):.3f}, {n_val:,} tokens), held-out chat "
        f"loss {cl0:.4f} ({n_chat:,} assistant tokens)")
    summary["before"] = {"prose_loss": round(vl0, 4), "prose_ppl": round(math.exp(vl0), 3), "chat_loss": round(cl0, 4)}
    if not args.skip_finetune:
        opt = MasterOpt(model.parameters(), args.lr, args.wd, device)
        T.add_dropout(model, args.dropout)
        balancer = T.LoadBalancer(model)
        model.train()

        def step_loss(x, w):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            return mixed_loss(ce.view(x.shape[0], -1), w[:, 1:].float(), batches.n_prose, args.chat_frac)
        try:  # the experts' grouped_mm wants bf16 on a GPU; fall back to the per-expert loop where it fails
            x, w = batches()
            step_loss(x[:1], w[:1])[0].backward()
        except Exception as e:  # noqa: BLE001
            log(f"grouped_mm experts failed ({type(e).__name__}: {e}); using the eager expert loop")
            model.set_experts_implementation("eager")
        model.zero_grad(set_to_none=True)
        balancer.counts.zero_()
        sched = types.SimpleNamespace(lr=args.lr, warmup=args.warmup, final_lr_frac=args.final_lr_frac)
        budget, t0, step, curve, acc, tokens = args.minutes * 60, time.time(), 0, [], [], 0
        best = last = None  # (chat loss, step, snapshot, prose loss)
        log(f"stage A for {args.minutes} min: batch {batches.n_prose} prose + {batches.n_chat} chat rows x {args.seq}, "
            f"lr {args.lr}, dropout {args.dropout}")
        while True:
            frac = (time.time() - t0) / budget
            done = frac >= 1.0 or (args.max_steps and step >= args.max_steps)
            if done or (step and step % args.eval_every == 0):
                vl, cl, _, _ = evals(model)
                tp = sum(a[0] for a in acc) / max(len(acc), 1)
                tc = sum(a[1] for a in acc) / max(len(acc), 1)
                acc = []
                curve.append({"step": step, "time_s": round(time.time() - t0, 1), "train_prose": round(tp, 4),
                              "train_chat": round(tc, 4), "heldout_prose": round(vl, 4),
                              "heldout_ppl": round(math.exp(vl), 3), "heldout_chat": round(cl, 4)})
                log(f"eval step {step:5d} {time.time() - t0:6.1f}s train prose {tp:.4f} chat {tc:.4f} | held-out "
                    f"prose {vl:.4f} (ppl {math.exp(vl):.2f}) chat {cl:.4f} {balancer.report()}")
                if math.exp(vl) <= math.exp(vl0) * (1 + args.max_ppl_rise) and (best is None or cl < best[0]):
                    best = (cl, step, opt.snapshot(), vl)
                last = (cl, step, None, vl)
            if done:
                break
            x, w = batches()
            loss, parts = step_loss(x, w)
            loss.backward()
            lr = T.lr_at(step, frac, sched)
            opt.step(lr)
            balancer.step(args.gamma * lr / args.lr)
            if step % 10 == 0 or args.smoke:
                acc.append([float(p.detach()) for p in parts] + [0.0] * (2 - len(parts)))
            tokens += x[:, :-1].numel()
            step += 1
            if step % 100 == 0:
                log(f"step {step:5d} {time.time() - t0:6.1f}s lr {lr:.2e} loss {float(loss):.4f} "
                    f"{tokens / (time.time() - t0) / 1e3:.0f}k tok/s")
        train_s = time.time() - t0
        kept = best or last  # the final weights when no evaluation kept the prose perplexity within the bound
        if best:
            opt.restore(best[2])
        log(f"stage A: {step} steps, {tokens:,} tokens in {train_s:.1f} s; kept step {kept[1]} (held-out chat "
            f"{kept[0]:.4f}, prose ppl {math.exp(kept[3]):.3f}{'' if best else '; none within the ppl bound'})")
        summary["finetune"] = {"steps": step, "train_seconds": round(train_s, 1), "tokens": tokens,
                               "kept_step": kept[1], "curve": curve}
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=[eot, user, obs], pad_token_id=eot, do_sample=True,
                                               temperature=0.8, top_p=0.95)
    model.save_pretrained(args.out)

    # Reload what was saved (bf16 weights, f32 compute): the numbers anyone can reproduce.
    ref = Glm4MoeLiteForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device)
    vl1, cl1, _, _ = evals(ref)
    log(f"saved chat model: held-out prose ppl {math.exp(vl0):.3f} -> {math.exp(vl1):.3f} "
        f"({100 * (math.exp(vl1) / math.exp(vl0) - 1):+.2f} %), held-out chat loss {cl0:.4f} -> {cl1:.4f}")
    summary["after"] = {"prose_loss": round(vl1, 4), "prose_ppl": round(math.exp(vl1), 3), "chat_loss": round(cl1, 4)}
    snippet = os.path.join(args.data, "heldout_snippet.txt")  # the CI snippet (tests/py/test_perplexity.py)
    if os.path.exists(snippet):
        sl, sn = T.evaluate(ref, tok.encode(open(snippet, encoding="utf-8").read()).ids, args.seq, device)
        summary["after"].update({"heldout_ctx": args.seq, "snippet_ppl": round(math.exp(sl), 4), "snippet_tokens": sn})
        log(f"saved chat model: snippet perplexity {math.exp(sl):.4f} over {sn} tokens")
    gen = generation_checks(ref, tok, fixtures, device, args.gen_tokens, [eot, user, obs])
    n_ok = sum(r["ok"] for r in gen["tool_calls"])
    n_name = sum(r["name_ok"] for r in gen["tool_calls"])
    t_ok = sum(r["ok"] for r in gen["thinking"])
    log(f"greedy on held-out fixtures: {n_ok}/{len(gen['tool_calls'])} exact tool calls ({n_name} right names), "
        f"{t_ok}/{len(gen['thinking'])} thinking on/off splits right")
    for r in gen["tool_calls"] + gen["thinking"]:
        log(f"  {'ok ' if r['ok'] else 'BAD'} {r['label']}: {json.dumps(r['reply'][:200])}")
    prompt = tok.encode("Once upon a time").ids
    y = ref.generate(torch.tensor([prompt], device=device), max_new_tokens=40, do_sample=False)
    log("prose sample: " + json.dumps(tok.decode(y[0].tolist())))
    summary["generation"] = gen
    del ref

    # Stage B ------------------------------------------------------------------------------------------------
    model = Glm4MoeLiteForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16).to(device)
    if device != "cuda":
        model.set_experts_implementation("eager")
    mtp_limit = 4 if args.smoke else None
    mtp, mtp_summary = train_mtp(
        model, args, batches, lambda: prose_windows(val_ids, args.seq, mtp_limit),
        lambda: conv_batches(*chat_held, args.chat_eval, eot), device, log)
    extra = add_mtp_to_dir(args.out, mtp, model.config)
    log(f"added {len(extra)} MTP tensors (model.layers.{model.config.num_hidden_layers}.*) to {args.out}/model.safetensors")

    # Both ways back: transformers ignores the MTP tensors; load_mtp rebuilds the layer from them.
    ref = Glm4MoeLiteForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device)
    vl2, _ = T.evaluate(ref, val_ids, args.seq, device)
    assert abs(vl2 - vl1) < 1e-4, (vl2, vl1)  # the extra tensors change nothing transformers computes
    mtp2 = load_mtp(ref.config, args.out).to(device)
    trained = {k: v.float().cpu() for k, v in mtp.state_dict().items()}
    for k, v in mtp2.state_dict().items():  # bf16 on disk: the reload must give back exactly what was trained
        assert torch.equal(v.float().cpu(), trained[k]), k
    if device != "cuda":
        ref.set_experts_implementation("eager")
    mtp2.mtp_config._experts_implementation = ref.config._experts_implementation
    final = {"prose": mtp_eval(ref, mtp2, prose_windows(val_ids, args.seq, mtp_limit), device),
             "chat": mtp_eval(ref, mtp2, conv_batches(*chat_held, args.chat_eval, eot), device)}
    log(f"saved MTP layer (reloaded, f32 compute): top-1 agreement with the main model's greedy next-next token: "
        f"held-out prose {final['prose']['agreement']:.4f} ({final['prose']['positions']:,} positions), held-out chat "
        f"{final['chat']['agreement']:.4f} ({final['chat']['positions']:,} assistant positions); accuracy on the true "
        f"token: prose {final['prose']['accuracy']:.4f}, chat {final['chat']['accuracy']:.4f}")
    mtp_summary["saved"] = final
    summary["mtp"] = mtp_summary
    summary["total_seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "finetune.log"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if args.tar:
        with tarfile.open(args.tar, "w") as t:
            t.add(args.out, arcname=os.path.basename(os.path.normpath(args.out)))
    log(f"done: {args.out}")


if __name__ == "__main__":
    main()

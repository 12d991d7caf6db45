#!/usr/bin/env python3
"""Serving benchmark for `trellm serve` (or any OpenAI-compatible server): N concurrent streaming clients, each
sending requests of fixed input / output lengths (random token ids, ignore_eos) to /v1/completions, and the figures
people compare servers by: output tok/s, total tok/s, time to first token and inter-token latency (p50 / p99).

    python3 scripts/bench_serve.py --url http://127.0.0.1:8080 --concurrency 32 --input-len 8192 --output-len 1024 \
        --requests 32 --json bench/results/serve.jsonl --label "trellm serve --synthetic glm-4.7-flash"

Each JSON line carries the date, the label (GPU, commit, server command: pass them), the shape and the value.
Needs httpx (PyPI); nothing else. Token counts come from the server's usage; ITL per request is
(last chunk - first chunk) / (tokens - 1), and the chunk gaps give its p99.
"""
import argparse
import asyncio
import datetime
import json
import random
import statistics
import time

import httpx


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


async def one(client, url, model, prompt, out_len):
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    gaps, tokens, finish = [], 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            j = json.loads(data)
            now = time.perf_counter()
            if j.get("usage"):
                tokens = j["usage"]["completion_tokens"]
            for c in j.get("choices", []):
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
                    continue
                if first is None:
                    first = now
                elif last is not None:
                    gaps.append(now - last)
                last = now
    if finish is None:
        raise RuntimeError("stream ended without a finish_reason")
    return {"ttft": (first or time.perf_counter()) - t0, "e2e": time.perf_counter() - t0, "tokens": tokens,
            "itl": (last - first) / max(1, tokens - 1) if first and last else float("nan"), "gaps": gaps}


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None, help="model name (default: the server's first /v1/models entry)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=0, help="requests in all (default: one per client)")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4000, help="prompt token ids are drawn from [100, vocab)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="append JSON lines here")
    ap.add_argument("--label", default="", help="what ran: GPU, commit, server command")
    a = ap.parse_args()
    n = a.requests or a.concurrency
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(100, a.vocab) for _ in range(a.input_len)] for _ in range(n)]
    limits = httpx.Limits(max_connections=a.concurrency + 4, max_keepalive_connections=a.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        model = a.model or (await client.get(a.url + "/v1/models")).json()["data"][0]["id"]
        queue = list(range(n))
        results, errors = [], []

        async def worker():
            while queue:
                i = queue.pop()
                try:
                    results.append(await one(client, a.url, model, prompts[i], a.output_len))
                except Exception as e:  # counted and reported, the run goes on
                    errors.append(repr(e))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(a.concurrency)])
        wall = time.perf_counter() - t0
    out_tok = sum(r["tokens"] for r in results)
    figs = {
        "output_tok_s": out_tok / wall,
        "total_tok_s": (out_tok + a.input_len * len(results)) / wall,
        "ttft_p50_s": pct([r["ttft"] for r in results], 50), "ttft_p99_s": pct([r["ttft"] for r in results], 99),
        "itl_p50_s": pct([r["itl"] for r in results], 50),
        "itl_p99_s": pct([g for r in results for g in r["gaps"]], 99),
        "e2e_p50_s": pct([r["e2e"] for r in results], 50),
        "wall_s": wall, "errors": len(errors),
    }
    shape = f"concurrency={a.concurrency} requests={n} in={a.input_len} out={a.output_len}"
    print(f"bench_serve: {shape}: {len(results)} ok, {len(errors)} errors, {wall:.1f} s")
    for k, v in figs.items():
        print(f"  {k:14s} {v:12.4f}")
    for e in errors[:5]:
        print("  error:", e)
    if a.json:
        date = datetime.date.today().isoformat()
        with open(a.json, "a") as f:
            for k, v in figs.items():
                unit = "tok/s" if k.endswith("tok_s") else "s" if k.endswith("_s") else "count"
                f.write(json.dumps({"date": date, "label": a.label, "bench": "serve", "metric": k, "shape": shape,
                                    "value": v, "unit": unit}) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

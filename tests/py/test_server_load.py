"""`trellm serve` under load and faults (issue 17 part 4): short runs of scripts/soak.py on the built-in model on
the CPU. The soak counts every reply by class (its docstring says what each class means); these tests fail on any
lost, truncated or wrongly answered request, a bad request not answered with its 4xx, a KV block or request left
in use after the load, or (behind nginx, one replica SIGKILLed mid-run) an error that is not clean or a survivor
that stops serving. The long runs are recorded in bench/results/soak.md. No timing is asserted.

The first test checks the checker: a fake server that truncates replies in each way the soak must notice."""
import asyncio
import json
import os
import shutil
import sys

import aiohttp
import pytest

from conftest import BIN

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import soak  # noqa: E402

MODEL = os.path.join(ROOT, "models", "tiny-glm")


def run_soak(*extra):
    a = soak.parse_args(["--trellm", BIN, "--model", MODEL, "--device", "cpu", "--ctx", "1024", "--progress", "0",
                         *map(str, extra)])
    r = soak.run(a)
    print("\n" + soak.markdown(r))
    return r


def check_bad_requests(r):
    bad = {k: v for k, v in r["by_kind"].items() if k.startswith("bad_")}
    # the soak sends every case once at the start, then at random
    for kind in ("bad_malformed_json", "bad_not_an_object", "bad_wrong_type", "bad_unknown_field", "bad_unknown_model",
                 "bad_prompt_too_long", "bad_over_context"):
        assert kind in bad, f"no {kind} request was sent: {sorted(bad)}"
    for kind, classes in bad.items():
        assert set(classes) == {"rejected"}, f"{kind}: {classes} (each must get its 4xx with a JSON error)"


def check_idle(end):
    assert end["kv_blocks_used"] == 0, f"{end['kv_blocks_used']} KV blocks still in use after the load (a leak)"
    assert end["running"] == 0 and end["waiting"] == 0, end
    assert end.get("in_flight", 0) == 0, f"{end['in_flight']} HTTP requests still being answered"


# ---- the checker ----------------------------------------------------------------------------------------------

SSE_EVENT = b'data: {"choices": [{"index": 0, "text": "Emma", "finish_reason": null}]}\n\n'
SSE_FINISH = b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'


def chunk(b):
    return b"%x\r\n%s\r\n" % (len(b), b)


async def fake_reply(path, writer):
    """What the fake sends for `path`: each a way a reply can go wrong (or right)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    if path == "/complete":        # a whole stream
        writer.write(head + chunk(SSE_EVENT) + chunk(SSE_FINISH) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    elif path == "/silent":        # ends cleanly at the HTTP level, without [DONE]: silent truncation
        writer.write(head + chunk(SSE_EVENT) + b"0\r\n\r\n")
    elif path == "/no_finish":     # [DONE] without the choice's finish_reason
        writer.write(head + chunk(SSE_EVENT) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    elif path == "/cut":           # the connection closes mid-stream: no chunked terminator
        writer.write(head + chunk(SSE_EVENT))
    elif path == "/short_body":    # fewer bytes than Content-Length
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"choices\": [")
    elif path == "/bad_json":      # a complete body that is not the whole JSON
        body = b'{"choices": [{"index": 0, "text": "Emma"'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    elif path == "/error500":
        body = b'{"error": {"message": "boom", "type": "server_error"}}'
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
    elif path == "/ok400":         # a bad request answered 200
        body = b'{"choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "usage": {"completion_tokens": 0}}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    elif path == "/after_done":    # an event after [DONE]
        writer.write(head + chunk(SSE_EVENT) + chunk(SSE_FINISH) + chunk(b"data: [DONE]\n\n") + chunk(SSE_EVENT) + b"0\r\n\r\n")
    elif path == "/stop_leak":     # a stop string in the text
        writer.write(head + chunk(SSE_EVENT) + chunk(SSE_FINISH) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()


async def fake_server_checks():
    async def handle(reader, writer):
        try:
            line = await reader.readline()
            path = line.split()[1].decode()
            n = 0
            while (h := await reader.readline()) not in (b"\r\n", b""):
                if h.lower().startswith(b"content-length:"):
                    n = int(h.split(b":")[1])
            await reader.readexactly(n)
            await fake_reply(path, writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    load = soak.Load(base, "m", 1024, 1, 10, "x", 1)
    body = {"prompt": "Emma", "max_tokens": 4, "stream": True}
    out = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for path in ("/complete", "/silent", "/no_finish", "/cut", "/after_done"):
            out[path] = (await load.stream(session, "x", path, body))["cls"]
        out["/stop_leak"] = (await load.stream(session, "x", "/stop_leak", {**body, "stop": ["mm"]}))["cls"]
        plain = {"prompt": "Emma", "max_tokens": 4}
        for path in ("/short_body", "/bad_json", "/error500"):
            out[path] = (await load.plain(session, "x", path, plain))["cls"]
        async with session.post(base + "/ok400", data=b"{") as resp:
            out["/ok400"] = load.error_status("bad", 0.0, resp.status, (await resp.read()).decode(), want=400)["cls"]
    srv.close()
    await srv.wait_closed()
    return out


def test_checker_catches_each_failure():
    got = asyncio.run(fake_server_checks())
    assert got == {"/complete": "ok", "/silent": "truncated", "/no_finish": "truncated", "/cut": "stream_cut",
                   "/after_done": "bad_reply", "/stop_leak": "bad_reply", "/short_body": "stream_cut",
                   "/bad_json": "truncated", "/error500": "server_error", "/ok400": "wrong_status"}, got


# ---- the server -----------------------------------------------------------------------------------------------

def test_soak_short():
    """~25 s at 48 clients, 2 reading 1 byte/s and 2 never reading, with a KV pool small enough to preempt: every
    reply complete or rightly refused, nothing left in use afterwards, the slow clients served too."""
    r = run_soak("--duration", 25, "--clients", 48, "--slow-clients", 2, "--never-read-clients", 2,
                 "--max-seqs", 32, "--kv-memory", "0.012")  # 40 blocks of 64 tokens: the context fits, 32 sequences don't
    assert r["failures"] == 0, json.dumps(r["failure_examples"], indent=1)
    assert r["by_class"].get("ok", 0) >= 50, r["by_class"]
    assert r["by_class"].get("cancelled", 0) > 0, r["by_class"]
    assert r["by_kind"].get("long", {}).get("ok", 0) > 0, r["by_kind"]
    check_bad_requests(r)
    check_idle(r["end"]["replica0"])
    assert r["end"]["replica0"]["preemptions"] > 0, "the KV pool was meant to run out (preemption under load)"
    # streams the client closed mid-way are counted as aborted (they were counted nowhere before)
    assert r["end"]["replica0"]["finished"].get("abort", 0) > 0, r["end"]["replica0"]["finished"]
    raw = r["raw_clients"]
    assert [x["kind"] for x in raw].count("slow") == 2 and all(x["status_200"] for x in raw if x["kind"] == "slow"), raw
    assert all(x["requests"] >= 1 for x in raw), raw
    assert r["ok"], r["checks"]


@pytest.mark.skipif(not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")),
                    reason="nginx is not installed (setup.sh installs Debian's nginx package)")
def test_replica_killed_behind_nginx():
    """Two replicas behind nginx, replica0 SIGKILLed mid-run: the other keeps serving, every request either
    completes or ends in a clean error the client can see (only those in flight at the kill), and the survivor
    ends with nothing in use."""
    r = run_soak("--replicas", 2, "--duration", 16, "--kill-after", 6, "--clients", 24, "--slow-clients", 1,
                 "--never-read-clients", 1, "--max-seqs", 32)
    assert r["kill"] and r["kill"]["replica"] == "replica0", r["kill"]
    assert r["failures"] == 0, json.dumps(r["failure_examples"], indent=1)
    assert r["checks"]["survivor_served_after_kill"], r["kill"]
    assert r["kill"]["started_after_by_class"].get("ok", 0) > 0, r["kill"]
    assert r["nginx_alive"]
    assert r["end"]["replica0"].get("killed"), r["end"]
    check_idle(r["end"]["replica1"])
    check_bad_requests(r)
    assert r["ok"], r["checks"]

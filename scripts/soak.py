#!/usr/bin/env python3
"""Soak and fault load for `trellm serve` (issue 17 part 4): N concurrent clients on loopback send a random mix of
requests for a fixed time and every reply is counted by class; slow clients (reading 1 byte/s of a stream) and
clients that never read run alongside; afterwards /metrics must show no KV block in use and nothing in flight.

    scripts/soak.py --trellm build/trellm --model models/tiny-glm --duration 600 --clients 64   # its own server
    scripts/soak.py --url http://127.0.0.1:8080 [--pid PID] --duration 60                     # a running one
    scripts/soak.py --trellm build/trellm --replicas 2 --duration 120   # two servers behind nginx, one SIGKILLed

Prints one JSON line (all figures) and a markdown summary; --jsonl / --md append them to files. Exit code 0 when
nothing was lost (see below), 1 otherwise. scripts/ and tests/py/test_server_load.py import run() from here.

The request mix (per request, at random; --seed makes it repeatable): chat and completions, streaming and not,
stop strings, random max_tokens, n = 2, include_usage, client cancellations (a stream closed after a few events, a
non-streaming request abandoned after a random delay), long prompts (up to ~70 % of the context, with and without
a shared prefix, so the prefix cache is hit and missed), and bad requests, each of which must be answered with its
own 4xx and an OpenAI error body {"error": {"message", "type"}}: malformed JSON, wrong field types, an unknown
model (404), a prompt longer than the context, prompt + max_tokens over the context (every case once at the start,
then at random).

What counts (classes in the JSON's by_class):
  ok              a 200 whose body is complete: non-streaming, a JSON body whose every choice has a finish_reason
                  (stop / length / tool_calls); streaming, every choice's finish_reason, then `data: [DONE]` as the
                  last event, then the HTTP end of body (the chunked terminator). Stop strings never appear in the
                  text; with include_usage the usage chunk came.
  cancelled       the client closed the connection on purpose (counted apart; the server must free what it held).
  rejected        a bad request answered with the expected 4xx and a JSON error body.
  -- failures, always --
  truncated       a body that ended cleanly at the HTTP level but is incomplete: a stream without [DONE] or without a
                  choice's finish_reason, a non-streaming body that is not complete JSON. The client cannot tell
                  it from a complete answer: silent truncation, the worst class.
  bad_reply       a 200 that breaks the protocol (unparsable chunk, an event after [DONE], two finish_reasons,
                  a stop string in the text, finish_reason abort/error, a missing usage chunk).
  wrong_status    a bad request not given its expected 4xx (or given one without a JSON error body), or a valid
                  request given a 4xx.
  server_error    a 5xx with a JSON body (from trellm itself).
  timeout         no complete reply within --request-timeout.
  client_error    anything else the client raised (a bug here, or a reply it could not read).
  -- failures without an injected fault; with --replicas 2, "clean errors" for requests in flight at the kill --
  stream_cut      the connection ended mid-body and the HTTP framing shows it (no chunked terminator, fewer bytes
                  than Content-Length, a reset): the client knows the reply is incomplete.
  conn_error      refused or reset before any response byte.
  upstream_error  a complete 502/503/504 that is not trellm's JSON (nginx's page when no upstream answered).
A request that started after the kill and ended in any error class is a failure: the survivor must serve it.
"""
import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
LISTENING = re.compile(r"trellm serve: listening on http://[^\s:/]+:(\d+)")
VALID_FINISH = ("stop", "length", "tool_calls")
ALWAYS_FAIL = ("truncated", "bad_reply", "wrong_status", "server_error", "timeout", "client_error")
FAULT_CLEAN = ("stream_cut", "conn_error", "upstream_error")

PROSE = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite some of "
    "the best blessings of existence.",
    "The family of Dashwood had long been settled in Sussex. Their estate was large, and their residence was at "
    "Norland Park.",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up any "
    "book but the Baronetage.",
    "No one who had ever seen Catherine Morland in her infancy would have supposed her born to be an heroine.",
    "About thirty years ago Miss Maria Ward, of Huntingdon, with only seven thousand pounds, had the good luck to "
    "captivate Sir Thomas Bertram.",
]
STOPS = [" the", "e", ",", ".", " of", "and", "\n", "ing", " her", "s "]


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def lat_summary(v):
    return {"n": len(v), "p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99), "max": max(v) if v else None}


def rss_mb(pid):
    """VmRSS of a process in MiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- processes ----------------------------------------------------------------------------------------------------

class Replica:
    """One `trellm serve --port 0` on loopback; its port is read from its 'listening on' line. Output goes to a
    log file (a thread drains the pipe; the last lines are kept for error messages)."""

    def __init__(self, binary, args, log_path, startup_timeout=180):
        self.cmd = [binary, "serve", "--host", "127.0.0.1", "--port", "0", *map(str, args)]
        self.log_path = log_path
        self.tail = collections.deque(maxlen=200)
        self.port = None
        self._ready = threading.Event()
        self._log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     encoding="utf-8", errors="replace", bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + startup_timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{' '.join(self.cmd)} did not start:\n" + "\n".join(self.tail))
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stdout:
            self._log.write(line)
            self.tail.append(line.rstrip("\n"))
            m = LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ready.set()
        self._log.flush()

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, timeout=60):
        """SIGTERM and wait: the exit code (None if it had to be killed)."""
        if self.proc.poll() is not None:
            rc = self.proc.returncode
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                rc = None
        self._reader.join(5)
        self._log.close()
        return rc


NGINX_CONF = """# written by scripts/soak.py: two trellm replicas behind one nginx, all on loopback
worker_processes 1;
master_process off;   # one foreground process, no privilege switch: runs the same as root or not
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 4096; }}
http {{
  log_format soak '$msec "$request" $status $body_bytes_sent up=$upstream_addr ustatus=$upstream_status '
                  't=$request_time';
  access_log {d}/access.log soak;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  client_max_body_size 64m;
  client_body_buffer_size 1m;   # request bodies in memory: a retry on the other replica resends it
  upstream trellm {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=1024;
    location / {{
      proxy_pass http://trellm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;          # SSE: each event goes on as it comes
      proxy_cache off;
      proxy_connect_timeout 2s;
      proxy_read_timeout 300s;
      proxy_send_timeout 300s;
      # A refused or reset upstream connection is retried on the other replica, also for POST: a generation has
      # no side effects, and a request that got no response header yet is safe to run again. A stream whose
      # header was sent cannot be retried; nginx then closes the client's connection without the chunked
      # terminator, which the client sees.
      proxy_next_upstream error timeout non_idempotent;
      proxy_next_upstream_tries 2;
    }}
  }}
}}
"""


class Nginx:
    """nginx (Debian's package) in the foreground with its own prefix, config, pid and logs in `d`."""

    def __init__(self, d, upstream_ports, startup_timeout=20):
        self.bin = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if not self.bin:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
        self.d = d
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in upstream_ports)
        last = None
        for _ in range(3):  # the probed port may be taken before nginx binds it
            self.port = free_port()
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(d=d, servers=servers, port=self.port))
            self.proc = subprocess.Popen([self.bin, "-p", d, "-c", conf, "-e", os.path.join(d, "error.log")],
                                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "stderr.log"), "w"))
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    self.base = f"http://127.0.0.1:{self.port}"
                    return
                except OSError:
                    time.sleep(0.05)
            self.stop()
            last = self.errors()
        raise RuntimeError(f"nginx did not start:\n{last}")

    def errors(self):
        out = []
        for name in ("stderr.log", "error.log"):
            p = os.path.join(self.d, name)
            if os.path.exists(p):
                out.append(open(p, errors="replace").read()[-4000:])
        return "\n".join(out)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


# ---- metrics ------------------------------------------------------------------------------------------------------

def parse_metrics(text):
    """{sample name: value} summed over labels other than model_name; prometheus_client's own parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if set(s.labels) - {"model_name"}:
                key = s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name") + "}"
            else:
                key = s.name
            out[key] = s.value
    return out


def idle_figures(m):
    """What must be 0 once the load has stopped: KV blocks in use, requests running / waiting / being answered."""
    if "trellm:kv_cache_blocks_used" in m:
        used = m["trellm:kv_cache_blocks_used"]
    else:
        used = round(m.get("trellm:kv_cache_usage_perc", 0.0) * m.get("trellm:kv_cache_blocks", 0.0))
    f = {"kv_blocks_used": int(used), "running": int(m.get("trellm:num_requests_running", -1)),
         "waiting": int(m.get("trellm:num_requests_waiting", -1))}
    if "trellm:num_requests_in_flight" in m:
        f["in_flight"] = int(m["trellm:num_requests_in_flight"])
    return f


async def scrape(session, base):
    async with session.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=30)) as r:
        return parse_metrics(await r.text())


async def wait_idle(session, base, timeout):
    """Polls /metrics until everything in idle_figures() is 0 (or `timeout`); returns (figures, metrics)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(session, base)
        f = idle_figures(m)
        if all(v == 0 for v in f.values()) or time.monotonic() > deadline:
            return f, m
        await asyncio.sleep(0.25)


# ---- the load -----------------------------------------------------------------------------------------------------

class Load:
    def __init__(self, base, model, ctx, rng_seed, request_timeout, long_text, long_tokens):
        self.base = base
        self.model = model
        self.ctx = ctx
        self.seed = rng_seed
        self.request_timeout = request_timeout
        self.long_text = long_text      # ~long_tokens tokens of prose
        self.long_tokens = long_tokens
        self.records = []               # one dict per request
        self._bad = None
        self.t0 = time.monotonic()

    def now(self):
        return time.monotonic() - self.t0

    # -- request bodies --

    def prompt(self, rng):
        return " ".join(rng.sample(PROSE, rng.randint(1, 3)))

    def body(self, rng, chat, stream):
        b = {}
        if rng.random() < 0.85:
            b["model"] = self.model
        text = self.prompt(rng)
        if chat:
            b["messages"] = [{"role": "user", "content": text}]
            if rng.random() < 0.3:
                b["messages"] = [{"role": "system", "content": "You write like Jane Austen."}] + b["messages"]
            b["chat_template_kwargs"] = {"enable_thinking": rng.random() < 0.2}
        else:
            b["prompt"] = text
        b["max_tokens"] = rng.choice([1, 2, 4, 8, 16, 24, 32, 48, 64, 96])
        if rng.random() < 0.5:
            b["temperature"] = 0
        else:
            b["temperature"] = rng.choice([0.7, 1.0])
            b["seed"] = rng.randrange(1 << 30)
        if rng.random() < 0.4:
            b["ignore_eos"] = True
        if rng.random() < 0.3:
            b["stop"] = rng.sample(STOPS, rng.randint(1, 3))
        if not chat and rng.random() < 0.1:
            b["n"] = 2
        if stream:
            b["stream"] = True
            if rng.random() < 0.3:
                b["stream_options"] = {"include_usage": True}
        return b

    def long_body(self, rng, chat, stream):
        b = self.body(rng, chat, stream)
        n = rng.uniform(0.3, 1.0)
        text = self.long_text[: max(1, int(len(self.long_text) * n))]
        if rng.random() < 0.5:  # a fresh start: no prefix-cache hit
            text = f"Chapter {rng.randrange(10**6)}. " + text
        if chat:
            b["messages"] = [{"role": "user", "content": text}]
        else:
            b["prompt"] = text
        b["max_tokens"] = rng.choice([1, 4, 16, 32])
        b.pop("n", None)
        return b

    def bad_cases(self):
        """Every bad request: (name, path, raw body bytes, expected status)."""
        if self._bad is not None:
            return self._bad
        chat = ("/v1/chat/completions", [{"role": "user", "content": "Hello"}])
        comp = "/v1/completions"
        too_long = self.long_text * (int(1.3 * self.ctx / max(1, self.long_tokens)) + 1)
        cases = [
            ("malformed_json", chat[0], b'{"model": "x", "messages": [{"role": "user", "content": "hi"', 400),
            ("malformed_json", comp, b'{"prompt": "Emma", "max_tokens": 4,,}', 400),
            ("not_an_object", comp, b'[1, 2, 3]', 400),
            ("wrong_type", chat[0], {"messages": "hello"}, 400),
            ("wrong_type", chat[0], {"messages": chat[1], "max_tokens": "ten"}, 400),
            ("wrong_type", chat[0], {"messages": chat[1], "stream": "yes"}, 400),
            ("wrong_type", comp, {"prompt": "Emma", "temperature": "hot"}, 400),
            ("wrong_type", comp, {"prompt": {"text": "Emma"}}, 400),
            ("wrong_type", comp, {"prompt": "Emma", "stop": 7}, 400),
            ("wrong_type", comp, {"prompt": "Emma", "n": 0}, 400),
            ("wrong_type", comp, {"prompt": "Emma", "max_tokens": -5}, 400),
            ("unknown_field", comp, {"prompt": "Emma", "frobnicate": 1}, 400),
            ("unknown_model", chat[0], {"model": "no-such-model", "messages": chat[1]}, 404),
            ("unknown_model", comp, {"model": "gpt-17", "prompt": "Emma", "stream": True}, 404),
            ("prompt_too_long", comp, {"prompt": too_long, "max_tokens": 4}, 400),
            ("prompt_too_long", chat[0], {"messages": [{"role": "user", "content": too_long}], "stream": True}, 400),
            ("over_context", comp, {"prompt": "Emma", "max_tokens": self.ctx + 10}, 400),
        ]
        self._bad = [(name, path, json.dumps(body).encode() if isinstance(body, dict) else body, want)
                     for name, path, body, want in cases]
        return self._bad

    # -- one request --

    async def one(self, session, rng):
        r = rng.random()
        if r < 0.10:
            return await self.bad(session, rng.choice(self.bad_cases()))
        if r < 0.17:
            return await self.cancel_stream(session, rng)
        if r < 0.20:
            return await self.cancel_plain(session, rng)
        chat = rng.random() < 0.5
        stream = rng.random() < 0.55
        if r < 0.26:
            kind, body = "long", self.long_body(rng, chat, stream)
        else:
            kind, body = ("chat" if chat else "completion") + ("_stream" if stream else ""), self.body(rng, chat, stream)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if stream:
            return await self.stream(session, kind, path, body)
        return await self.plain(session, kind, path, body)

    def rec(self, kind, t_start, cls, status=None, ttft=None, detail=None, **extra):
        d = {"kind": kind, "cls": cls, "status": status, "t0": t_start, "t1": self.now(), "ttft": ttft}
        if detail:
            d["detail"] = str(detail)[:300]
        d.update(extra)
        self.records.append(d)
        return d

    def error_status(self, kind, t0, status, raw, want=None):
        """A non-200 reply: its class."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        is_json_error = (isinstance(body, dict) and isinstance(body.get("error"), dict)
                         and isinstance(body["error"].get("message"), str) and body["error"]["message"]
                         and isinstance(body["error"].get("type"), str))
        if want is not None:
            if status == want and is_json_error:
                return self.rec(kind, t0, "rejected", status)
            return self.rec(kind, t0, "wrong_status", status, detail=f"wanted {want}: {raw[:200]!r}")
        if status >= 500:
            if is_json_error:
                return self.rec(kind, t0, "server_error", status, detail=raw[:200])
            if status in (502, 503, 504):
                return self.rec(kind, t0, "upstream_error", status, detail=raw[:120])
            return self.rec(kind, t0, "server_error", status, detail=raw[:200])
        return self.rec(kind, t0, "wrong_status", status, detail=raw[:200])

    async def bad_sweep(self, session):
        """Every bad-request case once, one after another, at the start of the load (the random mix then
        repeats them): each is seen to get its 4xx however short the run."""
        for case in self.bad_cases():
            await self.bad(session, case)

    async def bad(self, session, case):
        name, path, body, want = case
        kind = "bad_" + name
        t0 = self.now()
        try:
            async with session.post(self.base + path, data=body, headers={"Content-Type": "application/json"},
                                    timeout=aiohttp.ClientTimeout(total=self.request_timeout)) as resp:
                raw = (await resp.read()).decode("utf-8", "replace")
                return self.error_status(kind, t0, resp.status, raw, want)
        except Exception as e:  # noqa: BLE001 - every exception is classified
            return self.transport_error(kind, t0, e, got_headers=False)

    def transport_error(self, kind, t0, e, got_headers, status=None):
        if isinstance(e, asyncio.TimeoutError):
            return self.rec(kind, t0, "timeout", status, detail="timeout")
        if isinstance(e, aiohttp.ClientPayloadError) or (got_headers and isinstance(
                e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError))):
            return self.rec(kind, t0, "stream_cut", status, detail=repr(e))
        if isinstance(e, (aiohttp.ClientConnectionError, ConnectionError, OSError)):
            return self.rec(kind, t0, "conn_error", status, detail=repr(e))
        return self.rec(kind, t0, "client_error", status, detail=repr(e))

    def check_text(self, body, texts):
        """A stop string must not appear in the returned text."""
        stops = body.get("stop") or []
        for t in texts:
            for s in stops:
                if s in t:
                    return f"stop string {s!r} in the text {t[-80:]!r}"
        return None

    async def plain(self, session, kind, path, body):
        t0 = self.now()
        status = None
        try:
            async with session.post(self.base + path, json=body,
                                    timeout=aiohttp.ClientTimeout(total=self.request_timeout)) as resp:
                status = resp.status
                raw = await resp.read()
                text = raw.decode("utf-8", "replace")
                if status != 200:
                    return self.error_status(kind, t0, status, text)
                try:
                    j = json.loads(text)
                except ValueError:
                    return self.rec(kind, t0, "truncated", status, detail=f"not complete JSON: {text[-120:]!r}")
                n = body.get("n", 1)
                choices = j.get("choices") if isinstance(j, dict) else None
                if not isinstance(choices, list) or len(choices) != n:
                    return self.rec(kind, t0, "truncated", status, detail=f"choices: {text[:200]!r}")
                texts = []
                for c in choices:
                    if c.get("finish_reason") not in VALID_FINISH:
                        return self.rec(kind, t0, "bad_reply", status, detail=f"finish_reason {c.get('finish_reason')!r}")
                    texts.append((c.get("message") or {}).get("content") or "" if "message" in c else c.get("text", ""))
                u = j.get("usage") or {}
                if not isinstance(u.get("completion_tokens"), int) or u["completion_tokens"] > body["max_tokens"] * n:
                    return self.rec(kind, t0, "bad_reply", status, detail=f"usage {u}")
                err = self.check_text(body, texts)
                if err:
                    return self.rec(kind, t0, "bad_reply", status, detail=err)
                return self.rec(kind, t0, "ok", status, tokens=u["completion_tokens"])
        except Exception as e:  # noqa: BLE001
            return self.transport_error(kind, t0, e, got_headers=status is not None, status=status)

    async def stream(self, session, kind, path, body, cancel_after=None):
        """A streaming request read event by event; `cancel_after`: close the connection after that many events."""
        t0 = self.now()
        status, ttft, events = None, None, 0
        try:
            async with session.post(self.base + path, json=body,
                                    timeout=aiohttp.ClientTimeout(total=self.request_timeout)) as resp:
                status = resp.status
                if status != 200:
                    return self.error_status(kind, t0, status, (await resp.read()).decode("utf-8", "replace"))
                n = body.get("n", 1)
                texts, finish, done, usage = {}, {}, False, False
                async for line in resp.content:
                    line = line.decode("utf-8", "replace").rstrip("\r\n")
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if done:
                        return self.rec(kind, t0, "bad_reply", status, detail=f"an event after [DONE]: {payload[:100]!r}")
                    if payload == "[DONE]":
                        done = True
                        continue
                    try:
                        ev = json.loads(payload)
                    except ValueError:
                        return self.rec(kind, t0, "bad_reply", status, detail=f"unparsable event {payload[:100]!r}")
                    if "error" in ev:
                        return self.rec(kind, t0, "bad_reply", status, detail=f"error event {payload[:200]!r}")
                    if ev.get("usage"):
                        usage = True
                    for c in ev.get("choices", []):
                        i = c.get("index", 0)
                        piece = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                        if piece:
                            if ttft is None:
                                ttft = self.now() - t0
                            texts[i] = texts.get(i, "") + piece
                        if c.get("finish_reason") is not None:
                            if i in finish:
                                return self.rec(kind, t0, "bad_reply", status, detail=f"two finish_reasons for choice {i}")
                            finish[i] = c["finish_reason"]
                    events += 1
                    if cancel_after is not None and events >= cancel_after:
                        resp.close()  # drops the connection: the server must cancel and free the sequence
                        return self.rec(kind, t0, "cancelled", status, events=events)
                # the body ended cleanly (aiohttp raises ClientPayloadError when the chunked terminator is missing)
                if not done or len(finish) != n:
                    return self.rec(kind, t0, "truncated", status, ttft=ttft,
                                    detail=f"done={done} finish={finish} after {events} events")
                bad = [f for f in finish.values() if f not in VALID_FINISH]
                if bad:
                    return self.rec(kind, t0, "bad_reply", status, detail=f"finish_reason {bad}")
                if (body.get("stream_options") or {}).get("include_usage") and not usage:
                    return self.rec(kind, t0, "bad_reply", status, detail="include_usage but no usage chunk")
                err = self.check_text(body, texts.values())
                if err:
                    return self.rec(kind, t0, "bad_reply", status, detail=err)
                return self.rec(kind, t0, "ok", status, ttft=ttft, events=events)
        except Exception as e:  # noqa: BLE001
            return self.transport_error(kind, t0, e, got_headers=status is not None, status=status)

    async def cancel_stream(self, session, rng):
        chat = rng.random() < 0.5
        body = self.body(rng, chat, True)
        body["max_tokens"] = rng.choice([32, 64, 128])
        body["ignore_eos"] = True
        return await self.stream(session, "cancel_stream", "/v1/chat/completions" if chat else "/v1/completions",
                                 body, cancel_after=rng.randint(1, 6))

    async def cancel_plain(self, session, rng):
        """A non-streaming request the client abandons after a random delay (its connection closed)."""
        chat = rng.random() < 0.5
        body = self.body(rng, chat, False)
        body["max_tokens"] = rng.choice([32, 64, 128])
        body["ignore_eos"] = True
        body.pop("n", None)
        t0 = self.now()
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            return await asyncio.wait_for(self.plain(session, "cancel_plain", path, body), rng.uniform(0.05, 1.0))
        except asyncio.TimeoutError:
            return self.rec("cancel_plain", t0, "cancelled")


async def client_loop(load, session, cid, deadline):
    rng = random.Random(load.seed * 7919 + cid)
    while time.monotonic() < deadline:
        await load.one(session, rng)


async def raw_stream_client(load, host, port, idx, deadline, bytes_per_s, results):
    """A client on a raw socket with a small receive buffer: sends one long streaming request and then reads
    `bytes_per_s` bytes a second (0: never reads) until the deadline, then closes. Repeats if the reply ends."""
    loop = asyncio.get_running_loop()
    res = {"kind": "slow" if bytes_per_s else "never_read", "requests": 0, "bytes": 0, "status_200": 0,
           "ended_by_server": 0, "errors": []}
    results.append(res)
    rng = random.Random(load.seed * 104729 + idx)
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        try:
            await loop.sock_connect(s, (host, port))
            body = {"prompt": load.prompt(rng), "max_tokens": min(512, load.ctx // 2), "ignore_eos": True,
                    "stream": True, "temperature": 1.0, "seed": rng.randrange(1 << 30)}
            data = json.dumps(body).encode()
            await loop.sock_sendall(s, f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                                       f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            res["requests"] += 1
            head = b""
            while time.monotonic() < deadline:
                if bytes_per_s == 0:
                    await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                    continue
                want = 12 - len(head) if len(head) < 12 else bytes_per_s  # the status line at once, then slowly
                b = await asyncio.wait_for(loop.sock_recv(s, want), timeout=max(0.1, deadline - time.monotonic()))
                if not b:
                    res["ended_by_server"] += 1
                    break
                res["bytes"] += len(b)
                if len(head) < 12:
                    head += b
                    if len(head) >= 12 and head.startswith(b"HTTP/1.1 200"):
                        res["status_200"] += 1
                    if len(head) < 12:
                        continue
                await asyncio.sleep(1.0)
        except asyncio.TimeoutError:
            pass
        except OSError as e:
            res["errors"].append(repr(e))
        finally:
            s.close()
    return res


async def rss_sampler(pids, samples, stop, interval):
    t0 = time.monotonic()
    while not stop.is_set():
        samples.append((round(time.monotonic() - t0, 1), {name: rss_mb(pid) for name, pid in pids.items()}))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def progress(load, stop, interval):
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            c = collections.Counter(r["cls"] for r in load.records)
            print(f"soak: {load.now():.0f} s: {len(load.records)} replies {dict(c)}", file=sys.stderr, flush=True)


async def prepare_long(session, base, ctx):
    """Prose of about 0.7 x ctx tokens (counted by the server's /tokenize) for the long prompts, and its length."""
    unit = " ".join(PROSE)
    async with session.post(base + "/tokenize", json={"prompt": unit}) as r:
        per = (await r.json())["count"]
    copies = max(1, int(0.7 * ctx / per))
    text = " ".join([unit] * copies)
    async with session.post(base + "/tokenize", json={"prompt": text}) as r:
        n = (await r.json())["count"]
    while n > 0.72 * ctx and copies > 1:
        copies -= 1
        text = " ".join([unit] * copies)
        async with session.post(base + "/tokenize", json={"prompt": text}) as r:
            n = (await r.json())["count"]
    return text, n


# ---- one run ------------------------------------------------------------------------------------------------------

def git_commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


async def run_async(a, targets):
    """`targets`: {"base": load URL, "replicas": [(name, base, pid or None)], "kill": callable or None}."""
    base = targets["base"]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)  # under httplib's 5 s keep-alive
    result = {}
    async with aiohttp.ClientSession(connector=connector) as session:
        replicas = targets["replicas"]
        async with session.get(base + "/v1/models", timeout=aiohttp.ClientTimeout(total=30)) as r:
            models = await r.json()
        model = models["data"][0]["id"]
        ctx = int(models["data"][0].get("max_model_len") or a.ctx)
        long_text, long_tokens = await prepare_long(session, base, ctx)
        start_metrics = {name: await scrape(session, rb) for name, rb, _ in replicas}
        load = Load(base, model, ctx, a.seed, a.request_timeout, long_text, long_tokens)
        pids = {name: pid for name, _, pid in replicas if pid}
        rss_start = {name: rss_mb(pid) for name, pid in pids.items()}
        samples, stop = [], asyncio.Event()
        sampler = asyncio.create_task(rss_sampler(pids, samples, stop, max(1.0, a.duration / 60)))
        prog = asyncio.create_task(progress(load, stop, a.progress)) if a.progress > 0 else None
        deadline = time.monotonic() + a.duration
        host, port = re.match(r"http://([^:/]+):(\d+)", base).groups()
        raw_results = []
        tasks = [asyncio.create_task(client_loop(load, session, i, deadline)) for i in range(a.clients)]
        tasks.append(asyncio.create_task(load.bad_sweep(session)))
        tasks += [asyncio.create_task(raw_stream_client(load, host, int(port), i, deadline, 1, raw_results))
                  for i in range(a.slow_clients)]
        tasks += [asyncio.create_task(raw_stream_client(load, host, int(port), 1000 + i, deadline, 0, raw_results))
                  for i in range(a.never_read_clients)]
        kill = None
        if targets.get("kill") and a.kill_after is not None:
            await asyncio.sleep(a.kill_after)
            t_kill = load.now()
            name = targets["kill"]()
            kill = {"t": round(t_kill, 2), "replica": name}
            print(f"soak: {t_kill:.1f} s: SIGKILL {name}", file=sys.stderr, flush=True)
        await asyncio.gather(*tasks)
        t_load_end = load.now()
        stop.set()
        await sampler
        if prog:
            await prog
        # After the load: each surviving replica must come back to nothing in use.
        end = {}
        for name, rb, pid in replicas:
            if pid and rss_mb(pid) is None:
                end[name] = {"killed": True}
                continue
            f, m = await wait_idle(session, rb, a.idle_timeout)
            m0 = start_metrics[name]
            end[name] = {**f, "rss_mb": rss_mb(pid) if pid else None,
                         "generation_tokens": m.get("trellm:generation_tokens_total", 0)
                         - m0.get("trellm:generation_tokens_total", 0),
                         "prompt_tokens": m.get("trellm:prompt_tokens_total", 0) - m0.get("trellm:prompt_tokens_total", 0),
                         "preemptions": m.get("trellm:num_preemptions_total", 0) - m0.get("trellm:num_preemptions_total", 0),
                         "prefix_hit_tokens": m.get("trellm:prefix_cache_hits_total", 0)
                         - m0.get("trellm:prefix_cache_hits_total", 0),
                         "kv_blocks": int(m.get("trellm:kv_cache_blocks", 0)),
                         "finished": {k.split("finished_reason=")[1].rstrip("}"): v - m0.get(k, 0)
                                      for k, v in m.items() if k.startswith("trellm:request_success_total{")},
                         "rejected": m.get("trellm:request_rejected_total", 0) - m0.get("trellm:request_rejected_total", 0)}

    # ---- the verdict ----
    recs = load.records
    by_class = collections.Counter(r["cls"] for r in recs)
    by_kind = collections.defaultdict(collections.Counter)
    for r in recs:
        by_kind[r["kind"]][r["cls"]] += 1
    failures = []
    for r in recs:
        if r["cls"] in ALWAYS_FAIL:
            failures.append(r)
        elif r["cls"] in FAULT_CLEAN:
            in_flight_at_kill = kill is not None and r["t0"] <= kill["t"] <= r["t1"]
            if not in_flight_at_kill:
                failures.append(r)
    ok = [r for r in recs if r["cls"] == "ok"]
    normal = [r for r in ok if r["kind"] not in ("cancel_stream", "cancel_plain", "long")]
    bad_kinds = {k: dict(v) for k, v in by_kind.items() if k.startswith("bad_")}
    checks = {
        "no_failures": not failures,
        "bad_requests_all_rejected": all(set(v) == {"rejected"} for v in bad_kinds.values()) and bool(bad_kinds),
        "idle_after": all(all(v == 0 for k, v in e.items() if k in ("kv_blocks_used", "running", "waiting", "in_flight"))
                          for e in end.values() if not e.get("killed")),
        "slow_clients_served": all(x["status_200"] > 0 for x in raw_results if x["kind"] == "slow"),
    }
    if kill:
        after = [r for r in recs if r["t0"] > kill["t"]]
        in_flight = [r for r in recs if r["t0"] <= kill["t"] <= r["t1"]]
        kill.update({
            "in_flight": len(in_flight),
            "in_flight_by_class": dict(collections.Counter(r["cls"] for r in in_flight)),
            "started_after": len(after),
            "started_after_by_class": dict(collections.Counter(r["cls"] for r in after)),
        })
        checks["survivor_served_after_kill"] = sum(r["cls"] == "ok" for r in after) > 0
    rss_end = {name: e.get("rss_mb") for name, e in end.items()}
    result.update({
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": a.machine or machine(),
        "command": a.command,
        "mode": "replicas" if kill or len(replicas) > 1 else "single",
        "duration_s": a.duration, "load_s": round(t_load_end, 1), "clients": a.clients,
        "slow_clients": a.slow_clients, "never_read_clients": a.never_read_clients, "seed": a.seed,
        "ctx": ctx, "long_prompt_tokens": long_tokens,
        "requests": len(recs),
        "by_class": dict(by_class),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "failures": len(failures),
        "failure_examples": failures[:10],
        "latency_s": lat_summary([r["t1"] - r["t0"] for r in normal]),
        "ttft_s": lat_summary([r["ttft"] for r in normal if r.get("ttft") is not None]),
        "latency_by_kind_p99_s": {k: pct([r["t1"] - r["t0"] for r in ok if r["kind"] == k], 99)
                                  for k in sorted({r["kind"] for r in ok})},
        "requests_per_s": round(len(recs) / max(1e-9, t_load_end), 2),
        "rss_mb": {"start": rss_start, "end": rss_end,
                   "max": {n: max((s[1].get(n) or 0) for s in samples) for n in pids} if samples else {}},
        "rss_samples": samples[:: max(1, len(samples) // 20)],
        "raw_clients": raw_results,
        "end": end,
        "kill": kill,
        "checks": checks,
        "ok": all(checks.values()),
    })
    for r in result["failure_examples"]:
        r.pop("t0", None)
    return result


def markdown(r):
    def f(v, nd=3):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))
    lines = [f"### {r['mode']} soak, {r['date']}, commit {r['commit']}", "",
             f"- machine: {r['machine']}", f"- command: `{r['command']}`",
             f"- {r['duration_s']} s, {r['clients']} clients + {r['slow_clients']} slow (1 byte/s) + "
             f"{r['never_read_clients']} never-reading; ctx {r['ctx']}, long prompts up to {r['long_prompt_tokens']} tokens",
             f"- **{r['requests']} requests** ({r['requests_per_s']}/s), **{r['failures']} failures**; "
             f"verdict: {'PASS' if r['ok'] else 'FAIL'} ({', '.join(k for k, v in r['checks'].items() if not v) or 'all checks'}"
             f"{'' if not r['ok'] else ' passed'})", "",
             "| class | replies |", "| --- | ---: |"]
    for k, v in sorted(r["by_class"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v} |")
    lat, tt = r["latency_s"], r["ttft_s"]
    lines += ["", "| latency of normal requests (s) | p50 | p90 | p99 | max | n |", "| --- | ---: | ---: | ---: | ---: | ---: |",
              f"| end to end | {f(lat['p50'])} | {f(lat['p90'])} | {f(lat['p99'])} | {f(lat['max'])} | {lat['n']} |",
              f"| first token (streams) | {f(tt['p50'])} | {f(tt['p90'])} | {f(tt['p99'])} | {f(tt['max'])} | {tt['n']} |", ""]
    lines += ["| replica | RSS start (MiB) | RSS end (MiB) | RSS max (MiB) | KV blocks in use after | running | waiting | "
              "in flight | generated tokens | preemptions |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, e in r["end"].items():
        if e.get("killed"):
            lines.append(f"| {name} | {f(r['rss_mb']['start'].get(name), 1)} | killed | {f(r['rss_mb']['max'].get(name), 1)} "
                         "| - | - | - | - | - | - |")
            continue
        lines.append(f"| {name} | {f(r['rss_mb']['start'].get(name), 1)} | {f(e.get('rss_mb'), 1)} | "
                     f"{f(r['rss_mb']['max'].get(name), 1)} | {e['kv_blocks_used']} of {e['kv_blocks']} | {e['running']} | "
                     f"{e['waiting']} | {e.get('in_flight', '-')} | {int(e['generation_tokens'])} | {int(e['preemptions'])} |")
    for name, e in r["end"].items():
        if not e.get("killed"):
            lines.append(f"\n- {name}: finished by reason (server's count) {e['finished']}, rejected {int(e['rejected'])}, "
                         f"prefix-cache hit tokens {int(e['prefix_hit_tokens'])}")
    slow = [x for x in r["raw_clients"] if x["kind"] == "slow"]
    never = [x for x in r["raw_clients"] if x["kind"] == "never_read"]
    lines += ["", f"- slow clients: {len(slow)}, {sum(x['requests'] for x in slow)} requests, "
              f"{sum(x['bytes'] for x in slow)} bytes read at 1 byte/s, all got 200: {all(x['status_200'] for x in slow)}; "
              f"never-reading clients: {len(never)}, {sum(x['requests'] for x in never)} requests held open"]
    if r["kill"]:
        k = r["kill"]
        lines.append(f"- SIGKILL of {k['replica']} at {k['t']} s: {k['in_flight']} requests in flight then "
                     f"{k['in_flight_by_class']}; {k['started_after']} started after it: {k['started_after_by_class']}")
    if r["failure_examples"]:
        lines += ["", "failures (first 10):", ""] + [f"- `{json.dumps(x)}`" for x in r["failure_examples"]]
    return "\n".join(lines) + "\n"


def run(a):
    """Starts what `a` asks for (servers, nginx), runs the load, stops them; returns the result dict."""
    tmp = tempfile.mkdtemp(prefix="trellm-soak-")
    reps, nginx = [], None
    try:
        if a.url:
            targets = {"base": a.url.rstrip("/"), "replicas": [("server", a.url.rstrip("/"), a.pid)]}
        else:
            args = ["--device", a.device, "--max-seqs", a.max_seqs, "--ctx", a.ctx, *a.server_arg]
            if a.model:
                args = ["--model", a.model, *args]
            if a.kv_memory:
                args += ["--kv-memory", a.kv_memory]
            for i in range(a.replicas):
                reps.append(Replica(a.trellm, args, os.path.join(tmp, f"replica{i}.log")))
            replicas = [(f"replica{i}", r.base, r.pid) for i, r in enumerate(reps)]
            if a.replicas > 1:
                nginx = Nginx(os.path.join(tmp, "nginx"), [r.port for r in reps])
                targets = {"base": nginx.base, "replicas": replicas}
                if a.kill_after is not None:
                    def kill():
                        reps[0].kill(signal.SIGKILL)
                        return "replica0"
                    targets["kill"] = kill
            else:
                targets = {"base": reps[0].base, "replicas": replicas}
        result = asyncio.run(run_async(a, targets))
        if nginx:
            result["nginx_alive"] = nginx.alive()
            result["checks"]["nginx_alive"] = result["nginx_alive"]
        for i, r in enumerate(reps):
            alive = r.alive()
            if i == 0 and result.get("kill"):
                continue
            result["checks"][f"replica{i}_alive"] = alive
        result["ok"] = all(result["checks"].values())
        return result
    finally:
        if nginx:
            nginx.stop()
        rcs = [r.stop() for r in reps]
        if reps and a.keep_logs:
            print(f"soak: logs in {tmp}", file=sys.stderr)
        elif not a.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        if reps:
            print(f"soak: server exit codes on SIGTERM: {rcs}", file=sys.stderr)


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server (or load balancer), e.g. http://127.0.0.1:8080")
    src.add_argument("--trellm", help="the trellm binary: start our own server(s) on free loopback ports")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for its RSS")
    ap.add_argument("--model", help="with --trellm: the model directory (default: the built-in model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--kv-memory", type=float, default=0, help="--kv-memory GB for the server (0: its default)")
    ap.add_argument("--server-arg", action="append", default=[], help="one more argument for `trellm serve`")
    ap.add_argument("--replicas", type=int, default=1, choices=(1, 2),
                    help="2: two servers behind nginx, replica0 SIGKILLed at --kill-after")
    ap.add_argument("--kill-after", type=float, help="seconds into the load (default with --replicas 2: half of it)")
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--duration", type=float, default=60, help="seconds of load")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--slow-clients", type=int, default=4, help="clients reading 1 byte/s of a stream")
    ap.add_argument("--never-read-clients", type=int, default=4, help="clients that send a stream request and never read")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--idle-timeout", type=float, default=60, help="how long the server may take to come back to idle")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--progress", type=float, default=30, help="seconds between progress lines (0: none)")
    ap.add_argument("--machine", help="the machine, in words, for the record (default: from /proc/cpuinfo)")
    ap.add_argument("--jsonl", help="append the JSON line to this file")
    ap.add_argument("--md", help="append the markdown summary to this file")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' and nginx's logs (the path is printed)")
    return ap


def parse_args(argv=None):
    a = parser().parse_args(argv)
    if a.replicas > 1 and not a.trellm:
        raise SystemExit("--replicas 2 needs --trellm (it starts the servers and nginx)")
    if a.replicas > 1 and a.kill_after is None and not a.no_kill:
        a.kill_after = a.duration / 2
    if a.no_kill:
        a.kill_after = None
    a.command = "scripts/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return a


def main(argv=None):
    a = parse_args(argv)
    r = run(a)
    line = json.dumps(r)
    print(line)
    md = markdown(r)
    print(md)
    if a.jsonl:
        with open(a.jsonl, "a") as f:
            f.write(line + "\n")
    if a.md:
        with open(a.md, "a") as f:
            f.write("\n" + md)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for tests/py/test_server.py: start `trellm serve` on a free loopback port and talk to it below the
official clients (raw HTTP for malformed bodies, size limits and disconnects; SSE read line by line so `[DONE]`
is visible; /metrics parsed by prometheus_client's own text parser)."""
import http.client
import json
import re
import select
import signal
import socket
import subprocess
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN

LISTENING = re.compile(r"trellm serve: listening on (http://[^\s:/]+:(\d+))")


def free_port():
    """A loopback port nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `trellm serve` process. Its stdout and stderr are merged and kept in `self.lines` (read by a thread,
    so a chatty server never blocks on a full pipe)."""

    def __init__(self, *args, startup_timeout=120):
        self.args = [str(a) for a in args]
        self.lines = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.base_url = None
        for attempt in range(3):  # the free port may be taken between our probe and the server's bind
            self.port = free_port()
            cmd = [BIN, "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         encoding="utf-8", errors="replace", bufsize=1)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            if self._wait_ready(startup_timeout):
                return
            if self.proc.poll() is None:
                self.kill()
            if "bind" not in self.log().lower() and "address" not in self.log().lower():
                break
        raise AssertionError(f"trellm serve {' '.join(self.args)} did not start:\n{self.log()}")

    def _read(self):
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
            m = LISTENING.search(line)
            if m and int(m.group(2)) == self.port:
                self.base_url = m.group(1)
                self._ready.set()

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                return True
            if self.proc.poll() is not None:
                self._reader.join(2)
                return False
        return False

    def log(self):
        with self._lock:
            return "\n".join(self.lines)

    @property
    def url(self):  # the OpenAI base URL
        return self.base_url + "/v1"

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Sends `sig` and waits; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self._reader.join(5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # ---- raw HTTP ---------------------------------------------------------------------------------------------

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, parsed JSON or raw text, headers). `body`: a dict/list (sent as JSON), bytes or str (as is)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = dict(headers or {})
            if body is not None and not isinstance(body, (bytes, str)):
                body = json.dumps(body)
                h.setdefault("Content-Type", "application/json")
            elif body is not None:
                h.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
            text = data.decode("utf-8", errors="replace")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return r.status, parsed, {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def sse(self, path, body, headers=None, timeout=300):
        """POSTs a streaming request; returns (status, [parsed data events], saw_done, raw_lines).
        Each event's JSON is parsed; `[DONE]` must be the last event."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = {"Content-Type": "application/json", **(headers or {})}
            conn.request("POST", path, body=json.dumps(body), headers=h)
            r = conn.getresponse()
            if r.status != 200:
                return r.status, [json.loads(r.read() or b"null")], False, []
            events, done, raw = [], False, []
            for line in r:
                line = line.decode("utf-8").rstrip("\r\n")
                raw.append(line)
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                assert not done, f"an event after data: [DONE]: {payload!r}"
                if payload == "[DONE]":
                    done = True
                else:
                    events.append(json.loads(payload))
            return r.status, events, done, raw
        finally:
            conn.close()

    def open_stream(self, path, body, timeout=120):
        """A raw streaming request on a socket the caller reads from and closes (to disconnect mid-stream)."""
        data = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        return s

    def post_huge(self, path, size, timeout=60):
        """Announces and sends a `size`-byte body, stopping as soon as the server answers (it may answer before
        reading the body and close). Returns (status, body text)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {size}\r\n\r\n".encode())
            chunk = b'{"prompt": "' + b"a" * (1 << 20)
            sent, resp = 0, b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                readable, writable, _ = select.select([s], [s] if sent < size else [], [], 1.0)
                if readable:
                    break
                if writable:
                    part = chunk[: min(len(chunk), size - sent)]
                    try:
                        sent += s.send(part)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    chunk = b"a" * (1 << 20)
            try:
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    resp += b
                    if b"\r\n\r\n" in resp:
                        head, _, rest = resp.partition(b"\r\n\r\n")
                        m = re.search(rb"content-length:\s*(\d+)", head, re.I)
                        if m and len(rest) >= int(m.group(1)):
                            break
            except (ConnectionResetError, socket.timeout):
                pass
            if not resp:
                return None, ""
            status = int(resp.split(b" ", 2)[1])
            return status, resp.partition(b"\r\n\r\n")[2].decode("utf-8", errors="replace")
        finally:
            s.close()

    # ---- metrics ----------------------------------------------------------------------------------------------

    def metrics(self):
        """{(sample name, ((label, value), ...) without model_name): value}, plus the families' types under
        ("__type__", family name)."""
        status, text, headers = self.get("/metrics")
        assert status == 200, text
        assert headers.get("content-type", "").startswith("text/plain"), headers
        out = {}
        for fam in text_string_to_metric_families(text):
            out[("__type__", fam.name)] = fam.type
            for s in fam.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out


def metric(m, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    assert key in m, f"no sample {name}{labels or ''} in /metrics; have {sorted({k[0] for k in m})}"
    return m[key]


def wait_for(cond, timeout=20.0, interval=0.05):
    """Polls `cond()` until it is truthy; returns its last value."""
    deadline = time.monotonic() + timeout
    v = cond()
    while not v and time.monotonic() < deadline:
        time.sleep(interval)
        v = cond()
    return v


def read_sse_events(sock, count, timeout=60):
    """Reads from a raw socket until `count` SSE data events have arrived; returns the bytes read."""
    buf = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while buf.count(b"data:") < count and time.monotonic() < deadline:
        b = sock.recv(65536)
        if not b:
            break
        buf += b
    return buf


# ---- reading responses ------------------------------------------------------------------------------------

STOP_MARKUP = ("<|observation|>", "<|user|>", "<|endoftext|>")


def collect_chat_stream(stream):
    """(content, reasoning, finish_reason, usage, chunks) of a one-choice chat stream."""
    content, reasoning, finish, usage, chunks = "", "", None, None, []
    for ch in stream:
        chunks.append(ch)
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            assert c.index == 0
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            if c.finish_reason is not None:
                assert finish is None, "two finish_reasons in one stream"
                finish = c.finish_reason
    return content, reasoning, finish, usage, chunks


def collect_completion_stream(stream):
    texts, finishes, usage = {}, {}, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert c.index not in finishes, "two finish_reasons for one choice"
                finishes[c.index] = c.finish_reason
    return texts, finishes, usage


def cached_tokens(usage):
    d = usage.prompt_tokens_details
    return 0 if d is None or d.cached_tokens is None else d.cached_tokens


def check_error(status, body, want_status, mention=None):
    assert status == want_status, (status, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    e = body["error"]
    assert isinstance(e.get("message"), str) and e["message"], body
    assert isinstance(e.get("type"), str) and e["type"], body
    assert "param" in e and "code" in e, body
    if mention is not None:
        assert mention in e["message"] or e.get("param") == mention, body


def pick_stop(text, pieces, skip=3):
    """A stop string that spans a token boundary (`pieces` concatenate to `text`) and first occurs after
    some text: returns (stop, index of its first occurrence)."""
    assert "".join(pieces) == text
    offs, o = [], 0
    for p in pieces:
        o += len(p)
        offs.append(o)
    for i in range(skip, len(pieces) - 1):
        b = offs[i]
        left, right = pieces[i], pieces[i + 1]
        for nl, nr in ((2, 2), (3, 2), (2, 3), (1, 3), (3, 1), (1, 2), (2, 1), (1, 1)):
            if len(left) < nl or len(right) < nr:
                continue
            s = text[b - nl:b + nr]
            if not re.search(r"[A-Za-z]", s) or text.find(s) != b - nl:
                continue
            return s, b - nl
    return None, None


def success_total(m):
    return sum(v for (n, _), v in m.items() if n == "trellm:request_success_total")


def dechunk(raw):
    """Decodes an HTTP/1.1 chunked body; returns (body, complete: the terminal 0-chunk was seen)."""
    body, rest = b"", raw
    while rest:
        line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return body, False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return body, True
        if len(rest) < size + 2:
            return body + rest[:size], False
        body, rest = body + rest[:size], rest[size + 2:]
    return body, False


def stream_tool_calls(stream):
    """Accumulates streamed tool-call deltas by index: ([(id, name, arguments)], content, reasoning, finish)."""
    calls, content, reasoning, finish = {}, "", "", None
    for ch in stream:
        for c in ch.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            for tc in c.delta.tool_calls or []:
                e = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert e["id"] in (None, tc.id), "a tool call's id changed mid-stream"
                    e["id"] = tc.id
                if tc.function and tc.function.name:
                    e["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    e["arguments"] += tc.function.arguments
            if c.finish_reason:
                finish = c.finish_reason
    return [calls[i] for i in sorted(calls)], content, reasoning, finish


def oracle_parse(raw, thinking_open):
    """GLM47FLASH.md's output format, parsed here from the raw generated tokens (special tokens as text):
    reasoning before </think> (when the prompt opened <think>), tool calls
    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call> (a value that is JSON stays JSON),
    the rest is content. Generation ends at the first stop token."""
    for m in STOP_MARKUP:
        raw = raw.split(m)[0]
    reasoning = ""
    if thinking_open:
        reasoning, _, raw = raw.partition("</think>") if "</think>" in raw else (raw, "", "")
    calls = []
    for body in re.findall(r"<tool_call>(.*?)</tool_call>", raw, re.S):
        name = body.split("<arg_key>")[0].strip()
        args = {}
        for k, v in re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", body, re.S):
            try:
                args[k.strip()] = json.loads(v)
            except ValueError:
                args[k.strip()] = v
        calls.append({"name": name, "arguments": args})
    content = re.sub(r"<tool_call>.*?</tool_call>", "", raw, flags=re.S)
    return reasoning.strip(), content.strip(), calls

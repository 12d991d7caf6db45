#!/usr/bin/env python3
"""Seed corpora for the libFuzzer targets in tests/fuzz, made from the committed fixtures (stdlib only).

    tests/fuzz/make_seeds.py OUT_DIR      writes OUT_DIR/<target>/<name> for every target

Large fixtures are cut down so that the fuzzer mutates small inputs: safetensors files keep the first tensors of
each fixture (a few KB of data, offsets rebased, names / dtypes / shapes / metadata as committed); tokenizer.json
files keep their normalizer, pre-tokenizer, post-processor, decoder and added tokens over a 300-token vocabulary.
Reproducers of fixed findings (tests/data/fuzz/<target>/) are added too, so a regression is found at once.
"""
import io
import json
import os
import struct
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")
MODELS = os.path.join(ROOT, "models")


def read(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


class Corpus:
    def __init__(self, out):
        self.out = out

    def add(self, target, name, data):
        d = os.path.join(self.out, target)
        os.makedirs(d, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def st_parse(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def st_build(header_items, metadata=None):
    """header_items: [(name, dtype, shape, bytes)] -> a .safetensors file (8-byte aligned header like the writer)."""
    h, data = {}, b""
    if metadata:
        h["__metadata__"] = metadata
    for name, dtype, shape, raw in header_items:
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    hs = json.dumps(h, separators=(",", ":")).encode()
    hs += b" " * ((8 - (8 + len(hs)) % 8) % 8)
    return struct.pack("<Q", len(hs)) + hs + data


def st_subset(blob, keep):
    """The tensors named in `keep` (in that order) of a safetensors blob, rebased into a new file."""
    h, data = st_parse(blob)
    items = []
    for name in keep:
        t = h[name]
        b, e = t["data_offsets"]
        items.append((name, t["dtype"], t["shape"], data[b:e]))
    return st_build(items, h.get("__metadata__"))


def safetensors_seeds(c):
    for fixture in ("tiny_a", "tiny_b", "tiny_odd", "tiny_groups", "tiny_mtp", "tiny_a_fused"):
        path = os.path.join(DATA, "hf", fixture, "model.safetensors")
        if not os.path.exists(path):
            continue
        h, _ = st_parse(read(path))
        names = [k for k in h if k != "__metadata__"]
        small = sorted(names, key=lambda k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0])
        budget, keep = 8192, []
        for k in small:
            size = h[k]["data_offsets"][1] - h[k]["data_offsets"][0]
            if size <= budget:
                keep.append(k)
                budget -= size
        c.add("fuzz_safetensors", f"{fixture}.safetensors", st_subset(read(path), keep[:12]))
    c.add("fuzz_safetensors", "empty.safetensors", st_build([]))
    c.add("fuzz_safetensors", "scalar_and_zero.safetensors",
          st_build([("s", "F32", [], b"\0\0\x80\x3f"), ("z", "BF16", [0, 4], b""), ("i", "I64", [2], bytes(16))],
                   {"format": "pt"}))
    c.add("fuzz_safetensors", "dtypes.safetensors",
          st_build([(f"t.{dt}", dt, [2], bytes(2 * sz)) for dt, sz in
                    (("F32", 4), ("F16", 2), ("BF16", 2), ("I64", 8), ("I32", 4), ("I16", 2), ("I8", 1), ("U8", 1))]))


def index_seeds(c):
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    wm = {"model.embed_tokens.weight": a, "model.norm.weight": a, "lm_head.weight": b}
    c.add("fuzz_safetensors_index", "index.json", json.dumps({"metadata": {"total_size": 36}, "weight_map": wm}, indent=2))
    c.add("fuzz_safetensors_index", "index_one_shard.json",
          json.dumps({"weight_map": {"model.embed_tokens.weight": a, "model.norm.weight": a}}))
    c.add("fuzz_safetensors_index", "index_wrong_shard.json", json.dumps({"weight_map": {"lm_head.weight": a}}))


def config_seeds(c):
    for d in sorted(os.listdir(os.path.join(DATA, "hf"))):
        for f in ("config.json", "generation_config.json"):
            p = os.path.join(DATA, "hf", d, f)
            if os.path.exists(p):
                c.add("fuzz_config", f"{d}_{f}", read(p))
    for d in ("tiny-glm", "tiny-glm-3bit"):
        for f in ("config.json", "generation_config.json", "tokenizer_config.json", "quantization_config.json"):
            p = os.path.join(MODELS, d, f)
            if os.path.exists(p):
                data = read(p)
                if f == "quantization_config.json":  # tensor_storage is long and says nothing new: keep 3 entries
                    q = json.loads(data)
                    if isinstance(q.get("tensor_storage"), dict):
                        q["tensor_storage"] = dict(list(q["tensor_storage"].items())[:3])
                    data = json.dumps(q, indent=1).encode()
                c.add("fuzz_config", f"{d}_{f}", data)
    c.add("fuzz_config", "tokenizer_config_list.json",
          json.dumps({"chat_template": [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"},
                                        {"name": "tool_use", "template": "x"}],
                      "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))


def small_tokenizer(tok, n_vocab=300, n_added=24):
    """The same components over the first n_vocab tokens and the merges among them."""
    model = dict(tok["model"])
    vocab = {k: v for k, v in model["vocab"].items() if v < n_vocab}
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    model["vocab"], model["merges"] = vocab, merges
    out = dict(tok)
    out["model"] = model
    added = [t for t in tok.get("added_tokens", [])][:n_added]
    for i, t in enumerate(added):
        t = dict(t)
        t["id"] = n_vocab + i
        added[i] = t
    out["added_tokens"] = added
    # Post-processor ids must name tokens that exist: point them at the remapped added tokens.
    remap = {t["content"]: t["id"] for t in added}

    def fix(pp):
        if isinstance(pp, dict):
            if "special_tokens" in pp and isinstance(pp["special_tokens"], dict):
                for k, st in pp["special_tokens"].items():
                    if k in remap:
                        st["ids"] = [remap[k]]
                    else:
                        st["ids"] = [0 for _ in st.get("ids", [])]
            for v in pp.values():
                fix(v)
        elif isinstance(pp, list):
            for v in pp:
                fix(v)
    fix(out.get("post_processor"))
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def tokenizer_json_seeds(c):
    toks = {"tiny-glm": json.loads(read(os.path.join(MODELS, "tiny-glm", "tokenizer.json"))),
            "glm4-synthetic": json.loads(read(os.path.join(DATA, "tokenizers", "glm4-synthetic", "tokenizer.json"))),
            "glm4-synthetic-bos": json.loads(read(os.path.join(DATA, "tokenizers", "glm4-synthetic-bos", "tokenizer.json")))}
    tdir = os.path.join(DATA, "tokenizers")
    for f in sorted(os.listdir(tdir)):
        if f.endswith(".tar.xz"):
            with tarfile.open(os.path.join(tdir, f)) as tar:
                for m in tar.getmembers():
                    if m.name.endswith("tokenizer.json"):
                        toks[f[:-7]] = json.loads(tar.extractfile(m).read())
    for name, tok in toks.items():
        c.add("fuzz_tokenizer_json", f"{name}.json", small_tokenizer(tok))


def tokenizer_seeds(c):
    text = read(os.path.join(DATA, "text", "austen_heldout_snippet.txt")).decode()
    pieces = [text[:200], text[200:260], "Hello, world! It's 2024.", "  leading\tand\r\ntrailing  ", "ünïcödé 日本語 🙂 e\u0301",
              "<|endoftext|><|user|>\n[gMASK]<sop><think>x</think><tool_call>f<arg_key>a</arg_key>", "1234567 x=3.14 CamelCase's",
              "a\u00a0b\u2028c\u3000d"]
    for sel in range(8):
        for i, p in enumerate(pieces):
            c.add("fuzz_tokenizer", f"t{sel}_{i}", bytes([sel | (0x80 if i % 2 else 0) | (0x40 if i % 3 == 0 else 0)]) + p.encode())


def templates():
    out = {"glm4": read(os.path.join(DATA, "templates", "glm4.jinja")),
           "features": read(os.path.join(DATA, "templates", "features.jinja"))}
    for d in ("tiny-glm", "tiny-glm-3bit"):
        p = os.path.join(MODELS, d, "chat_template.jinja")
        if os.path.exists(p):
            out[d] = read(p)
    return out


def jinja_seeds(c):
    expected = json.loads(read(os.path.join(DATA, "templates", "expected.json")))["templates"]
    tpls = templates()
    for name, src in tpls.items():
        cases = expected.get(name, expected.get("glm4"))
        for i, case in enumerate(cases[:: max(1, len(cases) // 8)][:8]):
            body = {k: case[k] for k in ("messages", "tools", "add_generation_prompt", "extra") if k in case}
            c.add("fuzz_jinja", f"{name}_{i}", src + b"\0" + json.dumps(body, ensure_ascii=False).encode())
    small = ["{{ messages[0].content | upper }}{% if add_generation_prompt %}!{% endif %}",
             "{% for m in messages %}{{ loop.index }}{{ m.role ~ ':' ~ m.content | tojson }}{% endfor %}",
             "{%- set ns = namespace(x=0) -%}{% for i in range(3) %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}",
             "{% macro f(a, b='y') %}{{ a }}{{ b }}{% endmacro %}{{ f(1) }}{{ f(2, b=3) }}",
             "{{ 'a,b'.split(',') | join('-') }}{{ [3,1,2] | sort | list }}{{ {'k': 1}.items() | list }}",
             "{% if tools is defined %}{{ tools | length }}{% endif %}{{ raise_exception('no') if false }}"]
    for i, s in enumerate(small):
        c.add("fuzz_jinja", f"small_{i}", s.encode() + b"\0" + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode())


def glm_output_seeds(c):
    fx = json.loads(read(os.path.join(DATA, "chat", "fixtures.json")))
    n = 0
    for group in fx.values():
        for case in group:
            reply = case.get("reference_reply")
            if isinstance(reply, str) and reply:
                c.add("fuzz_glm_output", f"fixture_{n}", bytes([n % 2, n % 7]) + reply.encode())
                n += 1
    hand = ["reasoning here</think>The answer.",
            "</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Berlin</arg_value><arg_key>days</arg_key>"
            "<arg_value>3</arg_value></tool_call>",
            "<think>a</think>b<tool_call>f<arg_key>x</arg_key><arg_value>{\"a\": [1, 2]}</arg_value></tool_call>tail<tool_call>broken",
            "<tool_call>no_args</tool_call><think", "text </thi"]
    for i, s in enumerate(hand):
        c.add("fuzz_glm_output", f"hand_{i}", bytes([i, 3 * i + 1]) + s.encode())


def exl3_seeds(c):
    blob = read(os.path.join(DATA, "exl3", "exl3_oracle_w384x128.safetensors"))
    h, _ = st_parse(blob)
    for key in ("w384x128_k2_mcg", "w384x128_k3_3inst", "w384x128_k4_mul1"):
        names = [f"{key}.{s}" for s in ("trellis", "suh", "svh", "mcg", "mul1") if f"{key}.{s}" in h]
        sub = st_subset(blob, names)
        h2, data = st_parse(sub)
        h2["__metadata__"] = {f"{key}.in": "384", f"{key}.out": "128"}
        items = [(k, v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in h2.items()
                 if k != "__metadata__"]
        c.add("fuzz_exl3", f"{key}.safetensors", st_build(items, h2["__metadata__"]))
    # Synthetic 128 x 128 Linears (K = 1): bias, legacy sign bitfields, unpadded dims.
    K = 1
    trellis = bytes(range(256)) * (8 * 8 * 16 * K * 2 // 256)
    ones = struct.pack("<H", 0x3C00) * 128
    c.add("fuzz_exl3", "bias.safetensors",
          st_build([("m.trellis", "I16", [8, 8, 16 * K], trellis), ("m.suh", "F16", [128], ones), ("m.svh", "F16", [128], ones),
                    ("m.bias", "F32", [100], bytes(400))], {"m.in": "120", "m.out": "100"}))
    c.add("fuzz_exl3", "legacy_su.safetensors",
          st_build([("m.trellis", "I16", [8, 8, 16 * K], trellis), ("m.su", "I16", [8], bytes(range(16))),
                    ("m.sv", "I16", [8], bytes(16)), ("m.mcg", "I32", [], struct.pack("<I", 0xCBAC1FED))]))


def server_seeds(c):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Emma Woodhouse's father?"}]
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    bodies = {
        "chat": {"model": "tiny-glm", "messages": msgs, "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                 "min_p": 0.05, "seed": 7, "stop": ["\n\n", "END"], "n": 2, "logprobs": True, "top_logprobs": 3},
        "chat_stream": {"messages": msgs, "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 8,
                        "chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True, "user": "u",
                        "frequency_penalty": 0, "presence_penalty": 0.0},
        "chat_tools": {"messages": msgs + [{"role": "assistant", "content": None, "reasoning_content": "hmm",
                                            "tool_calls": [{"id": "call_1", "type": "function",
                                                            "function": {"name": "get_weather", "arguments": "{\"city\": \"Bath\"}"}}]},
                                           {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "rain"}]}],
                       "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                       "parallel_tool_calls": False},
        "chat_required": {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y", "name": "n"}],
                          "tools": [tool], "tool_choice": "required"},
        "completion": {"model": "tiny-glm", "prompt": "Once upon a time", "max_tokens": 20, "logprobs": 2, "echo": False,
                       "best_of": 1, "stop": "."},
        "completion_ids": {"prompt": [[1, 2, 3, 40, 50]], "max_tokens": None, "stream": False},
        "messages": {"model": "tiny-glm", "max_tokens": 32, "system": [{"type": "text", "text": "Be kind."}],
                     "messages": [{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"},
                                                                    {"type": "tool_use", "id": "tu1", "name": "get_weather",
                                                                     "input": {"city": "Bath"}}]},
                                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu1", "content": "rain"},
                                                               {"type": "text", "text": "and?"}]}],
                     "tools": [{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}],
                     "tool_choice": {"type": "auto"}, "thinking": {"type": "enabled", "budget_tokens": 100},
                     "stop_sequences": ["\n"], "metadata": {"user_id": "x"}},
    }
    for name, b in bodies.items():
        c.add("fuzz_server_request", name + ".json", json.dumps(b))
    fx = json.loads(read(os.path.join(DATA, "chat", "fixtures.json")))
    for i, case in enumerate(fx.get("tool_calls", [])[:4]):
        c.add("fuzz_server_request", f"fixture_{i}.json", json.dumps({"messages": case["messages"], "tools": case.get("tools")}))


def reproducers(c):
    d = os.path.join(DATA, "fuzz")
    if not os.path.isdir(d):
        return
    for target in sorted(os.listdir(d)):
        td = os.path.join(d, target)
        if os.path.isdir(td):
            for f in sorted(os.listdir(td)):
                c.add(target, "repro_" + f, read(os.path.join(td, f)))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    c = Corpus(sys.argv[1])
    for fn in (safetensors_seeds, index_seeds, config_seeds, tokenizer_json_seeds, tokenizer_seeds, jinja_seeds,
               glm_output_seeds, exl3_seeds, server_seeds, reproducers):
        fn(c)
    for t in sorted(os.listdir(c.out)):
        files = os.listdir(os.path.join(c.out, t))
        size = sum(os.path.getsize(os.path.join(c.out, t, f)) for f in files)
        print(f"{t}: {len(files)} seeds, {size} bytes")


if __name__ == "__main__":
    main()

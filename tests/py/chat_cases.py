"""Chat-template test conversations and the reference renderer (jinja2 with transformers' settings).
Shared by tests/py/test_chat_template.py and scripts/make_template_fixtures.py."""
import datetime
import json

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city, «quoted» and ünïcode.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "max_results": {"type": "integer"}},
                       "required": ["query"]}}},
]


def _call(name, args, as_string):
    return {"id": "call_" + name, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False) if as_string else args}}


def conversations(args_as_string=False):
    """(label, messages, tools) triples: system prompt, multi-turn, tools, tool calls and results, reasoning."""
    sys_msg = {"role": "system", "content": "You are a helpful assistant. Answer in 中文 if asked 😀."}
    convs = [
        ("single-user", [{"role": "user", "content": "Hello!"}], None),
        ("system-user", [sys_msg, {"role": "user", "content": "What is 2+2?"}], None),
        ("multi-turn", [sys_msg, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello! How can I help?"},
                        {"role": "user", "content": "Tell me a joke about {{ braces }} and 'quotes' \"too\"."}], None),
        ("multi-turn-no-system", [{"role": "user", "content": "first\nline two"},
                                  {"role": "assistant", "content": "  padded answer  "},
                                  {"role": "user", "content": "second"},
                                  {"role": "assistant", "content": "ok"},
                                  {"role": "user", "content": "third"}], None),
        ("reasoning-in-content", [{"role": "user", "content": "Why?"},
                                  {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nBecause."},
                                  {"role": "user", "content": "And then?"}], None),
        ("reasoning-last-assistant", [{"role": "user", "content": "Why?"},
                                      {"role": "assistant", "content": "<think>Hmm.</think>Because."}], None),
        ("reasoning-field", [{"role": "user", "content": "Q"},
                             {"role": "assistant", "content": "A", "reasoning_content": "thinking it over"}], None),
        ("tools-only", [sys_msg, {"role": "user", "content": "Weather in Paris?"}], TOOLS),
        ("tools-no-system", [{"role": "user", "content": "Weather in Paris?"}], TOOLS),
        ("tool-call-and-result", [
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                _call("get_weather", {"city": "Paris", "unit": "celsius"}, args_as_string),
                _call("get_weather", {"city": "東京"}, args_as_string)]},
            {"role": "tool", "content": "{\"temp\": 21}"},
            {"role": "tool", "content": "{\"temp\": 18, \"sky\": \"☀\"}"},
            {"role": "assistant", "content": "Paris is 21°C, Tokyo 18°C."},
            {"role": "user", "content": "Thanks"}], TOOLS),
        ("tool-call-with-content", [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Search for trellm"},
            {"role": "assistant", "content": "Let me search.", "tool_calls": [
                _call("search", {"query": "trellm", "max_results": 3}, args_as_string)]},
            {"role": "tool", "content": "no results"}], TOOLS),
    ]
    return convs


def reference_env():
    """jinja2 configured like transformers' chat template renderer."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render_reference(source, case):
    tpl = reference_env().from_string(source)
    kw = dict(case.get("extra", {}))
    for k in ("bos_token", "eos_token"):
        if k in case:
            kw[k] = case[k]
    if case.get("tools") is not None:
        kw["tools"] = case["tools"]
    return tpl.render(messages=case["messages"], add_generation_prompt=case["add_generation_prompt"], **kw)


def cases_for(template_name):
    """All render cases for one template: every conversation x generation prompt x thinking on/off/unset."""
    out = []
    for label, messages, tools in conversations(args_as_string=template_name == "deepseek-v3"):
        if template_name == "deepseek-v3" and tools is not None and not any("tool_calls" in m for m in messages):
            pass
        for agp in (True, False):
            for think in (None, True, False):
                case = {"label": f"{label} agp={agp} thinking={think}", "messages": messages, "tools": tools,
                        "add_generation_prompt": agp, "extra": {} if think is None else {"enable_thinking": think}}
                if template_name == "deepseek-v3":
                    case["bos_token"] = "<｜begin▁of▁sentence｜>"
                    case["eos_token"] = "<｜end▁of▁sentence｜>"
                out.append(case)
    return out

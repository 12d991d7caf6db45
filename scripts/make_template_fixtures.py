#!/usr/bin/env python3
"""Render every chat-template test case with jinja2 configured like transformers (tests/py/chat_cases.py) and
store the results in tests/data/templates/expected.json for the C++-only test test_chat_template.
Usage: python3 scripts/make_template_fixtures.py  (needs build/testdata/tokenizers unpacked by CMake)"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "py"))
import chat_cases  # noqa: E402
import test_chat_template  # noqa: E402

test_chat_template.TOKDIR = os.path.join(ROOT, "build", "testdata", "tokenizers")
test_chat_template.DATA = os.path.join(ROOT, "tests", "data")
out = {"made_by": "scripts/make_template_fixtures.py", "oracle": "jinja2 " + __import__("jinja2").__version__, "templates": {}}
for name in ["glm4", "qwen3", "deepseek-v3", "features"]:
    src = test_chat_template.template_source(name)
    cases = test_chat_template.feature_cases() if name == "features" else chat_cases.cases_for(name)
    for c in cases:
        c["expected"] = chat_cases.render_reference(src, c)
    out["templates"][name] = cases
with open(os.path.join(ROOT, "tests", "data", "templates", "expected.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False, indent=0)
print("wrote", sum(len(v) for v in out["templates"].values()), "cases")

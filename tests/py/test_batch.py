"""`trellm batch`: an OpenAI Batch input file through the engine. Every line gets exactly one result line with its
custom_id; good requests get OpenAI response bodies whose usage adds up and whose greedy text is what the same
request gets alone (its own batch of one); bad lines get an error result naming what was wrong, and the rest run."""
import json

from conftest import trellm

CHAT = {"messages": [{"role": "user", "content": "Who is Mr. Darcy?"}], "max_tokens": 12, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False}}
COMP = {"prompt": "It is a truth universally acknowledged", "max_tokens": 10, "temperature": 0, "ignore_eos": True}


def run_batch(tmp_path, lines, name="in"):
    src, dst = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.out.jsonl"
    src.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    _, _, err = trellm("batch", "--device", "cpu", "--input", src, "--output", dst, "--max-seqs", 8)
    return [json.loads(l) for l in dst.read_text().splitlines()], err


def test_batch_results_and_errors(tmp_path):
    lines = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": CHAT},
        {"custom_id": "comp-1", "method": "POST", "url": "/v1/completions", "body": COMP},
        "{not json",
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": COMP},
        {"custom_id": "bad-field", "method": "POST", "url": "/v1/completions", "body": {**COMP, "logit_bias": {}}},
        {"custom_id": "chat-2", "method": "POST", "url": "/v1/chat/completions", "body": {**CHAT, "n": 2}},
    ]
    out, err = run_batch(tmp_path, lines)
    assert len(out) == len(lines), out
    assert "6/6" in err and "3 failed" in err, err
    by = {o["custom_id"]: o for o in out if o["custom_id"]}
    for cid in ("chat-1", "comp-1", "chat-2"):
        r = by[cid]["response"]
        assert r["status_code"] == 200 and by[cid]["error"] is None, by[cid]
        u = r["body"]["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
    assert by["comp-1"]["response"]["body"]["usage"]["completion_tokens"] == 10
    assert len(by["chat-2"]["response"]["body"]["choices"]) == 2
    c2 = by["chat-2"]["response"]["body"]["choices"]
    assert c2[0]["message"]["content"] == c2[1]["message"]["content"] == \
        by["chat-1"]["response"]["body"]["choices"][0]["message"]["content"], "greedy choices agree"
    assert by["bad-url"]["response"]["status_code"] == 400 and "/v1/embeddings" in by["bad-url"]["error"]["message"]
    assert "logit_bias" in by["bad-field"]["error"]["message"]
    bad_json = [o for o in out if not o["custom_id"]]
    assert len(bad_json) == 1 and "line 3" in bad_json[0]["error"]["message"]
    # The same completion alone gives the same text: batching changes nothing.
    alone, _ = run_batch(tmp_path, [lines[1]], "alone")
    assert alone[0]["response"]["body"]["choices"][0]["text"] == by["comp-1"]["response"]["body"]["choices"][0]["text"]

"""Text in, text out through the CLI: a copy of the tiny_a fixture with a small byte-level BPE tokenizer trained
here by HF `tokenizers` (the oracle). `trellm tokenize` must give HF's ids, `trellm run --prompt` must print
exactly HF's decoding of the ids it generated, and `--chat` must feed the model the template's rendering."""
import json
import os
import shutil
import tempfile

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import DATA, trellm

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "Grüße aus Zürich — naïve café, 12345 and 67.",
        "def f(x):\n    return x * 2\n", "日本語のテキスト 🙂 emoji"]


@pytest.fixture(scope="module")
def model_dir():
    d = tempfile.mkdtemp()
    src = os.path.join(DATA, "hf", "tiny_a")
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(os.path.join(src, f), d)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # 256 byte tokens + merges, inside tiny_a's vocabulary of 320; <|user|> etc. as special tokens after them.
    trainer = trainers.BpeTrainer(vocab_size=310, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.add_special_tokens(["<|user|>", "<|assistant|>"])
    assert tok.get_vocab_size() <= 320
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    yield d
    shutil.rmtree(d)


def test_tokenize_matches_hf(model_dir):
    hf = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    for text in TEXT:
        _, out, _ = trellm("tokenize", "--model", model_dir, "--ids-only", "--text", text)
        assert [int(t) for t in out.split()] == hf.encode(text).ids


def test_run_prompt_streams_hf_decoding(model_dir):
    hf = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    prompt = "The quick brown fox"
    _, ids_out, _ = trellm("run", "--model", model_dir, "--prompt", prompt, "--temperature", 0, "-n", 24,
                           "--ignore-eos", "--print-ids")
    ids = [int(t) for t in ids_out.split()]
    assert len(ids) == 24
    _, text_out, _ = trellm("run", "--model", model_dir, "--prompt", prompt, "--temperature", 0, "-n", 24,
                            "--ignore-eos")
    assert text_out == hf.decode(ids, skip_special_tokens=False) + "\n"
    # the prompt reached the model as HF's ids: same greedy continuation as --prompt-ids
    _, by_ids, _ = trellm("run", "--model", model_dir, "--prompt-ids", ",".join(map(str, hf.encode(prompt).ids)),
                          "--temperature", 0, "-n", 24, "--ignore-eos", "--print-ids")
    assert by_ids == ids_out


def test_chat_flag_uses_the_template(model_dir):
    hf = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    rendered = "<|user|>hello there<|assistant|>"
    _, a, _ = trellm("run", "--model", model_dir, "--prompt", "hello there", "--chat", "--temperature", 0, "-n", 8,
                     "--ignore-eos", "--print-ids")
    _, b, _ = trellm("run", "--model", model_dir, "--prompt-ids", ",".join(map(str, hf.encode(rendered).ids)),
                     "--temperature", 0, "-n", 8, "--ignore-eos", "--print-ids")
    assert a == b


def test_chat_repl(model_dir):
    import subprocess
    from conftest import BIN
    p = subprocess.run([BIN, "chat", "--model", model_dir, "--temperature", "0", "-n", "6", "--plain", "--ignore-eos"],
                       input="hello\n/reset\nsecond question\n/exit\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("> ") >= 3 and "(conversation cleared)" in p.stdout


def test_missing_tokenizer_is_a_clear_error():
    rc, _, err = trellm("run", "--model", os.path.join(DATA, "hf", "tiny_a"), "--prompt", "hi", check=False)
    assert rc == 1 and "tokenizer.json" in err

"""`llmctl export RUN --format hf OUT` on the session's finished run (tests/finished_run.py): the export loads
with transformers' AutoModelForCausalLM / AutoTokenizer (`trust_remote_code=True`, CPU, float32) and agrees
with our model, engine and tokenizer: logits within 1e-5 on a batch, greedy `generate` = our engine's greedy
tokens, the tokenizer's ids = ours on a mixed corpus, `apply_chat_template` = `render_conversation` token for
token; a sliding window shorter than the context (the finished run's is the whole 64) is checked on the run's
weights under a 6-token window; s3:// as OUT; bad input is one line, exit 2, nothing written.
The measured figures are printed (run with -s) and recorded in docs/benchmarks.md.
Run: .venv/bin/pytest tests/test_hf_export.py
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os

import pytest

CORPUS = [  # code, Unicode, emoji, whitespace, digits, contractions
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\tif x >= 10_000:\n\t\tpass\r\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C\n#include <stdio.h>",
    "Zürich, São Paulo, Kraków, Ελληνικά, русский язык, 日本語のテキスト, 中文, 한국어, עברית, العربية",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 math ∑∫√∞ ≠ ≤ box ┌─┐",
    "  multiple   spaces \n\n\n lines 12345 3.14159 1,000,000 2026-12-07T06:00:00Z",
    "it's we'll they've DON'T I'M you'd",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "",
    " ",
    "\u200b zero width, \u00a0 nbsp, \ufeff bom, combining e\u0301",
]
SPECIAL_TEXT = "before <|bos|><|user_start|>hi<|user_end|><|assistant_start|>x<|python_start|>1+1<|python_end|> after"
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 = ?"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                                    {"type": "python", "text": "2 + 2"},
                                                    {"type": "python_output", "text": "4"},
                                                    {"type": "text", "text": " It is 4."}]},
                  {"role": "user", "content": "thanks 😀 — très bien"},
                  {"role": "assistant", "content": "You're welcome!\n\n```py\nprint('hi')\n```"}]},
    {"messages": [{"role": "user", "content": "  spaces  and\ttabs\n"}, {"role": "assistant", "content": ""}]},
]


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory, one_torch_thread):
    """The finished run's SFT model exported by the CLI (in-process), with our model and tokenizer beside it."""
    from cli.main import main
    from trainer import run_loader

    out = str(tmp_path_factory.mktemp("hf") / "sft")
    assert main(["export", finished_run.urls["run"], "--format", "hf", out]) == 0
    ours = run_loader.load_run(finished_run.urls["run"], "sft", device="cpu")
    return out, ours


@pytest.fixture(scope="module")
def hf_model(exported):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(exported[0], trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported[0], trust_remote_code=True)  # it reads config.json (remote code)


def max_diff(ours, theirs, ids) -> float:
    import torch

    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


def test_hf_export_writes_the_files_and_standalone_remote_code(exported):
    out, ours = exported
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "configuration_llmctl.py",
                                       "generation_config.json", "model.safetensors", "modeling_llmctl.py",
                                       "tokenizer.json", "tokenizer_config.json"]
    config = json.loads(open(f"{out}/config.json").read())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llmctl.LlmctlForCausalLM"
    assert config["windows"] == list(ours.model.arch.windows) and config["llmctl"]["stage"] == "sft"
    sp = ours.tokenizer.special_tokens
    assert json.loads(open(f"{out}/generation_config.json").read())["eos_token_id"] == [
        sp["<|assistant_end|>"], sp["<|bos|>"]]
    for name in ("configuration_llmctl.py", "modeling_llmctl.py"):  # loadable where llmctl is not installed
        tree = ast.parse(open(f"{out}/{name}").read())
        roots = {(n.module or "").split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and not n.level}
        roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert roots <= {"torch", "transformers", "__future__"}, (name, roots)
    from safetensors.torch import load_file

    weights = load_file(f"{out}/model.safetensors")
    assert weights.keys() == ours.model.state_dict().keys()


def test_hf_export_logits_match_ours_within_1e_5(exported, hf_model):
    import torch
    from transformers import AutoModelForCausalLM

    out, ours = exported
    text = ours.tokenizer.encode_batch([c.strip() or "x" for c in CORPUS[:4]], prepend_bos=True)
    T = min(ours.model.arch.seq_len, min(len(t) for t in text))
    batch = torch.cat([torch.tensor([t[:T] for t in text]),
                       torch.randint(0, ours.tokenizer.vocab_size, (4, T), generator=torch.Generator().manual_seed(0))])
    sdpa = max_diff(ours.model, hf_model, batch)
    eager = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    eager_diff = max_diff(ours.model, eager, batch)
    print(f"\nhf export logits, batch {tuple(batch.shape)}: max |ours - transformers| sdpa {sdpa:.3g}, "
          f"eager {eager_diff:.3g}")
    assert sdpa <= 1e-5 and eager_diff <= 1e-5


def test_hf_export_greedy_generate_gives_our_engines_tokens(exported, hf_model, hf_tokenizer):
    import torch
    from trainer.serve.engine import Engine

    out, ours = exported
    agree = 0
    short = {"messages": [{"role": "user", "content": "Hi 😀"}, {"role": "assistant", "content": ""}]}
    for conv in (CONVERSATIONS[0], short):
        prompt = ours.tokenizer.render_for_completion(conv)
        ids = hf_tokenizer.apply_chat_template(conv["messages"][:-1], add_generation_prompt=True)["input_ids"]
        assert ids == prompt
        n = 24
        want = Engine.for_chat(ours.model, ours.tokenizer).generate_batch(prompt, max_tokens=n, temperature=0.0)[0]
        with torch.no_grad():  # eos from generation_config: <|assistant_end|> or <|bos|>, the engine's stop tokens
            got = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):]
        got = [t for t in got.tolist() if t not in hf_model.generation_config.eos_token_id]
        assert got == want, (got, want)
        agree += len(want)
    print(f"\nhf export greedy generate: {agree} tokens over 2 chat prompts, all equal to the engine's")


def test_hf_export_sliding_window_prefill_decode_and_left_padding(exported, tmp_path):
    """The finished run's weights under windows (6, 64): logits, greedy decoding with the cache (the smear
    reaching back across it), and a left-padded batch (no smear from padding, positions from the mask)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.hf_export.export import export_model
    from trainer.model import build_model
    from trainer.serve.engine import Engine

    _, ours = exported
    arch = dataclasses.replace(ours.model.arch, windows=(6, ours.model.arch.seq_len))
    model = build_model(arch, "cpu", compile=False)
    model.load_state_dict(ours.model.state_dict())
    model.eval()
    export_model(model, ours.tokenizer, str(tmp_path / "w6"), chat=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "w6"), trust_remote_code=True,
                                              dtype=torch.float32).eval()
    ids = torch.tensor([t[:40] for t in ours.tokenizer.encode_batch([CORPUS[0], CORPUS[6]], prepend_bos=True)])
    assert max_diff(model, hf, ids) <= 1e-5
    assert max_diff(model, hf, ids) != max_diff(ours.model, hf, ids)  # the window changed the logits
    a, b = ids[0, :12].tolist(), ids[1, :7].tolist()
    engine = Engine(model)
    want = [engine.generate_batch(p, max_tokens=30, temperature=0.0)[0] for p in (a, b)]
    pad = ours.tokenizer.bos_id
    batch = torch.tensor([a, [pad] * (len(a) - len(b)) + b])
    mask = torch.tensor([[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)])
    with torch.no_grad():
        got = hf.generate(batch, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert got[:, len(a):].tolist() == want


def test_hf_export_tokenizer_encodes_a_mixed_corpus_as_ours(exported, hf_tokenizer):
    out, ours = exported
    tok = ours.tokenizer
    total = same = 0
    for text in CORPUS:
        want = tok.encode(text)
        got = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        total += 1
        same += got == want
        assert got == want, text
        assert hf_tokenizer(text)["input_ids"] == tok.encode(text, prepend_bos=True)  # BOS first, as CORE feeds it
        assert hf_tokenizer.decode(got) == tok.decode(want)
    # special-token strings: special tokens for transformers (chat templates rely on it), text for our encode
    assert hf_tokenizer(SPECIAL_TEXT, add_special_tokens=False)["input_ids"] == tok.enc.encode(
        SPECIAL_TEXT, allowed_special="all")
    assert hf_tokenizer(SPECIAL_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode(
        SPECIAL_TEXT)
    for name, i in tok.special_tokens.items():
        assert hf_tokenizer.convert_tokens_to_ids(name) == i
    assert len(hf_tokenizer) == tok.vocab_size
    from transformers import PreTrainedTokenizerFast  # the tokenizer alone, without config.json

    plain = PreTrainedTokenizerFast.from_pretrained(out)
    assert [plain(t)["input_ids"] for t in CORPUS] == [tok.encode(t, prepend_bos=True) for t in CORPUS]
    n = sum(len(tok.encode(t)) for t in CORPUS)
    print(f"\nhf export tokenizer: {same}/{total} texts ({n} tokens) identical, 9/9 special tokens at our ids")


def test_hf_export_chat_template_renders_our_conversations(exported, hf_tokenizer):
    _, ours = exported
    for conv in CONVERSATIONS:
        want, _ = ours.tokenizer.render_conversation(conv)
        got = hf_tokenizer.apply_chat_template(conv["messages"])["input_ids"]
        assert got == want
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="alternate"):
        hf_tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_hf_export_to_s3(exported, finished_run, s3_server, monkeypatch):
    from cli.main import main

    local, _ = exported
    bucket = s3_server.bucket("hf")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    assert main(["export", finished_run.urls["run"], "--format", "hf", f"{bucket}/exports/sft"]) == 0
    fs = s3_server.fs()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket[5:]}/exports/sft"))
    assert names == sorted(os.listdir(local))
    digest = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    assert digest(fs.cat_file(f"{bucket[5:]}/exports/sft/model.safetensors")) == digest(
        open(f"{local}/model.safetensors", "rb").read())


def test_hf_export_bad_input_is_one_line_exit_2_and_writes_nothing(exported, finished_run, tmp_path, capsys):
    from cli.main import main

    run = finished_run.urls["run"]
    cases = [
        (["export", "no-such-run", "--storage", f"file://{tmp_path}", "--format", "hf", str(tmp_path / "a")],
         "not found"),
        (["export", run, "--format", "hf", "--stage", "rl", str(tmp_path / "b")], "invalid choice"),
        (["export", run, "--format", "onnx", str(tmp_path / "c")], "invalid choice"),
        (["export", run, str(tmp_path / "d")], "--format"),
        (["export", run, "--format", "hf", "--step", "999", str(tmp_path / "e")],
         "no whole sft checkpoint at step 999"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == [], "a refused export writes nothing"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert main(["export", run, "--format", "hf", str(taken)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert os.listdir(taken) == ["mine.txt"]
    assert main(["export", run, "--format", "hf", "--stage", "base", "--force", str(taken)]) == 0
    assert "config.json" in os.listdir(taken) and "mine.txt" not in os.listdir(taken)
    assert json.loads((taken / "generation_config.json").read_text())["eos_token_id"] == (
        exported[1].tokenizer.bos_id)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == [], "no staging directory left behind"

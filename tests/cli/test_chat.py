"""`llmctl chat` on a run made by the local pipeline: one-shot, interactive through a pipe and a pseudo-terminal,
history and /clear, s3:// storage, and the one-line errors (exit 2).

The run is the session's `finished_run` (tests/finished_run.py: pretraining, SFT and eval on a local Ray
cluster, built once per session).
Run: .venv/bin/pytest tests/cli/test_chat.py
"""

import argparse
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.hostile import plan_doc, refused, store_plan


LLMCTL = str(Path(sys.executable).parent / "llmctl")
PROMPT = "What does the json module do?"


@pytest.fixture(scope="module")
def run(finished_run):
    return finished_run


def llmctl(*args, env=None, stdin=None):
    return subprocess.run([LLMCTL, *args], capture_output=True, text=True, input=stdin, timeout=300,
                          env={**os.environ, **(env or {})})


def expected_reply(p, text, max_tokens=24):
    """The reply the engine gives in-process: the SFT checkpoint, SFT's rendering, greedy."""
    import torch

    from trainer import checkpoint
    from trainer.serve.engine import Engine
    from trainer.model import build_model
    from trainer.data.tokenizer import Tokenizer

    state, _ = checkpoint.load_model_state(checkpoint.latest(f"{p.urls['run']}/sft"))
    model = build_model(p.arch, "cpu")
    model.load_state_dict(state)
    tok = Tokenizer.load(p.urls["tokenizer"])
    ids = tok.render_for_completion({"messages": [{"role": "user", "content": text},
                                                  {"role": "assistant", "content": ""}]})
    with torch.no_grad():
        out = Engine.for_chat(model.eval(), tok).generate_batch(ids, max_tokens=max_tokens, temperature=0.0)[0]
    return tok.decode_text(out).strip()


def test_one_shot_prints_the_reply(run):
    r = llmctl("chat", run.urls["run"], "--prompt", PROMPT, "-t", "0", "-m", "24")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # off a terminal the loading spinner prints nothing
    assert r.stdout.strip() == expected_reply(run, PROMPT)
    assert r.stdout.strip(), "the run's chat model should say something"
    assert "<|" not in r.stdout  # special tokens are never printed raw
    # By name under --storage, and sampling at T > 0 with a seed is repeatable.
    root = run.urls["runs_root"][: -len("/runs")]
    a = llmctl("chat", run.name, "--storage", root, "-p", PROMPT, "-t", "0.8", "--seed", "5", "-m", "16")
    b = llmctl("chat", run.name, "--storage", root, "-p", PROMPT, "-t", "0.8", "--seed", "5", "-m", "16")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


def test_interactive_through_a_pipe(run):
    r = llmctl("chat", run.urls["run"], "-t", "0", "-m", "24", stdin=f"{PROMPT}\n/clear\n{PROMPT}\n/quit\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "/clear starts a new conversation" in out and "(conversation cleared)" in out
    replies = [part.split("\nyou> ", 1)[0].strip() for part in out.split("assistant> ")[1:]]
    # After /clear the same question is asked afresh: the same greedy reply as the one-shot command.
    assert replies == [expected_reply(run, PROMPT)] * 2


def test_interactive_in_a_pseudo_terminal(run):
    master, slave = pty.openpty()
    proc = subprocess.Popen([LLMCTL, "chat", run.urls["run"], "-t", "0", "-m", "12"], stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    buf = b""

    def read_until(marker: bytes, timeout=120.0) -> str:
        nonlocal buf
        deadline = time.monotonic() + timeout
        while marker not in buf:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {marker!r} within {timeout} s; got {buf!r}"
            buf += os.read(master, 4096)
        seen, buf = buf.split(marker, 1)
        return seen.decode(errors="replace")

    try:
        assert "loading " in read_until(b"you> ")  # the spinner while torch and the checkpoint load
        os.write(master, b"hello there\n")
        turn = read_until(b"you> ")
        assert "assistant> " in turn
        os.write(master, b"/bogus\n")
        assert "unknown command /bogus" in read_until(b"you> ")
        os.write(master, b"\x04")  # Ctrl-D at the start of a line: end of input
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_replies_stream_and_history_is_kept_and_trimmed(run):
    from cli.chat import Session

    args = argparse.Namespace(run=run.urls["run"], storage="file://~/.cache/llmctl", stage="sft", step=None,
                              temperature=0.0, top_k=50, max_tokens=8, seed=42, device="cpu")
    s = Session.open(args)

    class Recorder:  # what reaches the terminal, write by write
        writes: list = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    first = s.reply("hi", Recorder())
    pieces = [w for w in Recorder.writes if w.strip()]
    assert len(pieces) > 1 and "".join(Recorder.writes).strip() == first  # streamed, not printed at the end
    want = s.tokenizer.render_for_completion({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"}, {"role": "assistant", "content": ""}]})
    assert s.prompt_ids("and then?") == want
    # A context that cannot hold the history and a full reply drops the oldest turns first.
    s.args.max_tokens = run.arch.seq_len - len(s.prompt_ids("x" * 20)) + 1
    s.prompt_ids("x" * 20)
    assert s.history == []


def test_chat_from_s3(run, s3_server, tmp_path):
    bucket = s3_server.bucket("runs")
    fs = s3_server.fs()
    local = run.urls["run"][len("file://"):]
    fs.put(local, f"{bucket[5:]}/runs/{run.name}", recursive=True)
    # chat reads the tokenizer under the root it opened the run from, never at the URL plan.json names
    tok = run.urls["tokenizer"][len("file://"):]
    fs.put(tok, f"{bucket[5:]}/tokenizers/{Path(tok).name}", recursive=True)
    r = llmctl("chat", f"{bucket}/runs/{run.name}", "-p", PROMPT, "-t", "0", "-m", "24",
               env={"AWS_ENDPOINT_URL": s3_server.endpoint_url})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected_reply(run, PROMPT)


def test_errors_are_one_line_and_exit_2(run, tmp_path):
    missing = llmctl("chat", "no-such-run", "--storage", f"file://{tmp_path}", "-p", "hi")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr
    assert not (tmp_path / "runs").exists(), "a failed chat creates nothing"
    step = llmctl("chat", run.urls["run"], "--step", "999", "-p", "hi")
    assert step.returncode == 2 and step.stderr.count("\n") == 1
    assert "no whole sft checkpoint at step 999" in step.stderr
    # A run that only pretrained has no chat model: asking for one names the way out.
    # (runs copied to <root>/runs/<name>, with the tokenizer at <root>/tokenizers/<name>: the layout chat reads)
    root = tmp_path / "root"
    tok = Path(run.urls["tokenizer"][len("file://"):])
    shutil.copytree(tok, root / "tokenizers" / tok.name)
    base_only = root / "runs" / "base-only"
    base_only.mkdir(parents=True)
    local = Path(run.urls["run"][len("file://"):])
    doc = json.loads((local / "plan.json").read_text())
    doc["stages"] = [st for st in doc["stages"] if st["name"] != "sft"]
    (base_only / "plan.json").write_text(json.dumps(doc))
    shutil.copytree(local / "pretrain", base_only / "pretrain")
    wrong = llmctl("chat", str(base_only), "-p", "hi")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "--stage base" in wrong.stderr
    ok = llmctl("chat", str(base_only), "--stage", "base", "-p", "The capital of France is", "-t", "0", "-m", "8")
    assert ok.returncode == 0 and ok.stdout.strip()
    empty = root / "runs" / "no-ckpt"
    empty.mkdir()
    (empty / "plan.json").write_text((local / "plan.json").read_text())
    none = llmctl("chat", str(empty), "-p", "hi")
    assert none.returncode == 2 and "no whole sft checkpoint yet" in none.stderr
    bad = llmctl("chat", run.urls["run"], "-p", "hi", "--temperature", "-1")
    assert bad.returncode == 2 and "--temperature" in bad.stderr


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def test_hostile_chat_does_not_follow_a_tokenizer_url_out_of_the_storage_root(capsys, tmp_path):
    other = tmp_path / "elsewhere" / "tok"
    other.mkdir(parents=True)
    (other / "tokenizer.json").write_text(json.dumps({"format": "OTHER-FILE-MARKER"}))
    doc = plan_doc(tmp_path / "store")
    doc["urls"]["tokenizer"] = f"file://{other}"
    store_plan(tmp_path / "store", "evil", doc)
    err = refused(capsys, "chat", "evil", "--storage", f"file://{tmp_path}/store", "--prompt", "hi")
    assert "urls.tokenizer" in err and "OTHER-FILE-MARKER" not in err


def test_hostile_chat_rederives_the_tokenizer_under_the_root_it_opened(tmp_path):
    from trainer.plan.urls import rebase, storage_root_of

    doc = plan_doc(tmp_path / "old")
    root = storage_root_of(f"s3://new/prefix/runs/{doc['name']}")
    assert rebase(doc["urls"]["tokenizer"], doc["spec"]["storage_root"], root, "tokenizers", "t") \
        == "s3://new/prefix/tokenizers/sample-512"


def test_hostile_chat_checks_the_model_shape_before_allocating(capsys, tmp_path):
    doc = plan_doc(tmp_path)
    doc["arch"]["n_embd"] = 131072
    store_plan(tmp_path, "big", doc)
    err = refused(capsys, "chat", "big", "--storage", f"file://{tmp_path}", "--prompt", "hi")
    assert "arch.n_embd" in err


def test_hostile_chat_refuses_a_vocab_the_planner_cannot_make(capsys, tmp_path):
    doc = plan_doc(tmp_path)
    doc["arch"]["vocab_size"] = doc["arch"]["padded_vocab_size"] = 2**31
    store_plan(tmp_path, "big", doc)
    assert "arch.vocab_size" in refused(capsys, "chat", "big", "--storage", f"file://{tmp_path}", "--prompt", "hi")


@pytest.fixture(scope="module")
def tok():
    from trainer.data.tokenizer import Tokenizer

    words = [f"w{i} x{i % 7} the quick brown fox {i}" for i in range(300)]
    return Tokenizer.train(words, 300)


class _Args:
    max_tokens = 32


def _session(tok, seq_len: int):
    from cli.chat import Session

    s = Session.__new__(Session)
    s.args, s.tokenizer, s.chat, s.history = _Args(), tok, True, []
    s.plan = {"arch": {"seq_len": seq_len}}
    return s


@pytest.mark.parametrize("factor", [2, 20])
def test_hostile_chat_prompt_longer_than_the_context_is_one_line(tok, factor):
    from cli.errors import UsageError

    s = _session(tok, 64)
    with pytest.raises(UsageError, match="context"):
        s.prompt_ids("word " * 64 * factor)


def test_hostile_chat_reply_stops_at_the_context(tok):
    s = _session(tok, 64)
    ids = s.prompt_ids("hello there")
    assert s.reply_budget(ids) == _Args.max_tokens  # room for the whole reply
    s.args = type("A", (), {"max_tokens": 1000})()
    assert len(ids) + s.reply_budget(ids) == 64  # the reply is cut at the trained context

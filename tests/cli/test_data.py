"""`llmctl data prepare|sample` and `llmctl tokenizer train`: outputs in the reference layout, one-line errors
with exit 2 that create nothing, and no heavy imports when the CLI starts.

Run: .venv/bin/pytest tests/cli/test_data.py -v
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli.main import main as llmctl
from trainer.data.shards import list_shards
from tests.hostile import refused


def test_modules_import_nothing_heavy():
    code = ("import argparse, sys, cli.data, cli.tokenizer\n"
            "p = argparse.ArgumentParser(); s = p.add_subparsers()\n"
            "cli.data.register(s); cli.tokenizer.register(s)\n"
            "print([m for m in ('torch', 'pyarrow', 'tiktoken', 'datasets', 'rustbpe', 'fsspec') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sample_then_tokenizer_train_end_to_end(tmp_path, capsys):
    data, tok_url = tmp_path / "data", f"file://{tmp_path}/tok"
    assert llmctl(["data", "sample", "--out", str(data), "--mb", "0.4", "--shards", "3", "--row-group-size", "64"]) == 0
    shards = list_shards(str(data))
    assert len(shards) >= 2 and "wrote" in capsys.readouterr().out
    assert llmctl(["tokenizer", "train", "--data", str(data), "--vocab", "600", "--out", tok_url]) == 0
    out = capsys.readouterr().out
    assert "trained 600 ids" in out and "bytes/token" in out
    from trainer.data.tokenizer import Tokenizer

    assert Tokenizer.load(tok_url).vocab_size == 600
    # the output already holds data: refused, untouched
    before = sorted(p.stat().st_mtime_ns for p in data.iterdir())
    assert llmctl(["data", "sample", "--out", str(data), "--mb", "0.1"]) == 2
    assert "already holds data" in capsys.readouterr().err
    assert sorted(p.stat().st_mtime_ns for p in data.iterdir()) == before


def test_sample_sft(tmp_path, capsys):
    assert llmctl(["data", "sample", "--sft", "--out", str(tmp_path / "sft"), "--conversations", "50"]) == 0
    assert sorted(p.name for p in (tmp_path / "sft" / "val").iterdir()) == ["gsm8k.jsonl", "mmlu.jsonl", "smoltalk.jsonl"]
    assert "train:" in capsys.readouterr().out


def test_prepare_from_local_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(40)))
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"body": f"second {i}"}) + "\n" for i in range(40)))
    assert llmctl(["data", "prepare", "--source", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                   "--text-column", "body", "--shard-chars", "300", "--row-group-size", "8", "--max-docs", "70"]) == 0
    import pyarrow.parquet as pq

    texts = [t for s in list_shards(str(tmp_path / "out")) for t in pq.read_table(s).column("text").to_pylist()]
    assert texts == [f"document {i}" for i in range(40)] + [f"second {i}" for i in range(30)]
    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"whole file {i}\nwith two lines")
    assert llmctl(["data", "prepare", "--source", str(tmp_path / "txt"), "--out", str(tmp_path / "t")]) == 0
    texts = [t for s in list_shards(str(tmp_path / "t")) for t in pq.read_table(s).column("text").to_pylist()]
    assert texts == [f"whole file {i}\nwith two lines" for i in range(3)]


@pytest.mark.parametrize("argv, message", [
    (["data", "prepare", "--source", "{tmp}/missing.jsonl", "--out", "{tmp}/o"], "no such file or directory"),
    (["data", "prepare", "--source", "nobody-xyz/no-such-dataset", "--out", "{tmp}/o"], "Hub did not serve it"),
    (["data", "prepare", "--source", "{tmp}/in", "--out", "{tmp}/o", "--text-column", "nope"], "no 'nope' column"),
    (["data", "prepare", "--source", "{tmp}/in", "--out", "{tmp}/o", "--row-group-size", "0"], "must be >= 1"),
    (["data", "sample", "--out", "{tmp}/o", "--shards", "1"], "--shards >= 2"),
    (["tokenizer", "train", "--data", "{tmp}/in", "--out", "{tmp}/o", "--vocab", "100"], "--vocab must be >= 265"),
    (["tokenizer", "train", "--data", "{tmp}/nowhere", "--out", "{tmp}/o"], "no data at"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    assert llmctl([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_prepare_bad_layout_via_python_m_cli_main_is_one_line_exit_2(tmp_path):
    # `python -m cli.main` runs main.py as __main__; a command module importing cli.main loaded it a second time,
    # so its UsageError was another class and escaped as a traceback (exit 1).
    r = subprocess.run([sys.executable, "-m", "cli.main", "data", "prepare", "--source", "x", "--out",
                        str(tmp_path / "y"), "--shard-chars", "0"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["llmctl: error: --shard-chars, --row-group-size and --max-docs must be >= 1"]
    assert not (tmp_path / "y").exists()


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True, timeout=300)


def _cli_on_a_terminal(argv: list[str], timeout: float = 300.0) -> tuple[int, str]:
    """`python -m cli ARGV` with stdin/stdout/stderr on a pseudo-terminal: (exit code, all it wrote)."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cli", *argv], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed its side
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=60), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_progress_shows_on_a_terminal_and_output_stays_clean_off_one(tmp_path):
    """Progress on everything that takes more than a few seconds. On a terminal `data sample` and
    `data prepare` draw a bar and `tokenizer train` a bar for reading the text, then a spinner while rustbpe
    merges; captured (no terminal) each command prints a few plain lines: no escape codes, no traceback."""
    data, docs = tmp_path / "data", tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(300)))
    commands = [["data", "sample", "--out", str(data), "--mb", "0.4", "--shards", "3", "--row-group-size", "64"],
                ["tokenizer", "train", "--data", str(data), "--vocab", "600", "--out", str(tmp_path / "tok")],
                ["data", "prepare", "--source", str(docs), "--out", str(tmp_path / "shards"), "--shard-chars", "2000"]]
    for argv in commands:
        r = _cli(argv)
        text = r.stdout + r.stderr
        assert r.returncode == 0, text
        assert "Traceback" not in text and "\x1b" not in text and len(text.splitlines()) <= 10, (argv, text)
    code, seen = _cli_on_a_terminal(["tokenizer", "train", "--data", str(data), "--vocab", "600", "--out",
                                     str(tmp_path / "tok2")])
    assert code == 0, seen
    assert "reading train text" in seen and "BPE: merging up to 591 tokens" in seen and "trained 600 ids" in seen
    assert "Traceback" not in seen
    code, seen = _cli_on_a_terminal(["data", "prepare", "--source", str(docs), "--out", str(tmp_path / "more")])
    assert code == 0 and "writing shards" in seen and "Traceback" not in seen, seen


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def test_hostile_data_commands_refuse_credential_urls(capsys):
    err = refused(capsys, "data", "sample", "--out", "s3://k:v@bucket/data/sample")
    assert "k:v@" not in err

"""What the hostile-input tests share: the escape sequences a probe plants, running `llmctl` in-process and
expecting one refusal line, a stored plan.json written where a reader will find it, a child process with its
address space capped. The tests themselves live beside the modules they test (names contain `hostile`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli.main import main
from tests.finished_run import tiny_plan

ROOT = Path(__file__).resolve().parents[1]
ESC = "\x1b]0;pwned\x07\x1b[2J\x9b31m"
DRY = ("submit", "--depth", "12", "--gpus", "8", "--dry-run", "-o", "json", "--storage", "s3://bucket/llm")


@pytest.fixture
def no_cluster(tmp_path, monkeypatch):
    """No kubeconfig: a test that reached for a cluster fails instead of finding one."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


def llmctl(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err

def refused(capsys, *argv: str) -> str:
    """Run llmctl; it must refuse with one line on stderr (exit 2, no traceback). Returns that line."""
    rc, out, err = llmctl(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("llmctl: error: "), err
    return err

def store_plan(url_root: Path, name: str, doc: dict) -> Path:
    run = url_root / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.json").write_text(json.dumps(doc))
    return run

def plan_doc(root: Path, name: str = "evil", **over) -> dict:
    return json.loads(tiny_plan(f"file://{root}", name, **over).to_json())

def run_limited(code: str, mem_bytes: int = 3 << 30) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python with its address space capped: a bomb fails there, not on this machine."""
    pre = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({mem_bytes}, {mem_bytes}))\n"
    return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)

def no_controls(text: str) -> None:
    bad = [c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f]
    assert not bad, repr(text)

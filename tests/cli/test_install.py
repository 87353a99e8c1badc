"""`pip install llmctl` is the CLI alone (README, Installing): in a fresh virtual environment with the package and
its declared dependencies only (no extras), every command's --help works, and `cost` and `status --local` read a
run stored on local disk.

The llmctl wheel is built from this checkout; its dependencies come from a wheel cache kept between runs
(~/.cache/llmctl/cli-only-wheels, filled from PyPI by `pip download` the first time, or when the dependencies
change), so a warm run installs offline. The venv is made without pip (the test's own pip installs into it).

Run: .venv/bin/pytest tests/cli/test_install.py -v
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmctl" / "cli-only-wheels"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
# Without PYTHONPATH: a checkout on it (with the llmctl.egg-info a build leaves) reads as llmctl installed already.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def cli_only(tmp_path_factory) -> Path:
    """The bin/ of a fresh venv holding llmctl and its declared dependencies only."""
    tmp = tmp_path_factory.mktemp("cli-only")
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp / "dist")],
                   check=True, cwd=tmp, env=ENV)
    (wheel,) = (tmp / "dist").glob("llmctl-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    python = tmp / "venv" / "bin" / "python"
    install = [*PIP, "--python", str(python), "install", "--no-index", "--find-links", str(CACHE), str(wheel)]
    if subprocess.run(install, cwd=tmp, env=ENV, capture_output=True).returncode != 0:  # a cold cache, or new dependencies
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([*PIP, "download", "--only-binary=:all:", "-d", str(CACHE), str(wheel)], check=True, cwd=tmp,
                       env=ENV)
        (CACHE / wheel.name).unlink()  # the cache holds dependencies only
        subprocess.run(install, check=True, cwd=tmp, env=ENV)
    return python.parent


def llmctl(bin_dir: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(ENV)
    env["KUBECONFIG"] = str(cwd / "absent")  # no cluster
    return subprocess.run([str(bin_dir / "llmctl"), *argv], capture_output=True, text=True, cwd=cwd, env=env)


def test_deps_the_cli_alone_runs_every_help_and_reads_a_stored_run(cli_only, tmp_path):
    found = llmctl(cli_only, "--help", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    code = ("import cli.main; print(' '.join(cli.main.OWNERS)); "
            "import sys; assert not {'torch', 'ray', 'trainer.model'} & set(sys.modules)")
    words = subprocess.run([str(cli_only / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env=ENV, check=True).stdout.split()
    assert len(words) >= 14, words
    for word in words:
        res = llmctl(cli_only, word, "--help", cwd=tmp_path)
        assert res.returncode == 0 and "usage: llmctl " + word in res.stdout, (word, res.stderr)

    # a stored run, as `submit --local` leaves one (plan, spend ledger, progress)
    run = tmp_path / "store" / "runs" / "r"
    run.mkdir(parents=True)
    (run / "plan.json").write_text(json.dumps({"name": "r", "stages": [{"name": "pretrain"}],
                                               "spec": {"gpus": 2, "gpu_type": "cpu"},
                                               "estimate": {"total_dollars": 1.5, "total_hours": 0.1}}))
    (run / "progress.json").write_text(json.dumps({"stage": "pretrain", "step": 20, "steps": 40, "kept_seconds": 30}))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    (run / "spend.json").write_text(json.dumps({"run": "r", "price_per_gpu_hour": 3600.0, "attempts": [
        {"start": now, "last": now, "gpus": 2, "seconds": 20, "state": "running"}]}))
    res = llmctl(cli_only, "cost", "--storage", str(tmp_path / "store"), "-o", "json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total"]["dollars"] == pytest.approx(2 * 20)
    res = llmctl(cli_only, "status", "r", "--local", "--storage", str(tmp_path / "store"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "pretrain step 20 / 40 (50%)" in res.stdout and "estimate $1.50" in res.stdout

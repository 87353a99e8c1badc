"""cli/local.py: the local run as a newcomer sees it. The console of a real local run (the tiny spec through
`run_plan_local`, the code path `llmctl submit --local` takes after planning and building its inputs):
one bar per stage, the report card's summary and the next commands; no line of Ray's own (worker prefixes,
Ray Train's controller, placement-group and dedup notices), those kept in the Ray log directory it prints;
a bounded number of lines. And the presets.

Run: .venv/bin/pytest tests/test_local.py
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from cli.local import PRESETS, local_spec

ROOT = Path(__file__).resolve().parent.parent
# Lines only Ray prints: worker/actor prefixes "(RayTrainWorker pid=…)", Ray Train's result dicts, its
# controller and placement-group notices, log deduplication, the auth and usage-stats notices, log records.
RAY_LINE = re.compile(r"pid=\d+|Reporting training result|PlacementGroup|TrainController|RayTrainWorker|"
                      r"repeated \d+x across cluster|RAY_DEDUP|Token authentication|[Uu]sage stats|"
                      r"^\S*(INFO|WARNING|DEBUG) |\[Ray|ray\.train|ray\._private|Started a local Ray instance")
MAX_LINES = 20  # bars 3, the log path 1, the card ~9, where and next 2 — plus slack, far below Ray's hundreds


def test_console_of_a_local_run_is_ours_alone(finished_run):
    """The session's finished run went through `run_plan_local` in a child process (tests/finished_run.py)."""
    from tests.finished_run import finished_console

    console = Path(finished_console(finished_run)).read_text().splitlines()
    leaked = [line for line in console if RAY_LINE.search(line)]
    assert not leaked, f"Ray's own lines reached the console: {leaked[:5]}"
    assert len(console) <= MAX_LINES, "\n".join(console)
    text = "\n".join(console)
    for stage, steps in (("pretrain", 30), ("sft", 6), ("eval", 2)):
        bar = next((line for line in console if line.startswith(stage)), "")
        assert f"{steps}/{steps}" in bar, (stage, bar)
    assert "val bpb" in text and "tok/s" in text and "loss" in text
    assert "unigram model of the same tokens" in text and "CORE" in text and "<|" not in text
    assert "next: llmctl report finished" in text and "llmctl chat finished" in text
    # Ray's lines went to the log directory it printed: the workers' own progress lines are there.
    logs = Path(re.search(r"Ray's own logs \(.*\): (\S+)", text).group(1))
    worker_out = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.out"))
    assert "[pretrain] step 30/30" in worker_out


def test_presets():
    quick = local_spec(argparse.Namespace(storage="file:///tmp/x", preset=None, steps=None, name=None))
    demo = local_spec(argparse.Namespace(storage="file:///tmp/x", preset="demo", steps=None, name=None))
    assert quick.depth == 2 and quick.num_iterations == 200 and quick.dataset == "sample"
    assert demo.depth == 4 and demo.dataset == "sample-demo" and demo.tokenizer == "sample-demo-4096"
    assert demo.num_iterations * demo.total_batch_size >= 5 * quick.num_iterations * quick.total_batch_size
    assert set(PRESETS) == {"quick", "demo"}
    r = subprocess.run([sys.executable, "-m", "cli", "submit", "--local", "--preset", "nope"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr

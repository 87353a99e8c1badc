"""bench/gpu_check.sh end to end in its --quick mode: the same code paths as on the GPU, tiny, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_quick_runs_every_row_and_writes_the_table(tmp_path):
    assert os.access(os.path.join(ROOT, "bench", "gpu_check.sh"), os.X_OK)
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--quick"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split("  ")[0].strip() for line in r.stdout.splitlines()}
    assert {"decode d2", "train d2 bf16", "train d2 fp8", "dist 2 ranks"} <= rows, r.stdout
    assert "FAILED" not in r.stdout and "summary: d2 fp8/bf16 tokens/s" in r.stdout
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    results = {x["name"]: x for x in data["results"]}
    assert all(x["error"] is None for x in results.values())
    fp8 = results["train d2 fp8"]["result"]
    bf16 = results["train d2 bf16"]["result"]
    assert fp8["fp8_layers"] == 13 and bf16["fp8_layers"] == 0  # 6 per layer x 2 + lm_head
    assert fp8["last_loss"] < fp8["first_loss"] and bf16["last_loss"] < bf16["first_loss"]
    assert bf16["tokens_per_s"] > 0 and bf16["mfu"] > 0 and bf16["predicted"]["peak"] > 0
    assert results["dist 2 ranks"]["result"]["same_weights"] is True
    assert results["decode d2"]["result"]["tokens_per_s"] > 0
    assert (tmp_path / "gpu_check.txt").read_text().count("\n") >= 6


def test_gpu_check_reports_a_failing_row_and_goes_on(tmp_path):
    """One row that cannot finish in its time costs that row only: the table still comes out."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--quick", "--only", "decode d2,dist 2 ranks",
                        "--budget", "21", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("decode d2", "dist 2 ranks"))]
    assert len(lines) == 2, r.stdout
    assert any("FAILED" in ln for ln in lines), r.stdout
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(data["results"]) == 2 and any(x["error"] for x in data["results"])

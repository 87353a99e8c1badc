"""The benchmarks' process-tree CPU readings (bench/ray_overhead.py TreeCPU, bench/ray_idle.py ray_cpu_seconds)
go through psutil, which the test extra declares (two hand-written /proc parsers once did this, and psutil
used by nobody that declared it).

Run: .venv/bin/pytest tests/test_bench.py -v
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)\n"


def test_deps_psutil_is_declared_and_the_benchmarks_read_no_proc_by_hand():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("psutil") for d in extras["test"]), "bench/ imports psutil: declare it in the test extra"
    for name in ("ray_overhead.py", "ray_idle.py"):
        text = (ROOT / "bench" / name).read_text()
        assert "import psutil" in text and 'open(f"/proc' not in text, name


def test_deps_both_samplers_see_a_busy_grandchild():
    import ray_idle
    import ray_overhead

    # a shell that starts the busy process: its CPU shows under the shell, a grandchild of this test
    child = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "$0"; :', BUSY])
    try:
        tree = ray_overhead.TreeCPU(period=0.1, rescan=0.1)
        deadline, busy = time.time() + 20, 0.0
        while busy < 0.55 and time.time() < deadline:  # the busy loop is done at 0.6 s of CPU
            time.sleep(0.2)
            found = ray_idle.ray_cpu_seconds(os.getpid())
            busy = max((cpu for name, cpu in found.values() if name.startswith("python")), default=0.0)
        assert busy >= 0.55, found
        time.sleep(0.3)
        tree.stop()
        assert tree.samples[-1][2] > 0.3, tree.samples[-1]  # launcher (non-worker) CPU seconds since start
        assert set(tree.name.values()) >= {"sh"}
    finally:
        child.kill()
        child.wait()

"""Start-up time of `llmctl --help` and `llmctl plan` relative to `python -c pass`, measured in one run.

The CLI must start fast (README, "the CLI imports neither torch nor ray on start-up"): nothing heavy is imported before a command needs it. Goal <= 3x.
Each command runs N times, interleaved so machine noise hits all three alike; medians are compared. Wall time
and the child's CPU time (user + system) are both reported: on a loaded machine the wall clock includes waiting
for a core, and the CPU ratio is the steadier of the two.

Run: .venv/bin/python bench/cli_startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    llmctl = str(Path(sys.executable).parent / "llmctl")
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "llmctl --help": [llmctl, "--help"],
        "llmctl plan --depth 26 --gpus 8": [llmctl, "plan", "--depth", "26", "--gpus", "8"],
        "llmctl plan ... -o json": [llmctl, "plan", "--depth", "26", "--gpus", "8", "-o", "json"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.runs):
        for name, cmd in cases.items():
            c0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - t0)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
    base, cpu_base = statistics.median(times["python -c pass"]), statistics.median(cpu["python -c pass"])
    print(f"{'command':36s} {'wall ms':>8s} {'ratio':>7s} {'CPU ms':>8s} {'ratio':>7s}")
    for name, ts in times.items():
        med, cmed = statistics.median(ts), statistics.median(cpu[name])
        print(f"{name:36s} {med * 1e3:8.1f} {med / base:6.2f}x {cmed * 1e3:8.1f} {cmed / cpu_base:6.2f}x")


if __name__ == "__main__":
    main()

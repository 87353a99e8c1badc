"""Start-up time of `llmctl --help` and `llmctl plan` relative to `python -c pass`, measured in one run.

The CLI must start fast (README, "the CLI imports neither torch nor ray on start-up"): nothing heavy is imported before a command needs it. Goal <= 3x.
Each command runs N times, interleaved so machine noise hits all three alike; medians are compared.

Run: .venv/bin/python bench/cli_startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
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
    for _ in range(args.runs):
        for name, cmd in cases.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    print(f"{'command':36s} {'median ms':>10s} {'ratio':>7s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:36s} {med * 1e3:10.1f} {med / base:7.2f}x")


if __name__ == "__main__":
    main()

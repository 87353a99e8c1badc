"""Time lost per preemption against the checkpoint interval, on a local Ray cluster — one run per interval.

    .venv/bin/python bench/preemption.py [--every 2 5 10] [--kill-at 12] [--steps 20] [--resize]

For each checkpoint interval (steps), the tests' tiny model (tests/finished_run.py TINY) pretrains on 2 CPU
workers (gloo) and loses worker 1 at the start of step `--kill-at` (the loop's fault injection: the process
exits, as a reclaimed spot node's pod does). Ray Train restarts the worker group (with `--resize`: the second
attempt runs on 1 worker, the checkpoint re-sharded, trainer/reshard.py) and the run resumes from the last
checkpoint. From the loop's data trace (one stamp per step and rank as the step begins):
- restart = first stamp after the kill - last stamp before it (detecting the loss, tearing down, starting
  workers, restoring the checkpoint, the first fetch);
- redone = kill step - last checkpoint step (steps trained twice), costed at the median step gap before the kill;
- lost = restart + redone x step time, also in steps.
Expectation (docs/recipe.md, spot): lost ~ restart + interval / 2 on average; here the kill step is fixed, so
redone = kill_at mod every. The load average is printed: the machine is shared, compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

from tests.finished_run import TINY  # noqa: E402
from trainer.plan import RunSpec, plan  # noqa: E402


def one(root: str, every: int, args) -> dict:
    import ray

    from trainer.launch import run

    p = plan(RunSpec(storage_root=root, name=f"preempt-e{every}-{int(time.time())}",
                     **{**TINY, "stages": ("pretrain",), "num_iterations": args.steps, "checkpoint_every": every,
                        "eval_every": args.steps}))
    trace = os.path.join(tempfile.mkdtemp(prefix="preempt-"), "trace.jsonl")
    chaos = {"kill_at_step": args.kill_at, "rank": 1, "marker": trace + ".killed"}
    ray.shutdown()  # a fresh local cluster per interval (ensure_inputs may have left one connected)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        if args.resize:
            try:
                run(p, storage_options={}, checkpoint_upload="sync", trace=trace, chaos=chaos, max_failures=0)
            except Exception:  # noqa: BLE001 - the lost group: resume on 1 worker
                pass
            run(p, storage_options={}, checkpoint_upload="sync", trace=trace, workers=1)
        else:
            run(p, storage_options={}, checkpoint_upload="sync", trace=trace, chaos=chaos, max_failures=1)
    finally:
        ray.shutdown()
    stamps = sorted((json.loads(line) for line in open(trace)), key=lambda s: s["t"])
    cut = next(i for i in range(1, len(stamps)) if stamps[i]["step"] < stamps[i - 1]["step"])  # the restart
    before, after = stamps[:cut], stamps[cut:]
    t_kill = before[-1]["t"]
    per_step = {}
    for s in before:
        per_step.setdefault(s["step"], []).append(s["t"])
    times = [statistics.mean(per_step[k]) for k in sorted(per_step)]
    gaps = [b - a for a, b in zip(times[1:], times[2:])]  # step 0's gap holds the step-0 val pass
    step = statistics.median(gaps)
    restart = min(s["t"] for s in after) - t_kill
    redone = args.kill_at - (args.kill_at // every) * every
    lost = restart + redone * step
    return {"every": every, "step_s": step, "restart_s": restart, "redone": redone, "lost_s": lost,
            "lost_steps": lost / step, "first_step_after": min(s["step"] for s in after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, nargs="+", default=[2, 5, 10], help="checkpoint intervals (steps)")
    ap.add_argument("--kill-at", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resize", action="store_true", help="resume on 1 worker instead of 2 (re-sharded)")
    args = ap.parse_args()
    from cli.local import ensure_inputs

    root = f"file://{tempfile.mkdtemp(prefix='preempt-root-')}"
    ensure_inputs(plan(RunSpec(storage_root=root, **TINY)), mb=0.5, conversations=300, say=lambda *_: None)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; kill at step {args.kill_at}, "
          f"{'resume on 1 worker' if args.resize else 'restart on 2 workers'}")
    print(f"{'every':>5} {'step s':>7} {'restart s':>9} {'redone':>6} {'lost s':>7} {'lost steps':>10}")
    for every in args.every:
        r = one(root, every, args)
        print(f"{r['every']:>5} {r['step_s']:>7.3f} {r['restart_s']:>9.2f} {r['redone']:>6} {r['lost_s']:>7.2f} "
              f"{r['lost_steps']:>10.1f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

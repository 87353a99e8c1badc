"""What an idle local Ray cluster costs in CPU, default vs lean (trainer/launch.py `LocalRay`) — one run.

    .venv/bin/python bench/ray_idle.py [--actors 6] [--seconds 20] [--rounds 2]

Each round starts, in a child process of its own, a head node the way `LocalRay` does (no dashboard, no log
monitor, no autoscaler monitor), once with Ray's default system config and once with `LEAN_SYSTEM_CONFIG` and
`LEAN_ENV`; creates `--actors` idle actors (a Ray Train run holds about that many: controller, workers,
placement-group cleaner, preemption watcher, ...); then reads the CPU seconds of every Ray process (psutil)
over `--seconds`. Prints cores used by each configuration and the ratio default / lean, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ray_cpu_seconds(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (process name, user+system CPU seconds) of every descendant of `root` (the cluster this child
    started: GCS, raylet, agents, actors), not `root` itself and not other Ray instances on the machine."""
    import psutil

    try:
        below = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in below:
        try:
            with p.oneshot():
                cmd, cpu = " ".join(p.cmdline()), p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        name = cmd.split()[0] if cmd.startswith("ray::") else os.path.basename(cmd.split()[0] if cmd else "?")
        out[p.pid] = (name, cpu.user + cpu.system)
    return out


def child(lean: bool, actors: int, seconds: float) -> None:
    import ray
    from ray._private.authentication.authentication_token_setup import (enable_token_auth_by_default,
                                                                        ensure_token_if_auth_enabled)
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    from trainer.launch import LEAN_ENV, LEAN_SYSTEM_CONFIG

    config = dict(LEAN_SYSTEM_CONFIG) if lean else {}
    if lean:
        os.environ.update(LEAN_ENV)
    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(config, create_token_if_missing=True)
    node = Node(RayParams(num_cpus=2, include_dashboard=False, include_log_monitor=False, no_monitor=True,
                          _system_config=config), head=True, shutdown_at_exit=False, spawn_reaper=True,
                ray_init_cluster=True)
    ray.init(address=node.address, log_to_driver=False, configure_logging=False)

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self) -> int:
            return 1

    handles = [Idle.remote() for _ in range(actors)]
    ray.get([h.ping.remote() for h in handles])
    time.sleep(3)  # let start-up work finish: only the steady idle state is measured
    before, t0 = ray_cpu_seconds(os.getpid()), time.monotonic()
    time.sleep(seconds)
    after, dt = ray_cpu_seconds(os.getpid()), time.monotonic() - t0
    cores: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        if pid in before:
            cores[name] = cores.get(name, 0.0) + (cpu - before[pid][1]) / dt
    print(json.dumps({"total": sum(cores.values()), "by_name": cores}))
    ray.shutdown()
    node.kill_all_processes(check_alive=False, allow_graceful=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["default", "lean"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child == "lean", args.actors, args.seconds)
        return
    results: dict[str, list[float]] = {"default": [], "lean": []}
    for r in range(args.rounds):
        for kind in (("default", "lean") if r % 2 == 0 else ("lean", "default")):  # alternate who goes first
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--actors", str(args.actors),
                                  "--seconds", str(args.seconds)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[kind].append(row["total"])
            top = sorted(row["by_name"].items(), key=lambda kv: -kv[1])[:4]
            print(f"  {kind:7s} {row['total']:.3f} cores  load {load:.1f}  "
                  + ", ".join(f"{n} {c:.3f}" for n, c in top))
    d, l = statistics.median(results["default"]), statistics.median(results["lean"])
    print(f"idle Ray, {args.actors} actors: default {d:.3f} cores, lean {l:.3f} cores; default / lean {d / l:.2f}x")


if __name__ == "__main__":
    main()

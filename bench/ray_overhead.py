"""Ray Train's cost over torchrun on the same training loop, and the stall a checkpoint causes — one run.

    .venv/bin/python bench/ray_overhead.py [--pairs 4] [--steps 50] [--every 10] [--config local|tiny] [--storage file|s3]

The loop is `trainer.loop.train_loop` itself, with one plan and one config, on two launchers:
- **Ray**: `trainer.launch.run(plan)`, i.e. `TorchTrainer(train_loop)` with 2 CPU workers and gloo, on a
  local Ray cluster started for that run alone (`ray.init` is timed apart), so that Ray's daemons are not
  running while torchrun is measured;
- **torchrun**: `torchrun --nproc_per_node 2 bench/ray_overhead.py --worker <config>`; each process runs
  `TorchTrainer(train_loop, ScalingConfig(num_workers=0))`, Ray Train's local mode, which takes rank, world
  size and the gloo process group from torchrun's environment and calls train_loop in-process (no Ray
  cluster; `ray.train.report` keeps a checkpoint where it was written instead of uploading it).
Both give each worker one torch thread (Ray: OMP_NUM_THREADS=1 for a 1-CPU actor; torchrun: its default).

Step times come from the loop's data trace: one record per step and rank, stamped as the step begins, so the
gap between two records is one whole iteration (compute, gradient all-reduce, logging, any checkpoint save,
and the next fetch); the ranks' stamps are averaged. The first `--warmup` steps are dropped. A sampler
reads (psutil) the CPU seconds of every process the run starts: the training workers, and the launcher's
own (Ray: GCS, raylet, agents, Train controller; torchrun: its agent), over the same steady-state steps.
1. per-step ratio, Ray / torchrun: median gap of each run, with checkpoints only at the end (outside the
   timed steps); pairs alternate which launcher goes first; the median ratio over pairs and its spread
   (goal <= 1.03; Ray's own parity benchmark, docs.ray.io "Pytorch Training Parity": +0.9-2.3%). Less sensitive to a busy machine: the
   ratio of worker CPU seconds per step, and the cores the launcher's processes use while training (on 2
   cores that both workers need, that share is taken from training). Setup (launch to the first step,
   which includes the step-0 val pass) and teardown (last step, final val pass and save, exit) apart.
2. checkpoint stall: a Ray run saving every `--every` steps with ASYNC upload (the loop's default). Stall of
   one checkpoint = the gaps from the one holding the save through the next `--window - 1` (the upload runs
   in the background there) minus as many clean-step medians, in steps (goal <= 1 step). For reference, the
   same with SYNC upload and under torchrun (a local save, no upload). Keep checkpoints >= ~2 s apart, as
   in real runs (minutes): Ray Train's controller takes one report per worker per poll, every 2 s
   (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report sooner than that waits for the previous one (the
   training thread under SYNC, the upload thread under ASYNC); the script warns when the cadence is shorter.

Checkpoints land in `--storage`: local files, or S3 (moto's server in its own process on loopback, through
s3fs; uploads cost CPU on this machine, as a real object store's client does; the server's own CPU is not
counted as the launcher's). The load average is printed with every run: on a shared machine, compare
figures only from one quiet run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

from tests.finished_run import TINY as TESTS_TINY  # noqa: E402
from trainer.plan import RunSpec, plan  # noqa: E402

WORKERS = 2
RAY_TMP = os.path.join(tempfile.gettempdir(), "ray")
LEAN = True  # --plain-ray: ray.init's own cluster (log monitor and autoscaler monitor included) instead  # Ray's default session root, before TMPDIR moves
POLL_S = 2.0  # ray.train.v2 DEFAULT_HEALTH_CHECK_INTERVAL_S: how often the controller collects reports
# The tests' tiny model (tests/finished_run.py TINY), on the local run's other settings.
TINY = {k: TESTS_TINY[k] for k in ("depth", "vocab_size", "seq_len", "head_dim", "device_batch_size")}


def spec(args, name: str, root: str, every: int) -> RunSpec:
    """The embedded default (cli/local.py LOCAL) or the tests' tiny model, for `--steps` steps, with val
    passes only at the first and last step and checkpoints every `every` steps (and at the last)."""
    from cli.local import LOCAL

    fields = {**LOCAL, **(TINY if args.config == "tiny" else {})}
    fields["total_batch_size"] = WORKERS * fields["device_batch_size"] * fields["seq_len"]
    fields["eval_tokens"] = fields["total_batch_size"]
    fields.update(num_iterations=args.steps, eval_every=args.steps, checkpoint_every=every, gpus=WORKERS,
                  gpu_type="cpu", keep_checkpoints=2)
    return RunSpec(storage_root=root, name=name, dataset="sample", sft_dataset="sample-sft",
                   tokenizer=f"sample-{fields['vocab_size']}", stages=("pretrain",), **fields)


# ------------------------------------------------------------------ the two launchers


def launch_ray(p, opts, trace: str, upload: str, work: str) -> dict:
    """A local Ray cluster started for this run only (so its daemons do not run during torchrun's runs)."""
    import ray

    from trainer.launch import LocalRay, run

    t0 = time.time()
    if LEAN:  # what `llmctl submit --local` starts: no dashboard, log monitor or autoscaler monitor
        cluster = LocalRay(verbose=False, num_cpus=WORKERS)
    else:
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, _temp_dir=RAY_TMP)
    t1 = time.time()
    try:
        summary = run(p, storage_options=opts, log_every=10**6, checkpoint_upload=upload, trace=trace,
                      metrics_port_base=None, max_failures=0)
    finally:
        end = time.time()
        cluster.stop() if LEAN else ray.shutdown()
    assert summary["status"] == "completed", summary
    return {"init": t1 - t0, "start": t1, "end": end}


def launch_torchrun(p, opts, trace: str, upload: str, work: str) -> dict:
    import fsspec

    from trainer.launch import write_plan

    write_plan(p, opts)  # as run() does; the loop writes the stage summary beside it
    fs, root = fsspec.core.url_to_fs(f"{p.urls['run']}/pretrain", **opts)
    fs.makedirs(root, exist_ok=True)
    # The same keys trainer.launch.run gives each stage.
    config = {"plan": p.to_json(), "stage": "pretrain", "storage_options": opts, "log_every": 10**6,
              "metrics_port_base": None, "checkpoint_upload": upload, "trace": trace, "chaos": None}
    path = os.path.join(work, f"{p.name}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(WORKERS), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), os.path.abspath(__file__), "--worker", path]
    log = os.path.join(work, f"{p.name}.log")
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    end = time.time()
    if rc:
        with open(log) as f:
            raise SystemExit(f"torchrun exited with {rc}:\n{f.read()[-4000:]}")
    return {"start": t0, "end": end}


def worker(config_path: str) -> None:
    """One torchrun process: train_loop under Ray Train's local mode (ranks from torchrun's environment)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.loop import train_loop

    with open(config_path) as f:
        config = json.load(f)
    TorchTrainer(train_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                 run_config=RunConfig(name="bench-torchrun", storage_path=os.path.dirname(config_path))).fit()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ reading the trace


def stamps(trace: str) -> dict[int, float]:
    """{step: when it began}, the mean over ranks (they move in lockstep: every step ends in an all-reduce)."""
    t: dict[int, dict[int, float]] = {}
    with open(trace) as f:
        for line in f:
            r = json.loads(line)
            t.setdefault(r["rank"], {})[r["step"]] = r["t"]
    ranks = list(t.values())
    steps = sorted(set.intersection(*(set(r) for r in ranks)))
    return {s: statistics.fmean(r[s] for r in ranks) for s in steps}


class TreeCPU:
    """CPU seconds of every process below this one, sampled in a thread: the training workers apart from the
    launcher's own processes (Ray: GCS, raylet, agents, the Train controller; torchrun: its agent). Reads
    them with psutil; a process's last reading stands after it exits; processes that were already running
    count only what they use from now on."""

    def __init__(self, exclude=(), period: float = 0.2, rescan: float = 1.0):
        self.exclude, self.period, self.rescan = set(exclude), period, rescan
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.worker: dict[int, bool] = {}
        self.name: dict[int, str] = {}
        self.procs: dict = {}  # pid -> psutil.Process (kept: it notices a pid reused by another process)
        self.names: list[dict[str, float]] = []  # launcher CPU seconds by process name, per sample
        self.samples: list[tuple[float, float, float]] = []  # (time, worker CPU s, launcher CPU s)
        self._stop = threading.Event()
        self._scan()
        self.base = dict(self.last)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        import psutil

        for top in psutil.Process().children():
            if top.pid in self.exclude:
                continue
            try:
                tree = [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in tree:
                if p.pid in self.procs:
                    continue
                try:
                    cmd = " ".join(p.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.procs[p.pid] = p
                self.worker[p.pid] = "RayTrainWorker" in cmd or ("--worker" in cmd and "bin/torchrun" not in cmd)
                self.name[p.pid] = short_name(cmd)
                self._read(p.pid)

    def _read(self, pid: int) -> None:
        import psutil

        try:
            t = self.procs[pid].cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return  # exited: its last reading stands
        self.last[pid] = t.user + t.system

    def _run(self) -> None:
        scanned = time.time()
        while not self._stop.wait(self.period):
            if time.time() - scanned > self.rescan:
                self._scan()
                scanned = time.time()
            for pid in list(self.worker):
                self._read(pid)
            self.sample()

    def sample(self) -> None:
        use = {pid: self.last.get(pid, 0.0) - self.base.get(pid, 0.0) for pid in self.worker}
        names: dict[str, float] = {}
        for pid, v in use.items():
            if not self.worker[pid]:
                names[self.name[pid]] = names.get(self.name[pid], 0.0) + v
        self.samples.append((time.time(), sum(v for p, v in use.items() if self.worker[p]),
                             sum(v for p, v in use.items() if not self.worker[p])))
        self.names.append(names)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def launcher_by_name(self, t0: float, t1: float) -> dict[str, float]:
        """Cores each kind of launcher process used between the samples nearest t0 and t1."""
        i, j = (min(range(len(self.samples)), key=lambda k: abs(self.samples[k][0] - t)) for t in (t0, t1))
        dt = self.samples[j][0] - self.samples[i][0]
        a, b = self.names[i], self.names[j]
        return {k: (b[k] - a.get(k, 0.0)) / dt for k in sorted(b, key=lambda k: a.get(k, 0.0) - b[k])}

    def at(self, t: float) -> tuple[float, float]:
        """(worker, launcher) CPU seconds at time t, interpolated between samples."""
        for (t0, w0, o0), (t1, w1, o1) in zip(self.samples, self.samples[1:]):
            if t0 <= t <= t1:
                f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
                return w0 + f * (w1 - w0), o0 + f * (o1 - o0)
        raise ValueError(f"no CPU samples around {t}")


def short_name(cmd: str) -> str:
    """`ray::TrainController`, `raylet`, `agent.py`, ...: what a process is, from its command line."""
    words = cmd.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    script = next((w for w in words[1:] if w.endswith(".py") or w.endswith("/torchrun")), words[0])
    return os.path.basename(script)


def measure(kind: str, launch, args, root, opts, work, n: int, every: int, upload: str, exclude=()) -> dict:
    name = f"bench-{kind}-{upload}-{every}-{n}"
    p = plan(spec(args, name, root, every))
    trace = os.path.join(work, f"{name}.jsonl")
    load0 = os.getloadavg()[0]
    cpu = TreeCPU(exclude)
    try:
        t = launch(p, opts, trace, upload, work)
    finally:
        cpu.stop()
    at = stamps(trace)
    g = {s: at[s + 1] - at[s] for s in at if s + 1 in at and s >= args.warmup}
    # Steady state for CPU: from the first step after warm-up to the start of the last step (which is
    # followed by the final val pass and the final checkpoint).
    a, b = args.warmup, max(at)
    (w0, o0), (w1, o1) = cpu.at(at[a]), cpu.at(at[b])
    return {"kind": kind, "run": p.urls["run"], "upload": upload, "every": every, "gaps": g,
            "median": statistics.median(g.values()), "worker_cpu_step": (w1 - w0) / (b - a) / WORKERS,
            "launcher_cores": (o1 - o0) / (at[b] - at[a]), "by_name": cpu.launcher_by_name(at[a], at[b]),
            "init": t.get("init"), "setup": at[0] - t["start"], "teardown": t["end"] - at[b],
            "load": (load0, os.getloadavg()[0])}


def stall(r: dict, window: int) -> dict:
    """Excess time of each checkpoint's window over clean steps, in units of the clean median step."""
    g, every = r["gaps"], r["every"]
    ckpt = [s for s in g if (s + 1) % every == 0]  # gap s holds the save of checkpoint s + 1
    hit = {s + j for s in ckpt for j in range(window)}
    clean = statistics.median(v for s, v in g.items() if s not in hit)
    excess = [sum(g[s + j] for j in range(window)) - window * clean
              for s in ckpt if all(s + j in g for j in range(window))]
    first = [g[s] / clean for s in ckpt]
    return {"clean": clean, "n": len(excess), "steps": [e / clean for e in excess], "save_gap": first}


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=4, help="Ray/torchrun pairs for the ratio (order alternates)")
    ap.add_argument("--steps", type=int, default=50, help="training steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="leading steps left out of every statistic")
    ap.add_argument("--every", type=int, default=10, help="checkpoint cadence of the stall runs (steps)")
    ap.add_argument("--window", type=int, default=4, help="gaps charged to one checkpoint (save + upload)")
    ap.add_argument("--config", choices=("local", "tiny"), default="local",
                    help="local: the embedded default model (cli/local.py); tiny: the tests' model")
    ap.add_argument("--storage", choices=("file", "s3"), default="file")
    ap.add_argument("--skip-ratio", action="store_true", help="only the checkpoint-stall runs")
    ap.add_argument("--skip-stall", action="store_true", help="only the per-step ratio runs")
    ap.add_argument("--plain-ray", action="store_true", help="start Ray with ray.init (log monitor, autoscaler "
                    "monitor) instead of the local run's lean cluster (trainer/launch.py LocalRay)")
    args = ap.parse_args()
    global LEAN
    LEAN = not args.plain_ray
    if args.worker:
        return worker(args.worker)

    from cli.local import ensure_inputs

    work = tempfile.mkdtemp(prefix="bench-ray-overhead-")
    # Workers' checkpoint folders (SYNC saves under Ray, every save under torchrun's local mode) are left
    # where they were written: put them in `work`, removed at the end. Ray's own files stay where they were.
    os.environ["TMPDIR"] = work
    moto = None
    try:
        if args.storage == "s3":
            sys.path.insert(0, BENCH)
            from loader import start_moto

            import s3fs

            moto, endpoint = start_moto()
            opts = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
            s3fs.S3FileSystem(**opts).mkdir("bench")
            root = "s3://bench"
        else:
            opts, root = {}, f"file://{work}/root"
        t0 = time.perf_counter()
        ensure_inputs(plan(spec(args, "inputs", root, args.steps)), opts, mb=2, conversations=10,
                      say=lambda *_: None)
        print(f"inputs (2 MB corpus, tokenizer) built in {time.perf_counter() - t0:.0f} s; "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)
        launchers = {"ray": launch_ray, "torchrun": launch_torchrun}
        exclude = {moto.pid} if moto else set()

        def go(kind, every, upload):
            r = measure(kind, launchers[kind], args, root, opts, work, len(runs), every, upload, exclude)
            runs.append(r)
            init = f"ray.init {r['init']:4.1f} s, " if r["init"] is not None else ""
            print(f"  {kind:<8} upload={upload:<5} ckpt every {every:>3}: step {r['median'] * 1e3:6.1f} ms "
                  f"(IQR {iqr(r['gaps'].values())}), worker CPU/step {r['worker_cpu_step'] * 1e3:6.1f} ms, "
                  f"launcher {r['launcher_cores']:.3f} cores; {init}setup {r['setup']:4.1f} s, teardown "
                  f"{r['teardown']:4.1f} s; load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)
            return r

        runs: list[dict] = []
        pairs = []
        if not args.skip_ratio:
            print(f"\n1. per-step time, {args.config} model, {args.steps} steps, checkpoint only at the end",
                  flush=True)
            for i in range(args.pairs):
                order = ("ray", "torchrun") if i % 2 == 0 else ("torchrun", "ray")
                res = {k: go(k, args.steps, "async") for k in order}
                pairs.append(res)
        st = {}
        if not args.skip_stall:
            print(f"\n2. checkpoint stall, every {args.every} steps", flush=True)
            st = {label: go(kind, args.every, upload) for label, kind, upload in
                  (("ray async", "ray", "async"), ("ray sync", "ray", "sync"), ("torchrun", "torchrun", "async"))}

        print(f"\nsummary ({args.config} model, {args.storage} storage, {args.steps} steps/run, first "
              f"{args.warmup} left out)")
        out = {"config": args.config, "storage": args.storage, "runs": [
            {k: v for k, v in r.items() if k != "gaps"} for r in runs]}
        if pairs:
            def ratio(key):
                xs = [r["ray"][key] / r["torchrun"][key] for r in pairs]
                return statistics.median(xs), xs

            wall, walls = ratio("median")
            cpu, cpus = ratio("worker_cpu_step")
            print(f"per-step time Ray / torchrun: {wall:.3f} (pairs: {', '.join(f'{x:.3f}' for x in walls)}; "
                  f"goal <= 1.03)")
            print(f"worker CPU per step Ray / torchrun: {cpu:.3f} (pairs: {', '.join(f'{x:.3f}' for x in cpus)})")
            for k in ("ray", "torchrun"):
                med = {key: statistics.median(r[k][key] for r in pairs)
                       for key in ("median", "launcher_cores", "setup", "teardown")}
                init = statistics.median(r[k]["init"] for r in pairs) if k == "ray" else None
                print(f"  {k:<8} step {med['median'] * 1e3:.1f} ms; launcher processes {med['launcher_cores']:.3f} "
                      f"cores while training; setup {med['setup']:.1f} s"
                      + (f" (+ ray.init {init:.1f} s)" if init is not None else "")
                      + f"; teardown {med['teardown']:.1f} s")
            names: dict[str, list[float]] = {}
            for r in pairs:
                for k, v in r["ray"]["by_name"].items():
                    names.setdefault(k, []).append(v)
            top = sorted(((statistics.median(v), k) for k, v in names.items()), reverse=True)[:6]
            print("  Ray's launcher processes, cores while training (median): "
                  + ", ".join(f"{k} {c:.3f}" for c, k in top))
            out["ratio"] = {"wall": wall, "wall_pairs": walls, "worker_cpu": cpu, "worker_cpu_pairs": cpus}
        out["stall"] = {"checkpoint_mb": checkpoint_mb(st["ray async"]["run"], opts)} if st else {}
        if st:
            print(f"one checkpoint (model, 2 optimizer shards, loader states, meta): "
              f"{out['stall']['checkpoint_mb']:.1f} MB")
        for label, r in st.items():
            s = stall(r, args.window)
            if label.startswith("ray") and args.every * s["clean"] < POLL_S:
                print(f"warning: checkpoints every {args.every * s['clean']:.1f} s are closer than Ray Train's "
                      f"{POLL_S:g} s poll; raise --every for a figure that applies to real runs")
            out["stall"][label] = s
            print(f"checkpoint stall, {label:<9}: median {statistics.median(s['steps']):+.2f} steps over "
                  f"{args.window} gaps (each: {', '.join(f'{x:+.2f}' for x in s['steps'])}); the gap holding the "
                  f"save is {statistics.median(s['save_gap']):.2f}x a clean step ({s['clean'] * 1e3:.0f} ms)"
                  + ("; goal <= 1 step" if label == "ray async" else ""))
        print(json.dumps(out))
    finally:
        if moto is not None:
            moto.kill()
            moto.wait()
        shutil.rmtree(work, ignore_errors=True)


def checkpoint_mb(run_url: str, opts: dict) -> float:
    import fsspec

    from trainer import checkpoint

    url = checkpoint.latest(f"{run_url}/pretrain", storage_options=opts)
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs.du(path) / 1e6


def iqr(values) -> str:
    q = statistics.quantiles(list(values), n=4)
    return f"{q[0] * 1e3:.0f}-{q[2] * 1e3:.0f} ms"


if __name__ == "__main__":
    main()

"""The run's entry point: `python -m trainer.launch --plan <url|file>` in a RayJob, or `run(plan)` locally.

It reads the RunPlan, stores it beside the checkpoints, and runs the plan's stages in order, each as one
Ray Train `TorchTrainer.fit()` over `plan.spec.gpus` workers. Storage is `<runs root>/<run>/<stage>/`, and
the run name is derived from the spec, so a retried RayJob (a fresh Ray cluster) finds the same directory
and Ray Train resumes the stage from its latest checkpoint; a finished stage is skipped. SFT starts from
the newest whole pretraining checkpoint. The run ends by writing `<run>/summary.json`: tokens, time,
measured throughput, dollars, against the plan's estimate, and the report card (`report.md`, trainer/report.py).
With `--track` the run is also an MLflow and/or W&B run (trainer/tracking.py: opened here, metrics from each
stage's rank 0, the report uploaded at the end). The eval stage (val bpb of each model, CORE of the base model)
runs `trainer.eval_stage.eval_loop` on the same workers. Each stage's workers get a `trainer.worker.StageConfig`. When Ray Train restarts a stage's worker group
(a worker died or raised), the controller's callback records the failed ranks and the new group's rank 0 the
restart (trainer/restarts.py: `<run>/restarts.json`, one console line).

Custom S3 endpoints (MinIO, a test's moto server) reach Ray through an fsspec filesystem wrapped for pyarrow
(`storage_filesystem`); credentials come from the environment (a Kubernetes Secret by reference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from trainer import logship
from trainer.metrics import METRICS_PORT_BASE
from trainer.plan import PlanError, RunPlan
from trainer.storage import (expand, filesystem, ray_storage, read_json, storage_options_from_env, write_json,
                             write_text)


class LaunchError(RuntimeError):
    """The run could not finish: a stage failed or stopped on a non-finite loss."""


def load_plan(source: str, opts: dict | None = None) -> RunPlan:
    """A RunPlan from a file path or any fsspec URL holding its JSON."""
    try:
        fs, path = filesystem(expand(source), opts)
        return RunPlan.from_json(fs.cat_file(path).decode())
    except FileNotFoundError:
        raise PlanError(f"plan: {source} does not exist") from None


def write_plan(p: RunPlan, opts: dict) -> None:
    """Store the plan at <run>/plan.json; refuse to reuse a run directory that holds a different plan."""
    url = f"{p.urls['run']}/plan.json"
    stored = read_json(url, opts)
    if stored is not None:
        if stored != json.loads(p.to_json()):
            raise PlanError(f"name: run {p.name} already exists at {p.urls['run']} with a different plan; "
                            "pick another --name")
        return
    write_text(url, p.to_json(), opts)


def local_ray_options(*, verbose: bool = False, num_cpus: int | None = None) -> dict:
    """`ray.init` options for a local cluster that holds what a local run needs and no more: no dashboard
    (nor its web server); the workers' and Ray's own output stay in the session's log files unless `verbose`
    (`log_to_driver`: the driver would otherwise print every worker line, Ray Train's controller included)."""
    opts = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=False)
    if num_cpus is not None:
        opts["num_cpus"] = num_cpus
    return opts


# What a local cluster's idle processes spend their CPU on, none of which a local run reads (our metrics are the
# workers' own prometheus-client exporters, trainer/metrics.py). Each Ray process otherwise idles at ~0.01 cores,
# which a training step on 2 cores pays for: Ray's processes took 0.144 cores of 2 while training by default,
# 0.057-0.062 with these (bench/ray_overhead.py, bench/ray_idle.py; docs/benchmarks.md).
LEAN_SYSTEM_CONFIG = {
    "enable_metrics_collection": False,  # Ray's own metrics pipeline (src/ray/common/ray_config_def.h)
    "metrics_report_interval_ms": 60_000,  # default 10,000: each process's export to the metrics agent
    "event_stats": False,  # per-handler timing stats of every event loop, for debugging Ray itself
}
LEAN_ENV = {
    "REPORTER_UPDATE_INTERVAL_MS": "60000",  # the dashboard agent's psutil sweep of every process, default 5,000
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Ray Train's controller/worker metrics callbacks, which feed Ray metrics
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "60",  # default 5: a laptop's node is never a preempted cloud VM
}


class LocalRay:
    """A local Ray cluster started for one run, leaner than `ray.init()`'s: besides no dashboard, no log
    monitor (it only forwards worker output to the driver, which a quiet run does not print; the workers'
    files are written by the raylet either way) and no autoscaler monitor (a fixed single node). `ray.init`
    has no option for either, so the head node is started the way `ray.init` starts it (ray._private.node.Node
    with RayParams), with those two flags changed, and the driver connects to it. `stop()` ends the driver's
    connection and exactly this cluster's processes (never other Ray instances on the machine). Ray's idle
    book-keeping is turned down (LEAN_SYSTEM_CONFIG, LEAN_ENV; a variable the user set wins).

    Ray's private API moves between releases: if it does not have these names, the cluster is started by a
    plain `ray.init(**local_ray_options(...))` instead (the same run, with the two daemons)."""

    def __init__(self, *, verbose: bool = False, num_cpus: int | None = None):
        import ray

        self.node = None
        for key, value in LEAN_ENV.items():  # read by the driver (Ray Train) and the raylet's children
            os.environ.setdefault(key, value)
        try:
            from ray._private.authentication.authentication_token_setup import (enable_token_auth_by_default,
                                                                                ensure_token_if_auth_enabled)
            from ray._private.node import Node
            from ray._private.parameter import RayParams
        except ImportError:
            ray.init(**local_ray_options(verbose=verbose, num_cpus=num_cpus))
            return
        system_config: dict = dict(LEAN_SYSTEM_CONFIG)
        enable_token_auth_by_default()  # what ray.init does for a new local cluster (token auth on)
        ensure_token_if_auth_enabled(system_config, create_token_if_missing=True)
        params = RayParams(num_cpus=num_cpus, include_dashboard=False, include_log_monitor=verbose, no_monitor=True,
                           _system_config=system_config)
        self.node = Node(params, head=True, shutdown_at_exit=False, spawn_reaper=True, ray_init_cluster=True)
        ray.init(address=self.node.address, log_to_driver=verbose, configure_logging=False)

    def stop(self) -> None:
        import ray

        ray.shutdown()
        if self.node is not None:
            self.node.kill_all_processes(check_alive=False, allow_graceful=True)
            self.node = None


def ray_logs_dir() -> str | None:
    """Where this Ray session writes its log files (worker output, raylet, GCS), or None without a session."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public accessor for the local session dir
    return node.get_logs_dir_path() if node is not None else None


def run(p: RunPlan, *, storage_options: dict | None = None, **kw) -> dict:
    """Run every stage of the plan on the current Ray cluster (starting a local one if none); return the
    run summary. Idempotent: finished stages are skipped, interrupted ones resume. This attempt's GPU time
    goes to `<run>/spend.json` (trainer/spend.py), heartbeated, so spend survives retries and preemptions, and
    priced at the size each worker group actually ran at (an elastic run that shrank pays for fewer GPUs)."""
    from trainer import spend, tracking

    opts = dict(storage_options if storage_options is not None else storage_options_from_env())
    write_plan(p, opts)  # before the ledger: never write into another run's directory
    count = worker_count(p, kw.get("workers"))  # the size it starts at; worker groups report changes (spend.py)
    with spend.attempt(p.urls["run"], run=p.name, gpus=count if isinstance(count, int) else max(count),
                       price_per_gpu_hour=p.estimate.price_per_gpu_hour, storage_options=opts) as ledger, \
            logship.shipping(p.urls["run"], len(ledger.doc["attempts"]), "driver", opts):  # trainer/logship.py
        refs = tracking.open_runs(p, opts)  # --track: MLflow / W&B runs; never fatal (trainer/tracking.py)
        ok = False
        try:
            result = _run_stages(p, storage_options=opts, earlier_attempts_seconds=ledger.earlier_seconds,
                                 attempts=len(ledger.doc["attempts"]), tracking=refs, **kw)
            ok = result["status"] == "completed"
            return result
        finally:
            tracking.close_runs(p, refs, opts, ok=ok)  # the report and curves as artifacts; the runs ended


def _run_stages(p: RunPlan, *, storage_options: dict | None = None, max_failures: int = 3,
                metrics_port_base: int | None = None, log_every: int = 10, checkpoint_upload: str = "async",
                trace: str | None = None, chaos: dict | None = None, earlier_attempts_seconds: float = 0.0,
                attempts: int = 1, tracking: list | None = None,
                progress_file: str | None = None, quiet: bool = False, workers: int | tuple[int, int] | None = None,
                elastic_monitor_s: float = 60.0) -> dict:
    """`run`'s body: the stages in order, each one Ray Train fit. `progress_file`: a local path the workers
    append progress to (trainer/progress.py); `quiet`: print nothing of our own either. `workers` overrides the
    plan's worker count (an int, or Ray Train's elastic (min, max)); a checkpoint of another world size is
    re-sharded on restore (trainer/reshard.py); an elastic group checks every `elastic_monitor_s` whether
    more workers fit, and if so restarts larger from the latest checkpoint. `tracking`: the experiment-tracker
    runs `run` opened, for each stage's rank 0 (trainer/tracking.py)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer import checkpoint
    from trainer.eval_stage import eval_loop
    from trainer.loop import STATUS_COMPLETED, STATUS_NONFINITE, train_loop
    from trainer.report import write_report
    from trainer.restarts import failure_recorder
    from trainer.watchdog import COLLECTIVE_TIMEOUT_S  # above the watchdog's bounds: it names the rank first
    from trainer.worker import StageConfig

    opts = dict(storage_options if storage_options is not None else storage_options_from_env())
    write_plan(p, opts)
    if not ray.is_initialized():
        ray.init(**local_ray_options(verbose=True))
    local = p.spec.gpu_type == "cpu"
    if os.environ.get("LLMCTL_PREFLIGHT") == "1":  # submit --preflight: each node checked first (trainer/preflight.py)
        from trainer.preflight import run_preflight

        run_preflight(p, opts, attempts=attempts, workers=worker_count(p, workers), local=local)
    stages = {}
    for st in p.stages:
        done = read_json(f"{p.urls['run']}/{st.name}/summary.json", opts)
        if done and done["status"] == STATUS_COMPLETED:
            if not quiet:
                print(f"[{st.name}] already complete ({done['steps']} steps); skipping", flush=True)
            stages[st.name] = done
            continue
        init_model = None
        if st.name == "sft" and "pretrain" in stages:
            init_model = checkpoint.latest(f"{p.urls['run']}/pretrain", storage_options=opts)
        config = StageConfig(plan=p.to_json(), stage=st.name, storage_options=opts, log_every=log_every,
                             metrics_port_base=metrics_port_base, checkpoint_upload=checkpoint_upload, trace=trace,
                             chaos=chaos, init_model=init_model, earlier_attempts_seconds=earlier_attempts_seconds,
                             attempts=attempts, tracking=tracking or None,
                             progress_file=progress_file,
                             prior_seconds=sum(s["seconds"] for s in stages.values()),
                             prior_tokens=sum(s["tokens"] for s in stages.values())).to_dict()
        storage_path, storage_fs = ray_storage(p.urls["run"], opts)
        trainer = TorchTrainer(
            logship.rank_logged(eval_loop if st.name == "eval" else train_loop), train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=worker_count(p, workers), use_gpu=not local,
                                         elastic_resize_monitor_interval_s=elastic_monitor_s),
            torch_config=TorchConfig(backend="gloo" if local else "nccl", timeout_s=COLLECTIVE_TIMEOUT_S),
            run_config=RunConfig(
                name=st.name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=1),
                callbacks=[failure_recorder(p.urls["run"], st.name, opts)],  # which ranks failed (trainer/restarts.py)
                checkpoint_config=CheckpointConfig(num_to_keep=p.spec.keep_checkpoints)),
        )
        trainer.fit()
        summary = read_json(f"{p.urls['run']}/{st.name}/summary.json", opts)
        if summary is None:
            raise LaunchError(f"stage {st.name} ended without a summary; see the worker logs"
                              + (f" in {ray_logs_dir()}" if quiet else " above"))
        if summary["status"] == STATUS_NONFINITE:
            raise LaunchError(f"stage {st.name} stopped at step {summary['steps']}: the loss became NaN/inf")
        stages[st.name] = summary
        if summary["status"] != STATUS_COMPLETED:
            break  # budget cap: later stages do not start
    result = summarize(p, stages)
    write_json(f"{p.urls['run']}/summary.json", result, opts)
    write_report(p.urls["run"], opts)  # report.md / report.json: what a person reads first
    return result


def worker_count(p: RunPlan, workers: int | tuple[int, int] | None = None) -> int | tuple[int, int]:
    """ScalingConfig.num_workers: the plan's GPUs, or (min_gpus, gpus) for an elastic run (Ray Train V2)."""
    if workers is not None:
        return workers
    return (p.spec.min_gpus, p.spec.gpus) if p.spec.min_gpus and p.spec.min_gpus < p.spec.gpus else p.spec.gpus


def summarize(p: RunPlan, stages: dict) -> dict:
    seconds = sum(s["seconds"] for s in stages.values())
    return {
        "run": p.name, "url": p.urls["run"], "stages": stages,
        "status": "completed" if all(s["status"] == "completed" for s in stages.values())
        and len(stages) == len(p.stages) else "stopped",
        "tokens": sum(s["tokens"] for s in stages.values()),
        "hours": seconds / 3600, "dollars": sum(s["dollars"] for s in stages.values()),
        "estimate": {"train_hours": p.estimate.train_hours, "total_hours": p.estimate.total_hours,
                     "total_dollars": p.estimate.total_dollars, "mfu": p.estimate.mfu},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.launch", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="RunPlan JSON: a file path or an fsspec URL (s3://...)")
    src.add_argument("--plan-json", help="RunPlan JSON inline (e.g. from an environment variable)")
    ap.add_argument("--max-failures", type=int, default=3, help="worker-group restarts per stage")
    ap.add_argument("--metrics-port-base", type=int, default=METRICS_PORT_BASE, help="exporter port = base + local rank; -1 = off")
    args = ap.parse_args(argv)
    try:
        p = RunPlan.from_json(args.plan_json) if args.plan_json else load_plan(args.plan)
    except PlanError as e:
        print(f"trainer.launch: error: {e}", file=sys.stderr)
        return 2
    port = None if args.metrics_port_base < 0 else args.metrics_port_base
    summary = run(p, max_failures=args.max_failures, metrics_port_base=port)
    print(json.dumps(summary, indent=2))
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())

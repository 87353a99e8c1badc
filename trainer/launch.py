"""The run's entry point: `python -m trainer.launch --plan <url|file>` in a RayJob, or `run(plan)` locally.

It reads the RunPlan, stores it beside the checkpoints, and runs the plan's stages in order, each as one
Ray Train `TorchTrainer.fit()` over `plan.spec.gpus` workers. Storage is `<runs root>/<run>/<stage>/`, and
the run name is derived from the spec, so a retried RayJob (a fresh Ray cluster) finds the same directory
and Ray Train resumes the stage from its latest checkpoint; a finished stage is skipped. SFT starts from
the newest whole pretraining checkpoint. The run ends by writing `<run>/summary.json`: tokens, time,
measured throughput, dollars, against the plan's estimate, and the report card (`report.md`, trainer/report.py).
The eval stage (val bpb of each model, CORE of the base model) runs `trainer.eval_stage.eval_loop` on the same
workers. Each stage's workers get a `trainer.worker.StageConfig`.

Custom S3 endpoints (MinIO, a test's moto server) reach Ray through an fsspec filesystem wrapped for pyarrow
(`storage_filesystem`); credentials come from the environment (a Kubernetes Secret by reference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from trainer.metrics import METRICS_PORT_BASE
from trainer.plan import PlanError, RunPlan
from trainer.storage import expand, filesystem, read_json, storage_options_from_env, write_json, write_text


class LaunchError(RuntimeError):
    """The run could not finish: a stage failed or stopped on a non-finite loss."""


def ray_storage(url: str, opts: dict):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig from any fsspec URL."""
    fs, path = filesystem(url, opts)
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


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


def run(p: RunPlan, *, storage_options: dict | None = None, max_failures: int = 3,
        metrics_port_base: int | None = None, log_every: int = 10, checkpoint_upload: str = "async",
        trace: str | None = None, chaos: dict | None = None, workers: int | tuple[int, int] | None = None,
        elastic_monitor_s: float = 60.0) -> dict:
    """Run every stage of the plan on the current Ray cluster (starting a local one if none); return the
    run summary. Idempotent: finished stages are skipped, interrupted ones resume. `workers` overrides the
    plan's worker count (an int, or Ray Train's elastic (min, max)); a checkpoint of another world size is
    re-sharded on restore (trainer/reshard.py); an elastic group checks every `elastic_monitor_s` whether
    more workers fit, and if so restarts larger from the latest checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer import checkpoint
    from trainer.eval_stage import eval_loop
    from trainer.loop import STATUS_COMPLETED, STATUS_NONFINITE, train_loop
    from trainer.report import write_report
    from trainer.worker import StageConfig

    opts = dict(storage_options if storage_options is not None else storage_options_from_env())
    write_plan(p, opts)
    if not ray.is_initialized():
        ray.init(log_to_driver=True, include_dashboard=False, configure_logging=False)
    local = p.spec.gpu_type == "cpu"
    stages = {}
    for st in p.stages:
        done = read_json(f"{p.urls['run']}/{st.name}/summary.json", opts)
        if done and done["status"] == STATUS_COMPLETED:
            print(f"[{st.name}] already complete ({done['steps']} steps); skipping", flush=True)
            stages[st.name] = done
            continue
        init_model = None
        if st.name == "sft" and "pretrain" in stages:
            init_model = checkpoint.latest(f"{p.urls['run']}/pretrain", storage_options=opts)
        config = StageConfig(plan=p.to_json(), stage=st.name, storage_options=opts, log_every=log_every,
                             metrics_port_base=metrics_port_base, checkpoint_upload=checkpoint_upload, trace=trace,
                             chaos=chaos, init_model=init_model,
                             prior_seconds=sum(s["seconds"] for s in stages.values()),
                             prior_tokens=sum(s["tokens"] for s in stages.values())).to_dict()
        storage_path, storage_fs = ray_storage(p.urls["run"], opts)
        trainer = TorchTrainer(
            eval_loop if st.name == "eval" else train_loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=worker_count(p, workers), use_gpu=not local,
                                         elastic_resize_monitor_interval_s=elastic_monitor_s),
            torch_config=TorchConfig(backend="gloo" if local else "nccl", timeout_s=1800),
            run_config=RunConfig(
                name=st.name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=1),
                checkpoint_config=CheckpointConfig(num_to_keep=p.spec.keep_checkpoints)),
        )
        trainer.fit()
        summary = read_json(f"{p.urls['run']}/{st.name}/summary.json", opts)
        if summary is None:
            raise LaunchError(f"stage {st.name} ended without a summary; see the worker logs above")
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

"""A finished run made for real, once per test session: the local pipeline on a tiny spec, then the eval stage.

Used by tests/test_evaluate.py, tests/test_cli_chat.py and tests/test_report.py. The run goes through
exactly what `llmctl submit --local` runs (cli/local.py's inputs, trainer/launch.py's stages on a local Ray
cluster with 2 CPU workers), just smaller: pretraining 12 steps, SFT, then the eval stage as its own
TorchTrainer over `trainer.evaluate.eval_loop` (the same call launch.run makes for a plan's eval stage) on a
smoke CORE bundle built from the validation shard. Built under pytest's session temp dir; a second caller
in the same session reuses it.
"""

from __future__ import annotations

import json

from trainer.plan import RunSpec, plan

TINY = dict(depth=2, gpus=2, gpu_type="cpu", vocab_size=512, seq_len=64, head_dim=64, device_batch_size=4,
            total_batch_size=2 * 4 * 64, num_iterations=12, eval_every=6, eval_tokens=2 * 4 * 64 * 2,
            checkpoint_every=6, sft_tokens=2 * 4 * 64 * 6, dataset="sample", sft_dataset="sample-sft",
            tokenizer="sample-512", core_max_per_task=24)
NAME = "finished"


def run_eval_stage(p, opts: dict) -> dict:
    """The eval stage as launch.run runs a stage: one TorchTrainer.fit() over the plan's workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.evaluate import eval_loop
    from trainer.launch import ray_storage

    storage_path, storage_fs = ray_storage(p.urls["run"], opts)
    config = {"plan": p.to_json(), "stage": "eval", "storage_options": opts, "metrics_port_base": None}
    TorchTrainer(eval_loop, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=p.spec.gpus, use_gpu=False),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="eval", storage_path=storage_path, storage_filesystem=storage_fs)).fit()
    return json.loads(open(p.urls["run"][len("file://"):] + "/eval/summary.json").read())


def finished_run(tmp_path_factory):
    """The plan of a run that pretrained, fine-tuned, was evaluated and has its report written."""
    import inspect

    import ray

    import trainer.launch
    from cli.local import ensure_inputs
    from trainer.evaluate import build_smoke_bundle_from_val
    from trainer.launch import run
    from trainer.report import write_report

    root = tmp_path_factory.getbasetemp() / "llmctl-finished-run"
    full = plan(RunSpec(storage_root=f"file://{root}", name=NAME, stages=("pretrain", "sft", "eval"), **TINY))
    if (root / "built").exists():
        return full
    ensure_inputs(full, mb=0.5, conversations=300, say=lambda *_: None)
    build_smoke_bundle_from_val(full.urls["data"], full.urls["eval_bundle"], per_task=24)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        if "eval_loop" in inspect.getsource(trainer.launch):  # launch.run runs the plan's eval stage itself
            run(full, storage_options={}, log_every=6)
        else:  # until it does: the training stages through launch.run, then the eval stage as it will run it
            training = plan(RunSpec(storage_root=f"file://{root}", name=NAME, stages=("pretrain", "sft"), **TINY))
            run(training, storage_options={}, log_every=6)
            run_eval_stage(full, {})
    finally:
        if started:
            ray.shutdown()
    write_report(full.urls["run"])
    (root / "built").touch()
    return full

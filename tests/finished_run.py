"""The tests' tiny run, one spec for every test that trains (`TINY`), and the finished run built from it once
per session (the `tiny_inputs` and `finished_run` fixtures in tests/conftest.py).

The run goes through exactly what `llmctl submit --local` runs (cli/local.py's inputs, trainer/launch.py's
stages on a local Ray cluster with 2 CPU workers: pretraining, SFT, then the eval stage), just smaller.
Tests that only read a finished run (test_launch's end-to-end checks, test_evaluate, test_report,
test_cli_chat) share it, so the whole pipeline runs once per session.
"""

from __future__ import annotations

from trainer.plan import RunPlan, RunSpec, plan

# A tiny model: 2 layers, 128 wide, 512-token vocabulary, 64-token context, 2 workers x 4 rows x 64 tokens;
# 30 pretraining steps (enough for val bpb to fall by > 0.3), 6 SFT steps, CORE on 24 examples per task.
TINY = dict(depth=2, gpus=2, gpu_type="cpu", vocab_size=512, seq_len=64, head_dim=64, device_batch_size=4,
            total_batch_size=2 * 4 * 64, num_iterations=30, eval_every=10, eval_tokens=2 * 4 * 64 * 2,
            checkpoint_every=4, sft_tokens=2 * 4 * 64 * 6, dataset="sample", sft_dataset="sample-sft",
            tokenizer="sample-512", core_max_per_task=24)
NAME = "finished"


def tiny_plan(root: str, name: str | None = None, **over) -> RunPlan:
    """The tiny spec under storage root `root`, with any field overridden."""
    return plan(RunSpec(storage_root=root, name=name, **{**TINY, **over}))


def build_inputs(root: str) -> str:
    """Corpus, conversations, tokenizer and smoke CORE bundle under `root` (a file:// URL); returns it."""
    from cli.local import ensure_inputs

    ensure_inputs(tiny_plan(root), mb=0.5, conversations=300, say=lambda *_: None)
    return root


def build_finished_run(root: str) -> RunPlan:
    """Run the whole tiny pipeline (pretrain, SFT, eval, report) under `root`; the plan of the finished run."""
    import ray

    from trainer.launch import run

    full = tiny_plan(root, NAME)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)  # never another Ray
    try:
        summary = run(full, storage_options={}, log_every=4)
    finally:
        if started:
            ray.shutdown()
    assert summary["status"] == "completed", summary
    return full

"""The tests' tiny run, one spec for every test that trains (`TINY`), and the finished run built from it once
per session (the `tiny_inputs` and `finished_run` fixtures in tests/conftest.py).

The run goes through exactly what `llmctl submit --local` runs (cli/local.py's inputs and `run_plan_local`,
trainer/launch.py's stages on a local Ray cluster with 2 CPU workers: pretraining, SFT, then the eval stage),
just smaller, in a child process whose console tests/test_local.py reads.
Tests that only read a finished run (test_launch's end-to-end checks, test_evaluate, test_report,
test_cli_chat, test_local's console) share it, so the whole pipeline runs once per session. Its pretraining is also the fault tests'
uninterrupted baseline (test_launch, test_preempt_resize): the same tiny plan, trained the same way, with a
per-step data trace (`finished_trace`).
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


def finished_trace(p: RunPlan) -> str:
    """The finished run's data trace (local JSONL, trainer/loop.py `_trace`): pretraining's steps, then SFT's."""
    return p.urls["runs_root"][len("file://"):-len("/runs")] + f"/{p.name}-trace.jsonl"  # beside runs/, not a run


def finished_console(p: RunPlan) -> str:
    """What the finished run printed (stdout then stderr of its child process), for tests/test_local.py."""
    return p.urls["runs_root"][len("file://"):-len("/runs")] + f"/{p.name}-console.txt"


def build_finished_run(root: str, track: tuple[str, ...] = ()) -> RunPlan:
    """Run the whole tiny pipeline (pretrain, SFT, eval, report) under `root` the way `llmctl submit --local`
    does after planning (cli/local.py `run_plan_local`: its own lean local Ray cluster with 2 CPUs, the stage
    bars, the report card), in a child process whose console is kept (`finished_console`); the plan of the
    finished run. The child adds the data trace and logs every 4 steps (trainer.launch.run's own keywords).
    `track`: the run's `--track` targets (RunSpec.track; MLflow's HTTP retries off, so a closed port fails at once)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    full = tiny_plan(root, NAME, track=tuple(track))
    code = ("import functools, sys; import trainer.launch as launch; from cli.local import run_plan_local; "
            "from tests.finished_run import finished_trace, tiny_plan; "
            f"p = tiny_plan({root!r}, {NAME!r}, track={tuple(track)!r}); "
            "launch.run = functools.partial(launch.run, log_every=4, trace=finished_trace(p)); "
            f"sys.exit(run_plan_local(p, storage={root!r}, num_cpus=2))")
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": repo, "COLUMNS": "160", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env, cwd=repo)
    Path(finished_console(full)).write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return full

"""`llmctl submit --local`: the whole pipeline on this machine — the embedded default.

Builds what a cluster would already have (a small real-text corpus and conversation set made from the
documentation installed with Python, and a small BPE tokenizer trained on it), plans a tiny model for
CPU workers, runs pretraining, SFT and the eval stage on a local Ray cluster, and ends by printing the run's
report card (bpb, a smoke CORE figure, samples from the base and chat models) and where the checkpoints are.
Everything lands under the storage root (default file://~/.cache/llmctl), in the same layout a cluster run
uses.
"""

from __future__ import annotations

import argparse
import time

from cli.inputs import SAMPLE_MB, SFT_CONVERSATIONS, SMOKE_CORE_PER_TASK, ensure_inputs

__all__ = ["DEMO", "LOCAL", "PRESETS", "ensure_inputs", "local_spec", "run_local", "run_plan_local"]

# The embedded default ("quick", what `make run` does): small enough to pretrain + SFT in a few minutes on 2
# CPU cores, shaped by the same recipe (SSSL windows, value embeddings, smear/backout, Muon + AdamW, the
# batch-scaled LRs). A 2-layer, 128-wide model with head_dim 64 (nanochat's runcpu.sh uses 64 too), a
# 4,096-token vocabulary and a 256-token context: ~0.9M matmul parameters, about 5 s per 10 steps of 4,096
# tokens on 2 cores.
LOCAL = dict(depth=2, gpus=2, gpu_type="cpu", vocab_size=4096, seq_len=256, head_dim=64,
             device_batch_size=8, total_batch_size=2 * 8 * 256, num_iterations=200, eval_every=50,
             eval_tokens=2 * 8 * 256 * 4, checkpoint_every=50, sft_tokens=2 * 8 * 256 * 40,
             core_max_per_task=SMOKE_CORE_PER_TASK)  # the smoke CORE bundle's examples per task
# "demo": long enough (~30-40 min on 2 cores, docs/benchmarks.md) for the samples to read like the corpus. d4 (256 wide, 4 heads
# of 64, ~3.1M matmul + 1M lm_head parameters), 8,192 tokens a step; 700 steps = ~5.7M tokens (for scale,
# nanochat's runcpu.sh trains d6 on ~82M tokens), over a 24 MB corpus so the steps see each document about
# once; SFT then runs ~60 steps of the sample conversations.
DEMO = dict(LOCAL, depth=4, device_batch_size=16, total_batch_size=2 * 16 * 256, num_iterations=700,
            eval_every=100, eval_tokens=2 * 16 * 256 * 4, checkpoint_every=100, sft_tokens=2 * 16 * 256 * 60)
# preset -> (spec fields, corpus MB, conversations, dataset name); the corpus of "quick" (cli/inputs.py SAMPLE_MB):
# ~2M tokens at 4K vocab, enough for 200 steps of 4K tokens without repeats.
PRESETS = {"quick": (LOCAL, SAMPLE_MB, SFT_CONVERSATIONS, "sample"), "demo": (DEMO, 24, 6000, "sample-demo")}


def local_spec(args: argparse.Namespace):
    from trainer.plan import RunSpec

    preset = getattr(args, "preset", None) or "quick"
    base, _, _, dataset = PRESETS[preset]
    fields = dict(base)
    if getattr(args, "steps", None):
        fields["num_iterations"] = args.steps
    return RunSpec(storage_root=args.storage, dataset=dataset, sft_dataset=f"{dataset}-sft",
                   tokenizer=f"{dataset}-{fields['vocab_size']}", name=getattr(args, "name", None),
                   track=tuple(getattr(args, "track", None) or ()), **fields)


def run_local(args: argparse.Namespace) -> int:
    from cli.planning import render_table
    from trainer.plan import plan
    from trainer.storage import expand

    args.storage = expand(args.storage)
    p = plan(local_spec(args))
    print(render_table(p), flush=True)
    print(flush=True)
    _, mb, conversations, _ = PRESETS[getattr(args, "preset", None) or "quick"]
    ensure_inputs(p, {}, mb=mb, conversations=conversations, show_progress=True)
    return run_plan_local(p, storage=args.storage, verbose=getattr(args, "verbose", False))


AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"  # Ray 2.5x's auth notice


def run_plan_local(p, *, storage: str, verbose: bool = False, num_cpus: int | None = None) -> int:
    """Run a planned local run on a local Ray cluster started for it, with the console a person wants: one
    bar per stage (trainer/progress.py StageBars), Ray's own lines kept in its log files (path printed) unless
    `verbose`, then the report card's summary and the next commands. Exit status 0 when the run completed."""
    import logging
    import os

    import ray

    from trainer.launch import LocalRay, ray_logs_dir, run
    from trainer.progress import StageBars
    from trainer.report import card, gather, write_report

    t0 = time.perf_counter()
    run_dir = p.urls["run"].removeprefix("file://")
    os.makedirs(run_dir, exist_ok=True)
    progress = os.path.join(run_dir, "progress.jsonl")
    open(progress, "w").close()  # this session's progress only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats notice, nothing sent
    if not verbose:  # the notice every local cluster gets (token auth is on by default) goes to the run's log
        notice = logging.getLogger(AUTH_NOTICE_LOGGER)
        notice.addHandler(logging.FileHandler(os.path.join(run_dir, "ray-driver.log")))
        notice.propagate = False
    cluster = None if ray.is_initialized() else LocalRay(verbose=verbose, num_cpus=num_cpus)
    try:
        if not verbose:
            print(f"Ray's own logs (workers, Train controller, raylet): {ray_logs_dir()}  (--verbose shows them)",
                  flush=True)
        with StageBars(progress, [(s.name, s.steps) for s in p.stages], priced=p.estimate.price_per_gpu_hour > 0):
            summary = run(p, storage_options={}, metrics_port_base=None, progress_file=progress, quiet=not verbose)
    finally:
        if cluster is not None:
            cluster.stop()
    write_report(p.urls["run"])  # report.md, report.html and the curves (trainer/report.py)
    print(flush=True)
    print(card(gather(p.urls["run"])), flush=True)
    print(f"finished in {time.perf_counter() - t0:.0f} s; report, curves and checkpoints in {run_dir}/", flush=True)
    print(f"next: llmctl report {p.name} --storage {storage} --open    "
          f"llmctl chat {p.name} --storage {storage}", flush=True)
    return 0 if summary["status"] == "completed" else 1

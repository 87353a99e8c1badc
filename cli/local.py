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

# The embedded default: small enough to pretrain + SFT in a few minutes on 2 CPU cores, shaped by the same
# recipe (SSSL windows, value embeddings, smear/backout, Muon + AdamW, the batch-scaled LRs). A 2-layer,
# 128-wide model with head_dim 64 (nanochat's runcpu.sh uses 64 too), a 4,096-token vocabulary and a
# 256-token context: ~0.9M matmul parameters, about 5 s per 10 steps of 4,096 tokens on 2 cores.
LOCAL = dict(depth=2, gpus=2, gpu_type="cpu", vocab_size=4096, seq_len=256, head_dim=64,
             device_batch_size=8, total_batch_size=2 * 8 * 256, num_iterations=200, eval_every=50,
             eval_tokens=2 * 8 * 256 * 4, checkpoint_every=50, sft_tokens=2 * 8 * 256 * 40,
             core_max_per_task=40)  # the smoke CORE bundle holds 40 examples per task
SAMPLE_MB = 8  # corpus size: ~2M tokens at 4K vocab, enough for 200 steps of 4K tokens without repeats
SAMPLE_ROW_GROUP = 64  # docs per row group: small, so every rank gets row groups of the one val shard
SFT_CONVERSATIONS = 3000
SMOKE_CORE_PER_TASK = LOCAL["core_max_per_task"]  # examples per task of the smoke bundle from held-out text


def local_spec(args: argparse.Namespace):
    from trainer.plan import RunSpec

    fields = dict(LOCAL)
    if getattr(args, "steps", None):
        fields["num_iterations"] = args.steps
    return RunSpec(storage_root=args.storage, dataset="sample", sft_dataset="sample-sft",
                   tokenizer=f"sample-{fields['vocab_size']}", name=getattr(args, "name", None), **fields)


def ensure_inputs(p, opts: dict | None = None, *, mb: float = SAMPLE_MB, conversations: int = SFT_CONVERSATIONS,
                  say=print) -> None:
    """Sample corpus, conversations and tokenizer at the plan's URLs, each built once (idempotent)."""
    from trainer.chat import build_sample_conversations
    from trainer.corpus import build_sample_corpus
    from trainer.evaluate import build_smoke_bundle_from_val
    from trainer.tokenizer import Tokenizer

    data, sft, tok = p.urls["data"], p.urls["sft_data"], p.urls["tokenizer"]
    opts = opts or {}
    if not _exists(data, opts):
        say(f"building the sample corpus at {data} (Python's own documentation, no download)")
        build_sample_corpus(data, mb=mb, row_group_size=SAMPLE_ROW_GROUP, storage_options=opts)
    if not _exists(sft, opts):
        say(f"building sample conversations at {sft}")
        build_sample_conversations(sft, n=conversations, storage_options=opts)
    if not _exists(tok, opts):
        say(f"training a {p.spec.vocab_size}-token BPE tokenizer at {tok}")
        Tokenizer.train_from_shards(data, p.spec.vocab_size, storage_options=opts).save(tok, storage_options=opts)
    if "eval" in p.spec.stages and not _exists(p.urls["eval_bundle"], opts):
        say(f"building a smoke CORE bundle at {p.urls['eval_bundle']} from held-out text (not a capability score)")
        build_smoke_bundle_from_val(data, p.urls["eval_bundle"], per_task=SMOKE_CORE_PER_TASK, storage_options=opts)


def _exists(url: str, opts: dict) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs.exists(path) and bool(fs.ls(path))


def run_local(args: argparse.Namespace) -> int:
    from cli.plan import render_table
    from trainer.storage import expand
    from trainer.plan import plan

    args.storage = expand(args.storage)
    p = plan(local_spec(args))
    print(render_table(p), flush=True)
    print(flush=True)
    t0 = time.perf_counter()
    ensure_inputs(p, {})
    from trainer.launch import run

    summary = run(p, storage_options={}, metrics_port_base=None)
    from trainer.report import write_report

    print(flush=True)
    print(write_report(p.urls["run"]), flush=True)  # the report card, samples from both models included
    print(f"run {p.name}: {summary['status']} in {time.perf_counter() - t0:.0f} s, {summary['tokens']:,} tokens; "
          f"checkpoints under {p.urls['run']}/<stage>/", flush=True)
    print(f"talk to it: llmctl chat {p.name} --storage {args.storage}", flush=True)
    return 0 if summary["status"] == "completed" else 1

"""`llmctl eval RUN --tasks T1,T2`: lm-eval-harness on a run's model, through its Hugging Face export.

The run's stage is exported into a temporary directory (as `llmctl export` writes it) and evaluated there by
lm-eval's "hf" backend (transformers, trust_remote_code, float32, BOS first). Tasks are lm-eval task names;
`--include-path DIR` adds a directory of local task YAML files (lm-eval's own tasks download their data, so
offline only local ones run). The library is trainer/hf_export/harness.py; how lm-eval's multiple-choice
accuracy relates to our CORE score: docs/export.md.

Examples:
  llmctl eval my-run --tasks my_mc --include-path ./tasks --stage base
  llmctl eval s3://bucket/runs/my-run --tasks hellaswag,arc_easy --limit 200 --device cuda --output lm-eval.json
"""

from __future__ import annotations

import argparse

from cli.errors import UsageError


def register(sub) -> None:
    from trainer.hf_export import STAGES  # a dict in a docstring-only package: start-up stays light

    p = sub.add_parser("eval", help="evaluate a run's model with lm-eval-harness", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run name (under --storage) or the run's URL/path")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a directory of local lm-eval task YAML files")
    p.add_argument("--stage", default="sft", choices=tuple(STAGES),
                   help="sft: the chat model (default), base: the pretrained one")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest whole one)")
    p.add_argument("--limit", type=int, help="at most this many items per task")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--output", help="also write the results as JSON to this URL or path")
    p.add_argument("--storage", default="file://~/.cache/llmctl", help="storage root where run names are looked up")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: give at least one lm-eval task name")
    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        raise UsageError("--limit and --batch-size must be >= 1")
    from trainer import run_loader
    from trainer.hf_export.export import ExportError
    from trainer.hf_export.harness import TaskError, evaluate_run
    from trainer.storage import expand, run_url, storage_options_from_env, write_json

    url = run_url(args.run, args.storage)
    opts = storage_options_from_env() if url.startswith("s3") else {}
    try:
        doc = evaluate_run(url, tasks, stage=args.stage, step=args.step, storage_options=opts,
                           include_path=args.include_path, limit=args.limit, batch_size=args.batch_size,
                           device=args.device)
    except run_loader.RunLoadError as e:
        if str(e).startswith("no run at"):
            raise UsageError(f"run {args.run!r} not found: no plan.json at {url}") from None
        raise UsageError(f"run {args.run!r}: {e}") from None
    except (TaskError, ExportError) as e:
        raise UsageError(f"eval: {e}") from None
    print(f"lm-eval on {doc['run']} ({doc['stage']} step {doc['step']})")
    for task, metrics in doc["results"].items():
        print(f"  {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    if args.output:
        write_json(expand(args.output), doc)
    return 0

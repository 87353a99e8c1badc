"""`llmctl export RUN --format hf OUT`: a run's model as a Hugging Face transformers directory.

Writes safetensors weights, config.json with the modeling code (loaded with `trust_remote_code=True`),
generation_config.json, and the tokenizer (tokenizer.json with the chat template) to OUT, any storage URL
(a path, file://, s3://). `--stage sft` (default) exports the chat model, `--stage base` the pretrained one;
`--step N` a given checkpoint. An OUT that exists and is not empty is refused unless `--force`. The library
is trainer/hf_export/export.py; what the directory holds and how to use it: docs/export.md.

Examples:
  llmctl export gpt-d4-2xcpu-1a2b3c4d --format hf ./my-model
  llmctl export s3://bucket/runs/my-run --stage base --format hf s3://bucket/exports/my-run-base
"""

from __future__ import annotations

import argparse

from cli.errors import UsageError

FORMATS = ("hf",)


def register(sub) -> None:
    from trainer.hf_export import STAGES  # a dict in a docstring-only package: start-up stays light

    p = sub.add_parser("export", help="write a run's model out as a Hugging Face transformers directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run name (under --storage) or the run's URL/path")
    p.add_argument("out", metavar="OUT", help="where to write the export (path, file://, s3://)")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf: Hugging Face transformers")
    p.add_argument("--stage", default="sft", choices=tuple(STAGES),
                   help="sft: the chat model (default), base: the pretrained one")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest whole one)")
    p.add_argument("--force", action="store_true", help="overwrite an OUT that is not empty")
    p.add_argument("--storage", default="file://~/.cache/llmctl", help="storage root where run names are looked up")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from trainer import run_loader
    from trainer.hf_export.export import ExportError, export_run
    from trainer.storage import expand, run_url, storage_options_from_env

    url = run_url(args.run, args.storage)
    out = expand(args.out).rstrip("/")
    opts = storage_options_from_env() if url.startswith("s3") else {}
    out_opts = storage_options_from_env() if out.startswith("s3") else {}
    try:
        done = export_run(url, out, stage=args.stage, step=args.step, storage_options=opts,
                          out_storage_options=out_opts, force=args.force)
    except run_loader.RunLoadError as e:
        if str(e).startswith("no run at"):
            raise UsageError(f"run {args.run!r} not found: no plan.json at {url}") from None
        raise UsageError(f"run {args.run!r}: {e}") from None
    except ExportError as e:
        raise UsageError(f"export: {e}") from None
    print(f"exported {done.run} ({done.stage} step {done.step}) to {done.out}: {', '.join(done.files)}")
    where = done.out[len("file://"):] if done.out.startswith("file://") else done.out
    print(f"load it with AutoModelForCausalLM.from_pretrained({where!r}, trust_remote_code=True) (docs/export.md)")
    return 0

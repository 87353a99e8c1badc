"""`llmctl report RUN`: print a run's report card (plan vs measured, loss and bpb, CORE, samples).

Prints `<run>/report.md`; builds it first (trainer/report.py `write_report`) when the run has none yet or
with `--refresh` (e.g. while a run is still going). `-o json` prints report.json instead.

Examples:
  llmctl report gpt-d4-2xcpu-1a2b3c4d
  llmctl report s3://bucket/runs/my-run --refresh -o json
"""

from __future__ import annotations

import argparse

from cli.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("report", help="print a run's report card", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run name (under --storage) or the run's URL/path")
    p.add_argument("--refresh", action="store_true", help="rebuild the report from the run's files first")
    p.add_argument("-o", "--output", default="md", choices=("md", "json"), help="markdown (default) or json")
    p.add_argument("--storage", default="file://~/.cache/llmctl", help="storage root where run names are looked up")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from cli.safe import clean, dump_json
    from trainer.report import gather, write_report
    from trainer.storage import RunNotFound, read_json, read_plan, run_url
    from trainer.stored import StoredPlanError

    url = run_url(args.run, args.storage)
    opts = {}
    if url.startswith("s3"):
        from trainer.storage import storage_options_from_env

        opts = storage_options_from_env()
    try:
        read_plan(url, opts)
    except RunNotFound:
        raise UsageError(f"run {args.run!r} not found: no plan.json at {url}") from None
    except ValueError as e:
        raise UsageError(f"run {args.run!r}: plan.json is not valid JSON ({e})") from None
    name = "report.json" if args.output == "json" else "report.md"
    # Stored files are untrusted: a plan that names unknown stages is refused, files not in the shape llmctl
    # writes are one line, and what is printed has no terminal escapes (cli/safe.py).
    try:
        if args.refresh or read_json(f"{url}/report.json", opts) is None:
            write_report(url, opts)
        if args.output == "json":
            print(dump_json(read_json(f"{url}/{name}", opts) or gather(url, opts)))
            return 0
    except StoredPlanError as e:
        raise UsageError(f"run {args.run!r}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a stored file not in the shape we wrote
        raise UsageError(f"run {args.run!r}: its files are not a run's ({type(e).__name__}: {e})") from None
    import fsspec

    with fsspec.open(f"{url}/{name}", "r", **opts) as f:
        print(clean(f.read(1 << 24)), end="")  # a report is a few KB; never print more than 16 MiB
    return 0

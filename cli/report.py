"""`llmctl report RUN`: print a run's report card (plan vs measured, loss and bpb, CORE, samples).

Prints `<run>/report.md`; builds it first (trainer/report.py `write_report`: report.md, report.json, the
curves loss.png and bpb.png, and the self-contained report.html) when the run has none yet or with
`--refresh` (e.g. while a run is still going). `-o json` prints report.json instead. `--open` rebuilds the
report and opens the report.html it just built, from a private local copy, in the web browser instead of
printing (a report.html found in storage is never what opens: anyone who can write the run could plant one).

Examples:
  llmctl report gpt-d4-2xcpu-1a2b3c4d --open
  llmctl report s3://bucket/runs/my-run --refresh -o json
"""

from __future__ import annotations

import argparse
import os

from cli.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("report", help="print a run's report card", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run name (under --storage) or the run's URL/path")
    p.add_argument("--refresh", action="store_true", help="rebuild the report from the run's files first")
    p.add_argument("-o", "--output", default="md", choices=("md", "json"), help="markdown (default) or json")
    p.add_argument("--open", action="store_true", help="open report.html (curves embedded) in the web browser")
    p.add_argument("--storage", default="file://~/.cache/llmctl", help="storage root where run names are looked up")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from cli.console import clean, dump_json
    from trainer.report import gather, write_report
    from trainer.report import write_report_files
    from trainer.storage import DocumentTooLarge, RunNotFound, UnsafeFile, read_json, read_plan, read_text, run_url
    from trainer.plan.stored_plan import StoredPlanError

    url = run_url(args.run, args.storage)
    opts = {}
    if url.startswith("s3"):
        from trainer.storage import storage_options_from_env

        opts = storage_options_from_env()
    try:
        read_plan(url, opts)
    except RunNotFound:
        raise UsageError(f"run {args.run!r} not found: no plan.json at {url}") from None
    except (DocumentTooLarge, UnsafeFile) as e:
        raise UsageError(f"run {args.run!r}: {e}") from None
    except ValueError as e:
        raise UsageError(f"run {args.run!r}: plan.json is not valid JSON ({e})") from None
    name = "report.json" if args.output == "json" else "report.md"
    # Stored files are untrusted: a plan that names unknown stages is refused, files not in the shape llmctl
    # writes are one line, and what is printed has no terminal escapes (trainer/text.py).
    try:
        if args.open:  # the page built now, from the escaped report: never a report.html found in storage
            return open_html(write_report_files(url, opts)["report.html"])
        if args.refresh or read_json(f"{url}/report.json", opts) is None:
            write_report(url, opts)
        if args.output == "json":
            print(dump_json(read_json(f"{url}/{name}", opts) or gather(url, opts)))
            return 0
    except StoredPlanError as e:
        raise UsageError(f"run {args.run!r}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a stored file not in the shape we wrote
        raise UsageError(f"run {args.run!r}: its files are not a run's ({type(e).__name__}: {e})") from None
    try:  # a report is a few KB; never read more than 16 MiB, never through a link
        text = read_text(f"{url}/{name}", 1 << 24, opts)
    except ValueError as e:
        raise UsageError(f"run {args.run!r}: {e}") from None
    print(clean(text or "", newlines=True), end="")
    return 0


def open_html(page: str) -> int:
    """Open `page` (the report.html just built) with the `webbrowser` module (which honours $BROWSER), from a
    private copy (a new 0700 directory): a stored report.html, which anyone who can write the run could have
    planted, is never what opens. Prints what it opened."""
    import pathlib
    import tempfile
    import webbrowser

    local = pathlib.Path(tempfile.mkdtemp(prefix="llmctl-report-")) / "report.html"
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(page)
    target = local.resolve().as_uri()
    print(f"opening {target}")
    if not webbrowser.open(target):
        print("no web browser found; open that file yourself")
    return 0

"""`llmctl cost [--since DATE] [--storage URL]`: what runs really cost, from each run's spend ledger.

Reads `<storage>/runs/*/spend.json` (trainer/spend.py: GPU time per attempt, heartbeated, across retries,
preemptions and resubmits) and the run's plan for its estimate, and prints one row per run plus a total:
attempts, restarts, GPU-hours, dollars spent against the estimate. With --since, only the GPU time after
that instant counts (an attempt that straddles it is prorated). Stored files are untrusted: read bounded and
validated (trainer/spend.py `read_spend`); a run whose files cannot be read is a warning, not a failure, and
run directory names (anyone who can write the bucket names them) are printed without terminal escapes
(trainer/text.py `clean`).

Examples:
  llmctl cost
  llmctl cost --since 2026-11-01 --storage s3://team-bucket/llmctl -o json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from cli.errors import CLIError, UsageError
from trainer.text import clean

if TYPE_CHECKING:
    import datetime

PLAN_MAX_BYTES = 1024 * 1024  # a plan is ~10 KB


def parse_since(text: str) -> datetime.datetime:
    """`2026-11-01` or an ISO 8601 instant (`2026-11-01T12:00:00Z`); naive times are UTC (trainer.spend.parse_iso,
    the one ISO-time parser)."""
    from trainer.spend import parse_iso

    t = parse_iso(text.strip())
    if t is None:
        raise UsageError(f"--since: expected a date like 2026-11-01 or 2026-11-01T12:00:00Z, got {text!r}")
    return t


def seconds_since(row: dict, since: datetime.datetime | None) -> float:
    """The part of one attempt's seconds that falls after `since` (all of it without one)."""
    from trainer.spend import parse_iso

    if since is None:
        return row["seconds"]
    last = parse_iso(row["last"])
    if last is None or last <= since:
        return 0.0
    return min(row["seconds"], (last - since).total_seconds())


def run_cost(url: str, opts: dict | None, since: datetime.datetime | None) -> dict | None:
    """One run's row, or None when it has no spend ledger (or nothing after `since`)."""
    from trainer.spend import gpu_seconds as spend_gpu_seconds
    from trainer.spend import read_spend
    from trainer.storage import read_small_json

    spend = read_spend(url, opts)
    if not spend or not spend["attempts"]:
        return None
    rows = [(a, seconds_since(a, since)) for a in spend["attempts"]]
    rows = [(a, s) for a, s in rows if s > 0 or since is None]
    if not rows:
        return None
    price = spend["price_per_gpu_hour"] or 0.0
    gpu_seconds = sum(spend_gpu_seconds(a, None if since is None else s) for a, s in rows)  # each at its sizes
    estimate = None
    name = clean(url.rsplit("/", 1)[-1], limit=100)
    try:
        plan = read_small_json(f"{url}/plan.json", PLAN_MAX_BYTES, opts)
        est = plan.get("estimate") if isinstance(plan, dict) else None
        value = est.get("total_dollars") if isinstance(est, dict) else None
        estimate = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if plan is not None and estimate is None:  # a plan.json, but not a run's: its spend still counts
            print(f"warning: {name}: plan.json has no estimate llmctl can read (estimate not shown)", file=sys.stderr)
    except (ValueError, OSError):
        print(f"warning: {name}: plan.json cannot be read (estimate not shown)", file=sys.stderr)
    return {"run": name, "url": url, "attempts": len(rows),
            "restarts": max(0, len(rows) - 1), "lost_attempts": sum(a["state"] == "lost" for a, _ in rows),
            "running": spend["attempts"][-1]["state"] == "running", "gpu_hours": gpu_seconds / 3600,
            "dollars": gpu_seconds / 3600 * price, "estimate_dollars": estimate,
            "first": rows[0][0]["start"], "last": rows[-1][0]["last"]}


def cmd_cost(args) -> int:
    from trainer.plan.urls import DEFAULT_STORAGE
    from trainer.storage import expand, filesystem, storage_options_from_env

    since = parse_since(args.since) if args.since else None
    root = expand(args.storage or DEFAULT_STORAGE).rstrip("/")
    opts = storage_options_from_env() if root.startswith(("s3://", "s3a://")) else None
    runs_url = f"{root}/runs"
    try:
        fs, path = filesystem(runs_url, opts)
        names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
    except FileNotFoundError:
        names = []
    except Exception as e:  # noqa: BLE001 - storage errors (auth, network) as one line
        raise CLIError(f"cannot list runs under {runs_url}: {type(e).__name__}: {e}") from None
    rows = []
    for name in names:
        try:
            row = run_cost(f"{runs_url}/{name}", opts, since)
        except Exception as e:  # noqa: BLE001 - one unreadable run must not hide the others
            print(clean(f"warning: skipping {name}: cannot read its spend.json ({type(e).__name__}: {e})", limit=400),
                  file=sys.stderr)
            continue
        if row:
            rows.append(row)
    total = {"runs": len(rows), "gpu_hours": sum(r["gpu_hours"] for r in rows),
             "dollars": sum(r["dollars"] for r in rows), "restarts": sum(r["restarts"] for r in rows)}
    if args.output == "json":
        print(json.dumps({"storage": root, "since": since.isoformat() if since else None, "runs": rows,
                          "total": total}, indent=2))
        return 0
    if not rows:
        print(f"no spend recorded under {runs_url}" + (f" since {args.since}" if since else ""), file=sys.stderr)
        return 0
    table = [["RUN", "ATTEMPTS", "RESTARTS", "GPU-H", "SPENT", "ESTIMATE", "LAST"]]
    for r in rows:
        table.append([r["run"] + (" (running)" if r["running"] else ""), str(r["attempts"]), str(r["restarts"]),
                      f"{r['gpu_hours']:,.2f}", f"${r['dollars']:,.2f}",
                      f"${r['estimate_dollars']:,.2f}" if r["estimate_dollars"] is not None else "-", r["last"]])
    table.append(["total", "", str(total["restarts"]), f"{total['gpu_hours']:,.2f}", f"${total['dollars']:,.2f}",
                  "", ""])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table))
    return 0


def register(sub) -> None:
    p = sub.add_parser("cost", help="what runs really cost (GPU time across retries), per run and in total",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--since", metavar="DATE", help="only GPU time after this date or instant (UTC)")
    p.add_argument("--storage", help="storage root whose runs/ to read (default: file://~/.cache/llmctl)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=cmd_cost)

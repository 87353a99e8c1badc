"""`llmctl logs RUN --rank N --attempt K` (and a finished run's `llmctl logs RUN`): the logs the run shipped to
its storage (trainer/logship.py: `<run>/logs/attempt-<K>/<driver|rank-N>/<chunks>`), read after the pods, the
RayCluster and even the RayJob are gone. No Kubernetes API access is needed for the logs themselves; the
cluster is asked only for the run's storage URL (its RayJob's `llmctl.dev/storage` annotation), which
`--local`/`--storage` replace.
"""

from __future__ import annotations

import re
import sys

from cli.console import clean, say
from cli.errors import CLIError

_ATTEMPT = re.compile(r"attempt-(\d+)$")
MAX_CHUNK_BYTES = 64 << 20  # a shipped chunk is at most ~1 MiB (plus what piled up while storage was down)


def attempts(run_url: str, storage_options: dict | None = None) -> dict[int, list[str]]:
    """{attempt: [who, ...]} of the shipped logs under a run."""
    from trainer.logship import LOGS
    from trainer.storage import filesystem

    fs, path = filesystem(f"{run_url.rstrip('/')}/{LOGS}", storage_options)
    out: dict[int, list[str]] = {}
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return out
    for entry in entries:
        m = _ATTEMPT.search(entry.rstrip("/"))
        if not m:
            continue
        try:
            whos = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(entry, detail=False))
        except FileNotFoundError:
            whos = []
        out[int(m[1])] = whos
    return out


def read_shipped(run_url: str, who: str, attempt: int | None = None, storage_options: dict | None = None):
    """(attempt, text) of one shipped log: the chunks of `who` in `attempt` (default: the newest attempt that
    has it), concatenated in order."""
    from trainer.logship import who_dir
    from trainer.storage import filesystem

    found = attempts(run_url, storage_options)
    if not found:
        raise CLIError(f"no shipped logs under {run_url}/logs (a run ships them from its first output; is this "
                       f"the right --storage?)")
    if attempt is None:
        have = [k for k, whos in found.items() if who in whos]
        if not have:
            raise CLIError(f"no {who} log in any attempt under {run_url}/logs; there are: {_listing(found)}")
        attempt = max(have)
    elif attempt not in found or who not in found[attempt]:
        raise CLIError(f"no {who} log for attempt {attempt} under {run_url}/logs; there are: {_listing(found)}")
    fs, path = filesystem(who_dir(run_url, attempt, who), storage_options)
    parts = []
    for name in sorted(fs.ls(path, detail=False)):
        if not name.endswith(".log"):
            continue
        if (fs.size(name) or 0) > MAX_CHUNK_BYTES:
            parts.append(f"[llmctl: chunk {name.rsplit('/', 1)[-1]} skipped: over {MAX_CHUNK_BYTES >> 20} MiB]\n")
            continue
        parts.append(fs.cat_file(name).decode("utf-8", errors="replace"))
    return attempt, "".join(parts)


def _listing(found: dict[int, list[str]]) -> str:
    return "; ".join(f"attempt {k}: {', '.join(v) or '-'}" for k, v in sorted(found.items()))


def who_of(args) -> str:
    from trainer.logship import rank_name

    return rank_name(args.rank) if getattr(args, "rank", None) is not None else "driver"


def run_storage_url(args) -> str:
    """The run's URL: `--local` (with `--storage`, default the local runs' root) or `--storage` alone skip the
    cluster; otherwise the RayJob's storage annotation."""
    from trainer.storage import run_url

    if getattr(args, "local", False) or getattr(args, "storage", None):
        from trainer.plan.urls import DEFAULT_STORAGE

        return run_url(args.run, args.storage or DEFAULT_STORAGE)
    from cli.kube.client import connect
    from cli.kube.runs import get_run

    rj = get_run(connect(args), args.run)
    url = (rj.get("metadata", {}).get("annotations") or {}).get("llmctl.dev/storage")
    if not url:
        raise CLIError(f"RayJob {args.run} has no llmctl.dev/storage annotation; give --storage")
    return url


def print_shipped(run_url: str, args) -> int:
    who = who_of(args)
    attempt, text = read_shipped(run_url, who, getattr(args, "attempt", None))
    found = attempts(run_url)
    say(clean(f"shipped log of {who}, attempt {attempt} of {max(found)}, from {run_url}/logs"))
    if getattr(args, "tail", None) is not None:
        text = "".join(text.splitlines(keepends=True)[-args.tail:]) if args.tail > 0 else ""
    sys.stdout.write(clean(text, newlines=True))  # no terminal escapes from stored text
    sys.stdout.flush()
    return 0


def cmd_logs_shipped(args) -> int:
    if getattr(args, "follow", False):
        raise CLIError("--follow reads a live pod; shipped logs (--rank, --attempt, --local) are read as they are")
    return print_shipped(run_storage_url(args), args)

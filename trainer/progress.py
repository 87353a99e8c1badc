"""Progress, as people see it while something runs: a console bar for the CLI's long commands, and
`<run>/progress.json`, the document a run's rank 0 writes to the run's storage at each checkpoint and
`llmctl status` reads back.

Why storage and not the RayJob: worker pods run without a Kubernetes API token
(`automountServiceAccountToken: false`), but every pod already reaches the run's storage. So the run needs
no RBAC at all to report progress, and a run can no longer touch any RayJob of its namespace.

The reader treats the file as untrusted (anything with write access to the bucket can put anything there):
bounded size, known keys only, numbers finite and non-negative, strings stripped of control characters
and bounded in length. Anything else is dropped, never printed.
"""

from __future__ import annotations

import datetime
import math
import sys
from pathlib import Path
from typing import Callable

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")  # a pod's own namespace
PROGRESS_FILE = "progress.json"  # <run>/progress.json
MAX_DOCUMENT_BYTES = 64 * 1024  # a progress document is ~300 bytes; 64 KiB leaves room and bounds a hostile one
MAX_STRING = 64  # stage names are short ("pretrain", "sft", "eval")

# key -> kind: what `write_progress` writes and `read_progress` accepts
FIELDS = {"stage": "str", "step": "int", "steps": "int", "tokens": "int", "cost_dollars": "num",
          "eta_seconds": "num", "kept_seconds": "num", "spent_gpu_seconds": "num", "updated": "str"}


class progress_bar:
    """A rich progress bar on stderr when asked (and a no-op otherwise); `advance(n)` inside the block."""

    def __init__(self, show: bool, what: str, total: int | None):
        self.show, self.what, self.total, self._p = show, what, total, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import Progress

        self._p = Progress(console=Console(file=sys.stderr), transient=False)
        self._p.start()
        task = self._p.add_task(self.what, total=self.total)
        return lambda n: self._p.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_progress(run_url: str, progress: dict, storage_options: dict | None = None) -> None:
    """Rank 0, at each checkpoint: `<run>/progress.json`, atomically (a reader sees the old or the new).

    Keys (all optional): stage, step, steps, tokens, cost_dollars, eta_seconds, kept_seconds (run seconds
    whose work is kept: earlier stages plus this stage up to the step); `updated` is added here."""
    from trainer.storage import write_json

    unknown = sorted(set(progress) - set(FIELDS))
    if unknown:
        raise ValueError(f"progress: unknown key(s) {', '.join(unknown)}")
    write_json(f"{run_url}/{PROGRESS_FILE}", dict(progress, updated=utc_now()), storage_options)


def clean_text(value, limit: int = MAX_STRING) -> str:
    """An untrusted string fit for one terminal line: printable characters only, at most `limit` of them."""
    return "".join(c for c in str(value) if c.isprintable())[:limit]


def clean_number(value, kind: str):
    """A finite, non-negative number of the kind asked for, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0 or value > 1e18:
        return None
    return int(value) if kind == "int" else float(value)


def sanitize(doc, fields: dict[str, str] = FIELDS) -> dict:
    """Only the known keys of an untrusted document, each of its kind; everything else dropped."""
    if not isinstance(doc, dict):
        return {}
    out = {}
    for key, kind in fields.items():
        if key not in doc:
            continue
        value = clean_text(doc[key]) if kind == "str" and isinstance(doc[key], str) else (
            None if kind == "str" else clean_number(doc[key], kind))
        if value is not None and value != "":
            out[key] = value
    return out


def read_progress(run_url: str, storage_options: dict | None = None) -> dict | None:
    """`<run>/progress.json`, validated (`sanitize`); None when there is none. Raises ValueError/OSError when
    it cannot be read (too large, not JSON, storage unreachable): the caller words a warning."""
    from trainer.storage import read_small_json

    doc = read_small_json(f"{run_url}/{PROGRESS_FILE}", MAX_DOCUMENT_BYTES, storage_options)
    return None if doc is None else sanitize(doc)

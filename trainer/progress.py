"""Progress, as people see it while something runs: a console bar for the CLI's long commands, one bar per
stage of a local run, and `<run>/progress.json`, the document a run's rank 0 writes to the run's storage at
each checkpoint and `llmctl status` reads back.

A local run's workers print nothing to the console (their output and Ray's stay in Ray's log files): rank 0
appends one JSON line per log interval and per val pass to a local progress file (`ProgressFile`, named by
`StageConfig.progress_file`), and the driver follows that file (`StageBars`) and draws one rich bar per stage:
step/steps, tokens/s, loss, val bpb, dollars where priced, ETA; a worker group's restart is one line above them.

Why storage and not the RayJob: worker pods run without a Kubernetes API token
(`automountServiceAccountToken: false`), but every pod already reaches the run's storage. So the run needs
no RBAC at all to report progress, and a run can no longer touch any RayJob of its namespace.

The reader treats the file as untrusted (anything with write access to the bucket can put anything there):
bounded size, known keys only, numbers finite and non-negative, strings stripped of control characters
and bounded in length. Anything else is dropped, never printed.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from typing import Callable

from trainer.text import clean

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


class spinner:
    """A rich spinner on stderr for work with no count to show (loading a model, BPE merges) when asked and
    stderr is a terminal; nothing at all otherwise, so captured output stays clean. `start()`/`stop()` or a
    with block; stop is idempotent."""

    def __init__(self, show: bool, what: str):
        self.show, self.what, self._s = show, what, None

    def start(self) -> None:
        if self.show and self._s is None and sys.stderr.isatty():
            from rich.console import Console
            from rich.text import Text

            what = Text(clean(self.what, limit=200))  # may name a stored run: printable only, no markup
            self._s = Console(file=sys.stderr).status(what)
            self._s.start()

    def stop(self) -> None:
        if self._s is not None:
            self._s.stop()
            self._s = None

    def __enter__(self) -> "spinner":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ProgressFile:
    """Rank 0's side: append one JSON object per line (opened per write, so a restarted worker just goes on)."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, **fields) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")


POLL_S = 0.5  # how often the driver re-reads the progress file (a display refresh, not a synchronisation)


class StageBars:
    """The driver's side: follow a progress file in a thread and draw one rich bar per stage on `console`
    (stderr by default). Off a terminal rich draws each bar once, when it is done, so a captured console
    gets one line per stage. Use as a context manager around the run."""

    def __init__(self, path: str, stages: list[tuple[str, int]], *, priced: bool, console=None):
        from rich.console import Console

        self.path, self.priced = path, priced
        self.console = console or Console(file=sys.stderr)
        self.stages = dict(stages)
        self._offset, self._tasks, self._stop = 0, {}, None
        self._progress = None

    def __enter__(self) -> "StageBars":
        import threading

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Column

        # On a narrow terminal (80 columns) the bar shrinks and the info's tail is cut, never the stage, its
        # step count or the elapsed time: rich otherwise squeezes every column alike ("70/7…", "0:02:…").
        fixed = dict(no_wrap=True)
        self._progress = Progress(TextColumn("{task.description:<9}", table_column=Column(min_width=9, **fixed)),
                                  BarColumn(bar_width=24, table_column=Column(min_width=8)),
                                  MofNCompleteColumn(table_column=Column(min_width=9, **fixed)),
                                  TimeElapsedColumn(table_column=Column(min_width=7, **fixed)),
                                  TextColumn("{task.fields[info]}", table_column=Column(overflow="ellipsis", **fixed)),
                                  console=self.console, transient=False, refresh_per_second=4)
        self._progress.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="llmctl-stage-bars", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last lines
        self._progress.stop()

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        """Read what the workers appended since the last poll and update the bars."""
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind("\n") + 1  # a half-written last line waits for the next poll
        self._offset += len(chunk[:end].encode())
        for line in chunk[:end].splitlines():
            try:
                self.update(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # a line we do not understand is not worth stopping the run's display for

    def update(self, ev: dict) -> None:
        if "restart" in ev:  # a worker group restarted (trainer/restarts.py): one line above the bars
            from rich.text import Text

            self._progress.console.print(Text(clean(ev["restart"], limit=400)))
            return
        stage = ev["stage"]
        if stage not in self._tasks:
            total = ev.get("steps") or self.stages.get(stage)
            self._tasks[stage] = [self._progress.add_task(stage, total=total, info=""), {}]
        task, state = self._tasks[stage]
        state.update({k: v for k, v in ev.items() if v is not None})
        self._progress.update(task, completed=state.get("step", 0), total=state.get("steps"),
                              info=self.info(state))

    def info(self, s: dict) -> str:
        parts = []
        if "tokens_per_second" in s:
            parts.append(f"{s['tokens_per_second']:,.0f} tok/s")
        if "loss" in s:
            parts.append(f"loss {s['loss']:.3f}")
        if "val_bpb" in s:
            parts.append(f"val bpb {s['val_bpb']:.3f}")
        if self.priced and "dollars" in s:
            parts.append(f"${s['dollars']:,.2f}")
        if s.get("eta_seconds") and s.get("step", 0) < (s.get("steps") or 0):
            parts.append(f"ETA {_clock(s['eta_seconds'])}")
        return "  ".join(parts)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


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
        value = clean(doc[key], limit=MAX_STRING) if kind == "str" and isinstance(doc[key], str) else (
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

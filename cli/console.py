"""The CLI's console: what every command uses to talk to the person at the terminal, and nothing else.

- `say` writes notes, warnings and next steps to stderr, so stdout stays the result (`-o json` parseable).
- `confirm`, `require_yes`, `interactive`: ask before an action, and never prompt off a terminal.
- `wait_until`: bounded polling (never forever); `POLL_SECONDS` and `WAIT_SECONDS` are its defaults.
- `clean` (trainer/text.py, the one cleaner): text from the cluster or storage without terminal escapes, at
  every print site of such text (status, list, logs, report, chat, error lines).
- `dump_json` (strict: no NaN/Infinity), `dump_objects` / `to_yaml` (Kubernetes objects as printed by
  `--dry-run`), `fmt_hours`.

Start-up: imported by command modules at load time, so it imports only the standard library (yaml only
inside `to_yaml`).
"""

from __future__ import annotations

import json
import math
import sys

from cli.errors import UsageError
from trainer.text import clean

__all__ = ["POLL_SECONDS", "WAIT_SECONDS", "clean", "confirm", "dump_json", "dump_objects", "fmt_hours", "interactive",
           "require_yes", "say", "to_yaml", "wait_until"]

POLL_SECONDS = 2.0  # between polls of a pending pod's log or a RayJob being deleted (tests set 0)
WAIT_SECONDS = 300.0  # the most `logs -f` waits for a pod to start, or submit for a deleted run to go


def say(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def require_yes(args, action: str) -> None:
    """Never prompt off a terminal: without --yes there, refuse before touching the cluster."""
    if not args.yes and not interactive():
        raise UsageError(f"{action}: stdin is not a terminal, so nobody can confirm; pass --yes")


def wait_until(done, *, timeout: float | None = None, interval: float | None = None) -> bool:
    """Poll `done()` until it returns true or `timeout` seconds pass (bounded waits, never forever)."""
    import time

    timeout = WAIT_SECONDS if timeout is None else timeout
    interval = POLL_SECONDS if interval is None else interval
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def fmt_hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.2f} h"


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dump_json(obj, indent: int | None = 2) -> str:
    """Strict JSON for `-o json`: NaN and infinities (from a stored or reported number) become null."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


_DUMPER = None


def to_yaml(objs: list[dict]) -> str:
    """Objects as a YAML stream, keys in build order, block style, no anchors, multi-line strings (the RayJob's
    runtimeEnvYAML) as literal `|` blocks: what `--dry-run -o yaml` prints."""
    global _DUMPER
    import yaml

    if _DUMPER is None:
        class Dumper(yaml.SafeDumper):
            def ignore_aliases(self, data) -> bool:
                return True

        Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
            "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
        _DUMPER = Dumper
    return yaml.dump_all(objs, Dumper=_DUMPER, sort_keys=False, width=1 << 20)


def dump_objects(objs: list[dict], fmt: str) -> str:
    """Kubernetes objects as `-o yaml|json` prints them (several in JSON: a v1 List)."""
    if fmt == "json":
        return json.dumps(objs[0] if len(objs) == 1 else {"apiVersion": "v1", "kind": "List", "items": objs},
                          indent=2)
    return to_yaml(objs).rstrip("\n")

"""What a run really cost: `<run>/spend.json`, a ledger of GPU time per attempt, kept in the run's storage.

A run may take several attempts: a RayJob retry (a fresh Ray cluster after a failure; KubeRay resets the
RayJob's `status.startTime` each time), a preemption, a cancel and resubmit. Each attempt's launcher
(trainer/launch.py) opens a row when it starts, heartbeats it (every HEARTBEAT_SECONDS: `last` and
`seconds` move on) and closes it when it ends. An attempt killed without a goodbye (a lost node, SIGKILL)
keeps the time up to its last heartbeat: the next attempt marks it `lost`. So the ledger undercounts by at
most one heartbeat per lost attempt, and never forgets an attempt.

    {"schema": 1, "run": "...", "price_per_gpu_hour": 2.0,
     "attempts": [{"start": ISO, "last": ISO, "gpus": 8, "seconds": 18000.0, "state": "lost",
                   "segments": [[0.0, 8], [7200.5, 4]]}, ...],
     "totals": {...}}   # `totals(doc)`; readers recompute it and never trust the stored copy

An elastic attempt changes size while it runs (a lost node shrinks the worker group, returning capacity
grows it). Rank 0 of every worker group that starts appends (time, world size) to `<run>/workers.json`
(`record_world`); the launcher folds those changes into its row at each heartbeat as `segments`
([seconds since the attempt's start, GPUs from then on]; `gpus` is the size now), so GPU-seconds = the sum
over segments of world size x seconds. A row without segments ran at `gpus` throughout. A change counts from
the moment the new group starts, so the time between a group's loss and its successor's start is still
priced at the old size: the ledger errs towards paying more, never less.

Dollars = GPU-seconds / 3600 x the plan's price per GPU-hour (trainer/plan/pricing.py's convention). Time lost to
restarts = paid wall seconds - the seconds whose work the run kept (progress.json's kept_seconds while it
runs, summary.json's hours once it ended): start-up, redone steps after a resume, the last minutes of a
killed attempt. Readers (llmctl status, report, cost) treat the file as untrusted: `read_spend` bounds its
size and validates every field (trainer/progress.py's rules).
"""

from __future__ import annotations

import datetime
import os
import secrets
import sys
import threading
import time
from contextlib import contextmanager

from trainer.progress import MAX_STRING, clean_number
from trainer.text import clean

SPEND_FILE = "spend.json"
WORKERS_FILE = "workers.json"  # {"changes": [[unix time, world size], ...]}: each worker group's start
SCHEMA = 1
MAX_SEGMENTS = 1000  # size changes kept per attempt (and in workers.json); past it, the last size is kept
HEARTBEAT_SECONDS = 60.0  # a killed attempt loses at most this much from the ledger; env LLMCTL_SPEND_HEARTBEAT_SECONDS
MAX_DOCUMENT_BYTES = 1024 * 1024  # ~150 bytes an attempt: thousands of attempts fit
MAX_ATTEMPTS = 5000
STATES = ("running", "finished", "failed", "lost")
# A row's times must fall in these years: a stored 0001 or 9999 (with an offset, a year 0 or 10000 once in UTC)
# is a malformed row, dropped alone; it must not make the whole ledger unreadable.
FIRST_YEAR, LAST_YEAR = 1970, 2999


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(ts) -> datetime.datetime | None:
    if not isinstance(ts, str):
        return None
    try:
        t = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def _row_time(ts) -> str | None:
    """A row's stored time, checked and normalised (`_iso`), or None when it is not a time in FIRST_YEAR ..
    LAST_YEAR (any offset from UTC included)."""
    t = parse_iso(ts)
    if t is None:
        return None
    try:
        stamp = t.timestamp()
        if not FIRST_YEAR <= datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).year <= LAST_YEAR:
            return None
        return _iso(stamp)
    except (ValueError, OverflowError, OSError):
        return None


def gpu_seconds(row: dict, last: float | None = None) -> float:
    """One attempt's GPU-seconds: the sum over its segments of GPUs x seconds (all at `gpus` without any);
    of its `last` seconds only, when given (`llmctl cost --since`)."""
    end, segments = row["seconds"], row.get("segments") or [[0.0, row["gpus"]]]
    begin = 0.0 if last is None else max(0.0, end - last)
    cuts = [at for at, _ in segments[1:]] + [end]
    return sum(g * max(0.0, min(b, end) - max(a, begin)) for (a, g), b in zip(segments, cuts))


def totals(doc: dict) -> dict:
    """attempts, restarts (attempts - 1), lost_attempts, seconds (wall, summed), gpu_seconds, dollars."""
    rows = doc.get("attempts") or []
    price = doc.get("price_per_gpu_hour") or 0.0
    gpu_seconds_ = sum(gpu_seconds(a) for a in rows)
    return {"attempts": len(rows), "restarts": max(0, len(rows) - 1),
            "lost_attempts": sum(a["state"] == "lost" for a in rows),
            "seconds": sum(a["seconds"] for a in rows), "gpu_seconds": gpu_seconds_,
            "dollars": gpu_seconds_ / 3600 * price}


def sanitize(doc) -> dict:
    """The ledger's known fields, each checked; rows with a bad field (times outside FIRST_YEAR..LAST_YEAR
    included) are dropped alone, and counted in `dropped`. Totals recomputed."""
    if not isinstance(doc, dict):
        return {"attempts": [], "price_per_gpu_hour": None, "run": None, "totals": totals({}), "dropped": 0}
    rows, dropped = [], 0
    for a in (doc.get("attempts") if isinstance(doc.get("attempts"), list) else [])[:MAX_ATTEMPTS]:
        row = _clean_row(a)
        if row is None:
            dropped += 1
        else:
            rows.append(row)
    out = {"run": clean(doc["run"], limit=MAX_STRING) if isinstance(doc.get("run"), str) else None,
           "price_per_gpu_hour": clean_number(doc.get("price_per_gpu_hour"), "num"), "attempts": rows}
    out["totals"] = totals(out)
    out["dropped"] = dropped
    return out


def _clean_row(a) -> dict | None:
    if not isinstance(a, dict):
        return None
    gpus, seconds = clean_number(a.get("gpus"), "int"), clean_number(a.get("seconds"), "num")
    start, last = _row_time(a.get("start")), _row_time(a.get("last"))
    segments = _clean_segments(a.get("segments"))
    if gpus is None or seconds is None or start is None or last is None or a.get("state") not in STATES \
            or segments is False:
        return None
    ident = a.get("id")
    return {"start": start, "last": last, "gpus": gpus, "seconds": seconds, "state": a["state"],
            **({"segments": segments} if segments else {}),
            **({"id": ident} if isinstance(ident, str) and 0 < len(ident) <= 32 and ident.isalnum() else {})}


def _clean_segments(value) -> list | None | bool:
    """A row's segments checked ([[seconds >= 0, GPUs], ...], ascending, the first at 0), None when absent,
    False when malformed (the row is then dropped, like a row with any other bad field)."""
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_SEGMENTS:
        return False
    out = []
    for seg in value:
        if not isinstance(seg, list) or len(seg) != 2:
            return False
        at, g = clean_number(seg[0], "num"), clean_number(seg[1], "int")
        if at is None or g is None or isinstance(seg[1], float) or (out and at < out[-1][0]):
            return False
        out.append([at, g])
    return out if out[0][0] == 0 else False


def record_world(run_url: str, world: int, storage_options: dict | None = None, clock=time.time) -> None:
    """Note, from rank 0 of a worker group that starts, that the run now runs on `world` GPUs (see the module
    docstring). Never fatal: a ledger that misses a change prices the attempt at its previous size."""
    from trainer.storage import update_json

    url = f"{run_url}/{WORKERS_FILE}"
    try:
        # Several groups may start at once: a lock (local files) or a conditional write (S3) keeps every change;
        # a file that is not JSON or too large is started again (only changes after an attempt began count).
        update_json(url, lambda doc: {"changes": (_clean_changes(doc) + [[clock(), world]])[-MAX_SEGMENTS:]},
                    storage_options, max_bytes=MAX_DOCUMENT_BYTES, replace_invalid=True)
    except Exception as e:  # noqa: BLE001 - pricing is a courtesy; training goes on
        print(f"[spend] could not record the world size in {url}: {e}", flush=True)


def _clean_changes(doc) -> list[list]:
    """workers.json's (time, world size) pairs that are well formed (the file is untrusted)."""
    changes = doc.get("changes") if isinstance(doc, dict) else None
    out = []
    for c in changes if isinstance(changes, list) else []:
        if isinstance(c, list) and len(c) == 2:
            t, w = clean_number(c[0], "num"), clean_number(c[1], "int")
            if t is not None and w and not isinstance(c[1], float):
                out.append([t, w])
    return out[-MAX_SEGMENTS:]


def read_spend(run_url: str, storage_options: dict | None = None) -> dict | None:
    """`<run>/spend.json`, validated, with fresh totals; None when the run has none. Raises ValueError/OSError
    when it cannot be read (too large, not JSON, storage unreachable). Malformed rows are dropped alone, and a
    line on stderr says how many (`dropped` in the result)."""
    from trainer.storage import read_small_json

    doc = read_small_json(f"{run_url}/{SPEND_FILE}", MAX_DOCUMENT_BYTES, storage_options)
    if doc is None:
        return None
    out = sanitize(doc)
    if out["dropped"]:
        print(clean(f"warning: {run_url}/{SPEND_FILE}: {out['dropped']} malformed row(s) dropped (a bad field, or "
                    f"a time outside {FIRST_YEAR}-{LAST_YEAR}); the other rows are counted"), file=sys.stderr)
    return out


class Ledger:
    """One attempt's row in `<run>/spend.json`: `begin()`, `heartbeat()` (or `start_heartbeat()`), `end()`."""

    def __init__(self, run_url: str, *, run: str, gpus: int, price_per_gpu_hour: float,
                 storage_options: dict | None = None, clock=time.time):
        self.url, self.run, self.gpus, self.price = f"{run_url}/{SPEND_FILE}", run, gpus, price_per_gpu_hour
        self.workers_url = f"{run_url}/{WORKERS_FILE}"
        self.opts, self.clock = storage_options, clock
        self.doc: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._seen = 0.0  # time of the last workers.json change folded in
        self.id = ""
        self.row: dict = {}

    @property
    def earlier_seconds(self) -> float:
        """Wall seconds paid for by the attempts before this one."""
        rows = self.doc["attempts"]
        mine = next((i for i, a in enumerate(rows) if a.get("id") == self.id), len(rows))
        return sum(a["seconds"] for a in rows[:mine])

    def begin(self) -> "Ledger":
        """Read the ledger, mark attempts that never said goodbye as lost, open this attempt's row (at `gpus`
        until a worker group reports another size). Read, change and write are one `update_json`: a lock
        beside a local file, a conditional write on S3, so concurrent attempts never drop each other's rows."""
        from trainer.storage import update_json

        self.id = secrets.token_hex(8)
        self._t0 = self._seen = self.clock()  # changes before this attempt began are not its own
        self.row = {"start": _iso(self._t0), "last": _iso(self._t0), "gpus": self.gpus, "seconds": 0.0,
                    "state": "running", "id": self.id}

        def change(stored):
            rows = sanitize(stored or {})["attempts"]
            for a in rows:
                if a["state"] == "running":
                    a["state"] = "lost"  # its pods went without closing the row: time up to its last heartbeat
            return self._document(rows + [dict(self.row)])

        self.doc = update_json(self.url, change, self.opts, max_bytes=MAX_DOCUMENT_BYTES)
        return self

    def _document(self, rows: list[dict]) -> dict:
        doc = {"schema": SCHEMA, "run": self.run, "price_per_gpu_hour": self.price, "attempts": rows[-MAX_ATTEMPTS:]}
        return dict(doc, totals=totals(doc))

    def heartbeat(self, state: str = "running") -> None:
        """Move this attempt's `last` and `seconds` to now (and set its state), after folding in the world-size
        changes its worker groups recorded since the last heartbeat."""
        with self._lock:
            changes = self._changes()
            now = self.clock()
            row = self.row
            for t, world in changes:
                self._resize(row, world, t - self._t0)
            row.update(last=_iso(now), seconds=max(0.0, now - self._t0), state=state)
            self._write()

    def _changes(self) -> list[list]:
        """workers.json's changes made during this attempt and not folded in yet; [] when unreadable."""
        from trainer.storage import read_small_json

        try:
            doc = read_small_json(self.workers_url, MAX_DOCUMENT_BYTES, self.opts)
        except Exception:  # noqa: BLE001 - unreadable: this attempt stays at its last known size
            return []
        new = [c for c in _clean_changes(doc) if c[0] > self._seen]
        if new:
            self._seen = new[-1][0]
        return new

    def _resize(self, row: dict, world: int, at: float) -> None:
        """From `at` seconds into the attempt on, it runs on `world` GPUs (a row that never changed size has
        no segments)."""
        segments = row.get("segments") or [[0.0, row["gpus"]]]
        if world == segments[-1][1] or len(segments) >= MAX_SEGMENTS:
            return
        row["segments"] = segments + [[max(at, segments[-1][0]), world]]
        row["gpus"] = world

    def _write(self) -> None:
        """This attempt's row into the ledger as it is now (other attempts' rows kept): one `update_json`. A
        ledger that has become unreadable is started again from what this attempt knows."""
        from trainer.storage import update_json

        def change(stored):
            rows = sanitize(stored)["attempts"] if stored is not None else \
                [a for a in self.doc["attempts"] if a.get("id") != self.id]
            at = next((i for i, a in enumerate(rows) if a.get("id") == self.id), None)
            if at is None:
                rows.append(dict(self.row))
            else:
                rows[at] = dict(self.row)
            return self._document(rows)

        self.doc = update_json(self.url, change, self.opts, max_bytes=MAX_DOCUMENT_BYTES, replace_invalid=True)

    def start_heartbeat(self, interval: float | None = None) -> None:
        interval = interval or float(os.environ.get("LLMCTL_SPEND_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS))

        def beat() -> None:
            warned = False
            while not self._stop.wait(interval):
                try:
                    self.heartbeat()
                except Exception as e:  # noqa: BLE001 - storage hiccups must not stop training
                    if not warned:
                        print(f"[spend] could not update {self.url}: {e}", flush=True)
                        warned = True

        self._thread = threading.Thread(target=beat, name="llmctl-spend-heartbeat", daemon=True)
        self._thread.start()

    def end(self, state: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.heartbeat(state)


@contextmanager
def attempt(run_url: str, *, run: str, gpus: int, price_per_gpu_hour: float, storage_options: dict | None = None):
    """The launcher's attempt: its row opened, heartbeated while the block runs, closed finished or failed."""
    ledger = Ledger(run_url, run=run, gpus=gpus, price_per_gpu_hour=price_per_gpu_hour,
                    storage_options=storage_options).begin()
    ledger.start_heartbeat()
    try:
        yield ledger
    except BaseException:
        ledger.end("failed")
        raise
    ledger.end("finished")


def lost_seconds(spend: dict | None, kept_seconds: float | None) -> float | None:
    """Paid wall seconds whose work the run did not keep (restarts, start-up, redone steps); None if unknown."""
    if not spend or kept_seconds is None:
        return None
    return max(0.0, spend["totals"]["seconds"] - kept_seconds)

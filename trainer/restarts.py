"""Worker-group restarts, as the run's storage keeps them for the console, the report, `llmctl status` and the
metrics.

A stage's worker group is replaced when a worker dies or raises (Ray Train's FailureConfig restarts it), when
an elastic group resizes, and when a new attempt of the run starts (a RayJob retry, a resubmit). Each time the
new group resumes from the stage's latest checkpoint and trains the steps after it again. Three files say
what happened:

    <run>/<stage>/position.json  rank 0's last step done: {"step", "time", "seconds" (the stage's wall seconds
                                 at that step, the checkpointed clock), "attempt", "world", "started" (when
                                 this group resumed: a failure recorded earlier is not its)}; written after every
                                 step on local storage, at each log line elsewhere (a PUT per step is not worth
                                 it on S3: there the lost steps count from the last log line, an undercount by
                                 less than log_every), and when a group has resumed.
    <run>/<stage>/failure.json   the Ray Train controller's view of the last failure (`failure_recorder`, a
                                 UserCallback): {"time", "ranks": [[rank, cause], ...]}, cause "died" (the
                                 process is gone: SIGKILL, OOM, a lost node), "hung" (stopped answering) or
                                 "raised <exception type>".
    <run>/restarts.json          {"restarts": [event, ...]}: one event per group that started a stage an earlier
                                 group had begun (position.json exists), appended by the new group's rank 0
                                 (`on_group_start`) once it has resumed.

An event: stage, time, attempt (the spend ledger's attempt number, trainer/spend.py), kind ("worker group": a
restart inside one attempt; "attempt": the first group of a new attempt, which the ledger counts already), rank
and ranks (the failed ones, when the controller saw them), cause, world, reached (the step the old group had
done), resumed_from (the checkpoint's step), lost_steps (reached - resumed_from), lost_seconds (the stage
seconds between them: work paid and redone) and restart_seconds (from the last step done to the resume: the
failure's detection, the new group's start-up and restore).

Counting: a run's attempts = the ledger's attempts + its "worker group" restarts; restarts = attempts - 1.
Readers treat the files as untrusted (bounded size, known fields, trainer/progress.py's rules). Torch- and
Ray-free (the CLI imports it); `failure_recorder` imports Ray when called.
"""

from __future__ import annotations

import time

from trainer.progress import MAX_STRING, clean_number
from trainer.text import clean

RESTARTS_FILE = "restarts.json"
POSITION_FILE = "position.json"
FAILURE_FILE = "failure.json"
MAX_EVENTS = 1000  # kept in restarts.json (the newest); FailureConfig allows a few per stage
MAX_DOCUMENT_BYTES = 1024 * 1024  # ~400 bytes an event
MAX_SMALL_BYTES = 64 * 1024  # position.json, failure.json
KINDS = ("worker group", "attempt")
EVENT_FIELDS = {"stage": "str", "attempt": "int", "rank": "int", "world": "int", "reached": "int",
                "resumed_from": "int", "lost_steps": "int", "lost_seconds": "num", "restart_seconds": "num",
                "cause": "str", "time": "str"}


# -------------------------------------------------------------------- reading (untrusted)


def _clean_event(e) -> dict | None:
    """One event's known fields, each checked; None when a required one is missing or malformed."""
    if not isinstance(e, dict) or e.get("kind") not in KINDS:
        return None
    out: dict = {"kind": e["kind"]}
    for key, kind in EVENT_FIELDS.items():
        value = e.get(key)
        if kind == "str":
            out[key] = (_words(value) or None) if isinstance(value, str) else None
        else:
            out[key] = None if kind == "int" and isinstance(value, float) else clean_number(value, kind)
    ranks = e.get("ranks")
    out["ranks"] = [r for r in ranks[:64] if clean_number(r, "int") is not None and not isinstance(r, float)] \
        if isinstance(ranks, list) else []
    required = ("stage", "attempt", "reached", "resumed_from", "lost_steps", "lost_seconds", "restart_seconds")
    return out if all(out[k] is not None for k in required) else None


def sanitize(doc) -> list[dict]:
    events = doc.get("restarts") if isinstance(doc, dict) else None
    return [e for e in map(_clean_event, events[-MAX_EVENTS:] if isinstance(events, list) else []) if e]


def read_restarts(run_url: str, storage_options: dict | None = None) -> list[dict]:
    """`<run>/restarts.json`'s events, validated, oldest first; [] when the run has none. Raises ValueError/OSError
    when it cannot be read (too large, not JSON, storage unreachable)."""
    from trainer.storage import read_small_json

    return sanitize(read_small_json(f"{run_url}/{RESTARTS_FILE}", MAX_DOCUMENT_BYTES, storage_options))


def read_restarts_or_none(run_url: str, storage_options: dict | None = None) -> list[dict]:
    """`read_restarts`, [] when the record cannot be read: a bad record hides the restarts, never a report."""
    try:
        return read_restarts(run_url, storage_options)
    except (ValueError, OSError):
        return []


def counts(ledger_attempts: int, events: list[dict]) -> dict:
    """{"attempts", "restarts"} of a run: the ledger's attempts (at least 1 once anything ran) plus its worker
    group restarts (a new attempt's first group is in the ledger already)."""
    attempts = max(1, ledger_attempts) + sum(e["kind"] == "worker group" for e in events)
    return {"attempts": attempts, "restarts": attempts - 1}


def describe(e: dict) -> str:
    """What a person reads about one restart, without the stage: who failed, where it resumed, what it cost."""
    ranks = e.get("ranks") or ([e["rank"]] if e.get("rank") is not None else [])
    cause = e.get("cause")
    if ranks and cause:
        who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} {cause}"
    elif cause:
        who = cause
    else:
        who = "a new attempt of the run" if e["kind"] == "attempt" else "the worker group was replaced"
    where = f"the step-{e['resumed_from']} checkpoint" if e["resumed_from"] else "the start (no checkpoint yet)"
    n = e["lost_steps"]
    return (f"{who} at step {e['reached']}; resumed from {where}: {n} step{'' if n == 1 else 's'} lost "
            f"({e['lost_seconds']:.1f} s of training) and {e['restart_seconds']:.1f} s restarting")


def headline(e: dict, number: int) -> str:
    """The console line of the `number`-th restart of the run."""
    what = "worker group restart" if e["kind"] == "worker group" else "new attempt, restart"
    return f"[{e['stage']}] {what} {number}: {describe(e)}"


# -------------------------------------------------------------------- writing (the run's own workers)


def _read(url: str, max_bytes: int, storage_options: dict | None):
    from trainer.storage import read_small_json

    try:
        return read_small_json(url, max_bytes, storage_options)
    except ValueError:  # not JSON or too large: as if absent
        return None


class Position:
    """Rank 0's last step done, at `<run>/<stage>/position.json` (see the module docstring)."""

    def __init__(self, run_url: str, stage: str, *, attempt: int, world: int, started: float, every: int = 1,
                 storage_options: dict | None = None, clock=time.time):
        from trainer.storage import filesystem

        self.url = f"{run_url}/{stage}/{POSITION_FILE}"
        self.attempt, self.world, self.started, self.opts, self.clock = attempt, world, started, storage_options, clock
        fs, _ = filesystem(self.url, storage_options)
        local = fs.protocol in ("file", "local") or "file" in fs.protocol
        self.every = 1 if local else max(1, every)
        self._warned = False

    def write(self, step: int, seconds: float, *, force: bool = False) -> None:
        """Note that `step` steps are done, `seconds` into the stage; never fatal."""
        from trainer.storage import write_json

        if not force and step % self.every:
            return
        try:
            write_json(self.url, {"step": step, "time": self.clock(), "seconds": seconds, "attempt": self.attempt,
                                  "world": self.world, "started": self.started}, self.opts)
        except Exception as e:  # noqa: BLE001 - the restart record is a courtesy; training goes on
            if not self._warned:
                print(f"[restarts] could not write {self.url}: {e}", flush=True)
                self._warned = True


def on_group_start(position: Position, run_url: str, stage: str, *, start_step: int, loop_seconds: float,
                   storage_options: dict | None = None) -> dict | None:
    """Rank 0 of a group that has resumed `stage` at `start_step` (`loop_seconds` into it), `position` its
    writer: when an earlier group had begun the stage, append the restart to `<run>/restarts.json` and return
    it (else None). Either way the position is now this group's start."""
    from trainer.storage import write_json

    pos = _read(f"{run_url}/{stage}/{POSITION_FILE}", MAX_SMALL_BYTES, storage_options)
    now, attempt, world = position.started, position.attempt, position.world
    event = None
    if isinstance(pos, dict):
        reached = clean_number(pos.get("step"), "int")
        at = clean_number(pos.get("time"), "num")
        seconds = clean_number(pos.get("seconds"), "num")
        before = clean_number(pos.get("attempt"), "int")
        started = clean_number(pos.get("started"), "num")
        if reached is not None and at is not None and seconds is not None:
            event = {"stage": stage, "time": _iso(now), "attempt": attempt,
                     "kind": "worker group" if before == attempt else "attempt", "world": world,
                     "reached": reached, "resumed_from": start_step, "lost_steps": max(0, reached - start_step),
                     "lost_seconds": max(0.0, seconds - loop_seconds), "restart_seconds": max(0.0, now - at),
                     **_failure(run_url, stage, since=at if started is None else started,
                                 storage_options=storage_options)}
            old_world = clean_number(pos.get("world"), "int")
            if event["cause"] is None and old_world and old_world != world:
                event["cause"] = f"the group resized from {old_world} to {world} workers"
            events = sanitize(_read(f"{run_url}/{RESTARTS_FILE}", MAX_DOCUMENT_BYTES, storage_options))
            write_json(f"{run_url}/{RESTARTS_FILE}", {"restarts": (events + [event])[-MAX_EVENTS:]}, storage_options)
    position.write(start_step, loop_seconds, force=True)
    return event


def _failure(run_url: str, stage: str, *, since: float, storage_options: dict | None) -> dict:
    """{"rank", "ranks", "cause"} from the controller's record of a failure after `since` (when the group that
    failed had resumed)."""
    doc = _read(f"{run_url}/{stage}/{FAILURE_FILE}", MAX_SMALL_BYTES, storage_options)
    none = {"rank": None, "ranks": [], "cause": None}
    if not isinstance(doc, dict) or (clean_number(doc.get("time"), "num") or 0.0) < since:
        return none
    pairs = [(r, _words(c)) for r, c in (p for p in doc.get("ranks") or [] if isinstance(p, list) and len(p) == 2)
             if isinstance(r, int) and not isinstance(r, bool) and 0 <= r and isinstance(c, str)][:64]
    if not pairs:
        return none
    # The ranks whose process is gone or stuck, when any: their peers' errors (a closed gloo connection) follow.
    first = next((c for _, c in pairs if c in ("died", "hung")), pairs[0][1])
    ranks = sorted(r for r, c in pairs if c == first)
    return {"rank": ranks[0], "ranks": ranks, "cause": first}


def totals_for_worker(events: list[dict], attempt: int) -> tuple[int, float]:
    """(worker group restarts of the run, seconds the current `attempt`'s restarts lost): what a worker adds to
    the ledger's attempts and to earlier attempts' lost seconds for llmctl_attempts / llmctl_lost_seconds."""
    group = [e for e in events if e["kind"] == "worker group"]
    lost = sum(e["lost_seconds"] + e["restart_seconds"] for e in group if e["attempt"] == attempt)
    return len(group), lost


def _words(text: str) -> str:
    """An untrusted name or cause as plain words: letters, digits, spaces, `_.:-` (no markup, no control)."""
    return "".join(c for c in clean(text, limit=MAX_STRING) if c.isalnum() or c in " _.:-").strip()


def _iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -------------------------------------------------------------------- the controller's side


def cause_of(error: BaseException) -> str:
    """A failed worker's cause in a few words, from the error Ray Train's controller holds for its rank."""
    name = type(error).__name__
    if name == "WorkerHealthCheckFailedError":  # the poll of its actor failed: the process is gone
        return "died"
    if name == "WorkerHealthCheckTimeoutError":
        return "hung"
    return f"raised {name}"


def failure_recorder(run_url: str, stage: str, storage_options: dict | None = None, clock=time.time):
    """A Ray Train UserCallback (it runs in the Train controller) that writes each failure's ranks and causes to
    `<run>/<stage>/failure.json` before the controller restarts the group; never raises."""
    from ray.train import UserCallback

    class FailureRecorder(UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            from trainer.storage import write_json

            try:
                ranks = [[int(r), cause_of(e)] for r, e in sorted(worker_exceptions.items())]
                write_json(f"{run_url}/{stage}/{FAILURE_FILE}", {"time": clock(), "ranks": ranks},
                           storage_options)
            except Exception as e:  # noqa: BLE001 - the controller must go on restarting whatever happens here
                print(f"[restarts] could not record the failure: {e}", flush=True)

    return FailureRecorder()

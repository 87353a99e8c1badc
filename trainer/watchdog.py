"""Hang detection that names the stuck rank: a watchdog thread in every training worker.

The failure it handles: one rank stops arriving at a collective (a wedged data read, a dead NIC, a GPU
fault), and every other rank waits inside the all-reduce with nothing in the logs. The loop tells the
watchdog three things per step: `begin(step)` at the top of the step, `arrive(step)` just before the step's
first collective (the loop's `agree`), and `end(step, seconds)` when the step is done. Evaluations and
checkpoint saves happen between `end` and the next `begin` and are not watched (they have their own
collectives; the process group's timeout, `COLLECTIVE_TIMEOUT_S`, bounds those).

The bound: `max(floor, FACTOR x median)` of this rank's last `WINDOW` step times (10x the median: a step
that slow is not noise; the floor keeps tiny CPU steps from tripping on a scheduler hiccup). Before the
first measured step of an attempt (torch.compile warm-up, NCCL init) the bound is `STARTUP_S`.

When a step runs past the bound, the watchdog:
1. dumps every thread's stack (faulthandler) to the log (stderr) and to storage,
   `<run>/<stage>/hangs/step<NNNNNN>_rank<r>.txt`;
2. reads every rank's arrival (the step whose first collective it last reached: a key per rank in the
   process group's own TCPStore, `llmctl/arrive/<rank>`), names the ranks behind the others (or, when all
   arrived, says they are stuck inside the collective: the interconnect), and writes that verdict beside the
   stacks (`..._rank<r>.json`);
3. exits the worker process (exit code 1), so Ray Train fails the attempt and restarts the worker group
   from the last checkpoint (FailureConfig.max_failures), as it does for a lost pod.

The same numbers feed Prometheus (trainer/metrics.py: `llmctl_last_step_timestamp_seconds`,
`llmctl_hang_bound_seconds`, `llmctl_collective_step`) so the LlmctlStepStale alert names the stuck rank
even where the watchdog cannot act.
"""

from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable

FACTOR = 10.0  # bound = FACTOR x median step time
FLOOR_S = 300.0  # never less: Ray's checkpoint registration or a slow data read can stall a step this long
STARTUP_S = 1800.0  # first step of an attempt: torch.compile (~7 min at d26, modded-nanogpt) + NCCL init
WINDOW = 100  # steps in the median
# The process group's collective timeout (Ray Train's TorchConfig(timeout_s)): past it gloo raises and NCCL
# aborts the communicator. Above the watchdog's startup bound, so the watchdog names the rank first.
COLLECTIVE_TIMEOUT_S = 2 * STARTUP_S
EXIT_DELAY_S = 3.0  # before exiting: the other ranks' watchdogs read the store that rank 0's process serves
ARRIVE_KEY = "llmctl/arrive/{rank}"


def hang_bound(durations, floor: float = FLOOR_S, factor: float = FACTOR, startup: float = STARTUP_S) -> float:
    """Seconds a step may take before it counts as hung, from this rank's recent step times."""
    if not durations:
        return max(floor, startup)
    return max(floor, factor * statistics.median(durations))


def stuck_ranks(arrivals: dict[int, int | None]) -> list[int]:
    """The ranks whose last arrival is behind the furthest one; [] when all reached the same collective."""
    known = [a for a in arrivals.values() if a is not None]
    if not known:
        return []
    top = max(known)
    return sorted(r for r, a in arrivals.items() if a is None or a < top)


def _default_store():
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no process group (one worker): nobody to compare with
        return None
    return None


class Watchdog:
    """One per worker. `on_hang(verdict)` runs after the dump; by default the process exits (see module doc)."""

    def __init__(self, *, rank: int, world: int, hang_url: str, storage_options: dict | None = None,
                 floor: float = FLOOR_S, factor: float = FACTOR, startup: float = STARTUP_S, metrics=None,
                 store=None, on_hang: Callable[[dict], None] | None = None, exit_delay: float = EXIT_DELAY_S):
        self.rank, self.world, self.hang_url, self.opts = rank, world, hang_url.rstrip("/"), storage_options
        self.floor, self.factor, self.startup = floor, factor, startup
        self.metrics, self.store = metrics, store if store is not None else _default_store()
        self.on_hang = on_hang or (lambda verdict: (time.sleep(exit_delay), os._exit(1)))
        self.durations: deque[float] = deque(maxlen=WINDOW)
        self._lock = threading.Lock()
        self._step: int | None = None  # the step running now; None between steps
        self._started = 0.0
        self._stop = threading.Event()
        self.fired: dict | None = None
        if metrics is not None:
            metrics.on_hang_bound(self.bound())
        self._thread = threading.Thread(target=self._watch, name="llmctl-watchdog", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the loop's side

    def begin(self, step: int) -> None:
        with self._lock:
            self._step, self._started = step, time.monotonic()

    def arrive(self, step: int) -> None:
        """This rank reached the step's first collective."""
        if self.store is not None:
            try:
                self.store.set(ARRIVE_KEY.format(rank=self.rank), str(step))
            except Exception:  # noqa: BLE001 - a store hiccup must not fail the step; naming degrades
                pass
        if self.metrics is not None:
            self.metrics.on_collective(step)

    def end(self, step: int, seconds: float) -> None:
        with self._lock:
            self._step = None
            self.durations.append(seconds)
            bound = self.bound()
        if self.metrics is not None:
            self.metrics.on_hang_bound(bound)

    def bound(self) -> float:
        return hang_bound(self.durations, self.floor, self.factor, self.startup)

    def close(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------- the thread's side

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.floor / 4)):
            with self._lock:
                step, started, bound = self._step, self._started, self.bound()
            if step is not None and time.monotonic() - started > bound:
                self.fired = self._report(step, time.monotonic() - started, bound)
                self.on_hang(self.fired)
                return

    def arrivals(self) -> dict[int, int | None]:
        out: dict[int, int | None] = {}
        for r in range(self.world):
            key = ARRIVE_KEY.format(rank=r)
            try:
                out[r] = int(self.store.get(key)) if self.store is not None and self.store.check([key]) else None
            except Exception:  # noqa: BLE001 - rank 0's store may be gone already
                out[r] = None
        return out

    def _report(self, step: int, waited: float, bound: float) -> dict:
        from trainer.storage import write_json, write_text

        arrivals = self.arrivals() if self.store is not None else {}
        stuck = stuck_ranks(arrivals)
        if stuck:
            why = f"rank(s) {', '.join(map(str, stuck))} never reached step {step}'s collective"
        elif arrivals:
            why = f"every rank reached step {step}'s collective and none left it: suspect the interconnect"
        else:
            why = "no process group to compare ranks"
        stacks = _all_stacks()
        sys.stderr.write(f"llmctl watchdog: rank {self.rank}: step {step} has run {waited:.0f}s (bound "
                         f"{bound:.0f}s); {why}. Stacks of every thread:\n{stacks}\n")
        sys.stderr.flush()
        verdict = {"step": step, "rank": self.rank, "pod": os.environ.get("HOSTNAME"), "waited_seconds": waited,
                   "bound_seconds": bound, "arrivals": {str(k): v for k, v in arrivals.items()},
                   "stuck_ranks": stuck, "why": why, "time": time.time()}
        base = f"{self.hang_url}/step{step:06d}_rank{self.rank}"
        try:
            write_text(base + ".txt", stacks, self.opts)
            write_json(base + ".json", verdict, self.opts)
        except Exception as e:  # noqa: BLE001 - the log has the stacks; exiting matters more
            sys.stderr.write(f"llmctl watchdog: could not write {base}: {e}\n")
        return verdict


def _all_stacks() -> str:
    """faulthandler's dump of every thread (it needs a real file descriptor)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()

"""Logs that outlive the cluster: each process of a run tees its stdout and stderr to the run's storage.

Layout: `<run>/logs/attempt-<K>/<who>/<ms since epoch>-<pid>-<seq>.log`, where K is the attempt number of
the run's spend ledger (trainer/spend.py: 1 for the first RayJob attempt, +1 per retry, the same number the
workers are given), and `who` is `driver` (the `trainer.launch` process on the head: the run's own lines
and, with log_to_driver, every worker's relayed output) or `rank-<N>` (one Ray Train worker). Chunk names sort
in time order, so a reader concatenates a folder's chunks by name; several processes of one rank (one per
stage, a restarted worker group) never overwrite each other.

Why chunks: object storage has no append. A chunk is written when `chunk_bytes` have collected or
`interval_s` has passed since the last write, and at close, so at most `interval_s` of output is lost when
the pod dies. Each chunk is one PUT through trainer/storage.py (the run's own credentials): no Kubernetes
API token, no sidecar and no cluster-wide log stack is needed, and the logs stay readable (`llmctl logs RUN
--rank N --attempt K`, cli/logview.py) after the RayCluster and the RayJob are gone.

Two ways to capture: `fd=True` replaces file descriptors 1 and 2 with a pipe and copies everything read from
it to the original descriptors and to storage, so output of C libraries (NCCL, CUDA) and of child processes is
shipped too (used in pods and Ray worker processes, whose output goes to files anyway); `fd=False` wraps
`sys.stdout`/`sys.stderr` only, for a process whose console is a terminal a person watches (a local run).

Shipping never fails the run: a storage error is counted, said once on the original stderr, and the chunk
is kept for the next write (bounded by `max_pending_bytes`; the oldest output is dropped beyond it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

LOGS = "logs"


def attempt_dir(run_url: str, attempt: int) -> str:
    return f"{run_url.rstrip('/')}/{LOGS}/attempt-{int(attempt)}"


def who_dir(run_url: str, attempt: int, who: str) -> str:
    return f"{attempt_dir(run_url, attempt)}/{who}"


def rank_name(rank: int) -> str:
    return f"rank-{int(rank)}"


class Shipper:
    """Tee this process's output to `<prefix>/<chunk>.log` objects. `start()` ... `close()` (or `with`)."""

    def __init__(self, prefix: str, storage_options: dict | None = None, *, fd: bool = True,
                 interval_s: float = 10.0, chunk_bytes: int = 1 << 20, max_pending_bytes: int = 64 << 20):
        self.prefix = prefix.rstrip("/")
        self.opts = storage_options
        self.fd = fd
        self.interval_s, self.chunk_bytes, self.max_pending = interval_s, chunk_bytes, max_pending_bytes
        self.errors = 0
        self.chunks = 0
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq = 0
        self._threads: list[threading.Thread] = []
        self._saved: dict[int, int] = {}
        self._streams = None
        self._said = False

    # ---- capture ----
    def start(self) -> "Shipper":
        if self.fd:
            self._start_fd()
        else:
            self._start_streams()
        t = threading.Thread(target=self._flusher, name="llmctl-logship", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _start_fd(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for target in (1, 2):
            r, w = os.pipe()
            self._saved[target] = os.dup(target)
            os.dup2(w, target)
            os.close(w)
            t = threading.Thread(target=self._pump, args=(r, self._saved[target]), name=f"llmctl-logship-{target}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, r: int, original: int) -> None:
        while True:
            try:
                data = os.read(r, 65536)
            except OSError:
                break
            if not data:
                break
            with contextlib.suppress(OSError):
                os.write(original, data)
            self._add(data)
        os.close(r)

    def _start_streams(self) -> None:
        shipper = self

        class Tee:
            def __init__(self, inner):
                self._inner = inner

            def write(self, s):
                n = self._inner.write(s)
                shipper._add(s.encode("utf-8", errors="replace") if isinstance(s, str) else bytes(s))
                return n

            def __getattr__(self, name):  # isatty, fileno, encoding, flush ...: the real stream's
                return getattr(self._inner, name)

        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = Tee(sys.stdout), Tee(sys.stderr)

    def _add(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            if len(self._buf) > self.max_pending:
                del self._buf[:len(self._buf) - self.max_pending]
            full = len(self._buf) >= self.chunk_bytes
        if full:
            self._wake.set()

    # ---- shipping ----
    def _flusher(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        from trainer.storage import write_bytes

        with self._lock:
            if not self._buf:
                return
            data = bytes(self._buf)
            self._buf.clear()
        self._seq += 1
        name = f"{self.prefix}/{int(time.time() * 1000):013d}-{os.getpid()}-{self._seq:06d}.log"
        try:
            write_bytes(name, data, self.opts)
            self.chunks += 1
        except Exception as e:  # noqa: BLE001 - shipping must never end the run
            self.errors += 1
            with self._lock:
                self._buf[:0] = data  # keep it for the next write
            if not self._said:
                self._said = True
                self._say(f"llmctl: could not ship logs to {self.prefix} ({type(e).__name__}: {e}); retrying\n")

    def _say(self, text: str) -> None:
        target = self._saved.get(2)
        with contextlib.suppress(Exception):
            if target is not None:
                os.write(target, text.encode())
            elif self._streams:
                self._streams[1].write(text)

    def close(self) -> None:
        if self.fd and self._saved:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for target, original in self._saved.items():
                os.dup2(original, target)  # closes the pipe's write end held by `target`: the pump sees EOF
            for t in self._threads[1:]:
                t.join(timeout=5)
            for original in self._saved.values():
                os.close(original)
            self._saved = {}
        if self._streams:
            sys.stdout, sys.stderr = self._streams
            self._streams = None
        self._stop.set()
        self._wake.set()
        if self._threads:
            self._threads[0].join(timeout=5)
        self.flush()

    def __enter__(self) -> "Shipper":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def shipping(run_url: str, attempt: int, who: str, storage_options: dict | None = None, *, fd: bool | None = None,
             **kw):
    """Ship this process's output for the block; `fd` None: descriptors in a pod (LLMCTL_RUN is set by the
    RayJob's containers, cli/kube/pods.py), Python streams elsewhere. LLMCTL_SHIP_LOGS=0 turns it off."""
    if os.environ.get("LLMCTL_SHIP_LOGS", "1") == "0":
        yield None
        return
    if fd is None:
        fd = "LLMCTL_RUN" in os.environ
    s = Shipper(who_dir(run_url, attempt, who), storage_options, fd=fd, **kw)
    s.start()
    try:
        yield s
    finally:
        s.close()


def rank_logged(fn):
    """`fn` (a Ray Train loop taking the StageConfig dict) with this worker's output shipped as `rank-<N>` of
    the attempt the config names."""
    import functools
    import json

    @functools.wraps(fn)
    def logged(config: dict):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        run_url = json.loads(config["plan"])["urls"]["run"]
        with shipping(run_url, config.get("attempts", 1), rank_name(rank), config.get("storage_options"), fd=True):
            try:
                return fn(config)
            except BaseException as e:  # a GPU/NCCL failure names its node for the retry (trainer/gpu_health.py)
                from trainer.gpu_health import record_if_gpu_failure

                record_if_gpu_failure(e, run_url, attempt=config.get("attempts", 1), rank=rank,
                                      storage_options=config.get("storage_options"))
                raise

    return logged

"""A real MLflow tracking server for the tests of `--track mlflow=URI` (trainer/tracking.py): `mlflow server` from
PyPI on a free loopback port, its runs in SQLite and its artifacts in a folder under the test's temporary
directory, in its own process group so `stop()` ends exactly it and its workers.

Run: .venv/bin/pytest tests/test_tracking.py -v
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# MLflow 3's server also starts a job runner and seven huey consumers (GenAI evaluation jobs, periodic tasks), each
# a Python process importing mlflow: nothing experiment tracking uses, and most of the server's start-up cost.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
READY_S = 120  # start-up is ~5-15 s on a busy 2-core box (imports, the SQLite schema); a bound, not a wait


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released: connecting is refused at once)."""
    return free_port()


class MlflowServer:
    def __init__(self, root: Path):
        self.root, self.port, self.proc, self._ready = Path(root), free_port(), None, False

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        mlflow = Path(sys.executable).with_name("mlflow")
        self.log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **SERVER_ENV})
        return self

    def ready(self) -> "MlflowServer":
        """Wait (bounded) until GET /health answers OK; raise with the server's log if it dies or never does."""
        deadline = time.monotonic() + READY_S
        while not self._ready:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    self._ready = r.status == 200
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not come up:\n"
                                       + (self.root / "server.log").read_text()[-3000:]) from None
                try:
                    self.proc.wait(timeout=0.25)  # the poll interval; returns early if the server exits
                except subprocess.TimeoutExpired:
                    pass
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

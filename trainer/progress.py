"""Progress, as people see it while something runs: a console bar for the CLI's long commands, one bar per
stage of a local run, and the progress annotation a cluster run writes onto its own RayJob (read back by
`llmctl status`).

A local run's workers print nothing to the console (their output and Ray's stay in Ray's log files): rank 0
appends one JSON line per log interval and per val pass to a local progress file (`ProgressFile`, named by
`StageConfig.progress_file`), and the driver follows that file (`StageBars`) and draws one rich bar per stage:
step/steps, tokens/s, loss, val bpb, dollars where priced, ETA.

`report_progress` runs inside the pods (rank 0, at each checkpoint), so it lives with the trainer: the pods
never import `cli`. The kubernetes client is imported on call, not at import time.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

PROGRESS_ANNOTATION = "llmctl.dev/progress"  # the RayJob annotation `llmctl status` reads
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")  # a pod's own namespace


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

        self._progress = Progress(TextColumn("{task.description:<9}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                                  transient=False, refresh_per_second=4)
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


def report_progress(progress: dict, *, name: str | None = None, namespace: str | None = None,
                    kubeconfig: str | None = None) -> None:
    """Called by the run (rank 0, at each checkpoint): merge-patch its RayJob's progress annotation.

    `progress` keys read by `llmctl status`: stage, step, steps, tokens, cost_dollars, eta_seconds (all
    optional). Needs the head pod's service account (the chart's `llmctl-run`, set as `runServiceAccount`)
    and the env the RayJob sets: LLMCTL_RUN, LLMCTL_NAMESPACE. Errors propagate: the caller decides whether
    a failed report matters (it should not stop training).
    """
    import datetime

    from kubernetes import client, config

    name = name or os.environ["LLMCTL_RUN"]
    namespace = namespace or os.environ.get("LLMCTL_NAMESPACE") or IN_CLUSTER_NAMESPACE.read_text().strip()
    conf = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        config.load_incluster_config(client_configuration=conf)
    else:  # outside a cluster (tests, a laptop): the kubeconfig
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"), client_configuration=conf,
                                persist_config=False)
    body = dict(progress, updated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    patch = {"metadata": {"annotations": {PROGRESS_ANNOTATION: json.dumps(body, sort_keys=True)}}}
    api = client.CustomObjectsApi(client.ApiClient(conf))
    api.patch_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name, patch,
                                       _content_type="application/merge-patch+json", _request_timeout=(10, 30))

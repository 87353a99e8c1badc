"""Progress, as people see it while something runs: a console bar for the CLI's long commands, and the
progress annotation a cluster run writes onto its own RayJob (read back by `llmctl status`).

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

"""A real Prometheus for tests: started on loopback with a temp config, queried through its HTTP API.

    with Prometheus(tmp_path, targets=["127.0.0.1:41234"], rule_files=[ALERTS]) as prom:
        prom.wait_until(lambda: prom.query("up == 1"), "the target is scraped")
        prom.query('llmctl_step{run="r"}')       # -> [{"metric": {...}, "value": [ts, "12"]}, ...]

Debian's `prometheus` binary (tests/tools.py `ensure_prometheus()` installs it on CI). The scrape and rule
evaluation interval is short (1 s by default) so rate() windows of a few seconds hold enough samples.
Waiting is on conditions (the API answers, a query returns data) with a deadline; never a fixed sleep.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
POLL_SECONDS = 0.2  # how often wait_until re-checks its condition


class PrometheusError(RuntimeError):
    """Prometheus failed to start, or a query came back with an error."""


def free_port() -> int:
    """A port that was free a moment ago on loopback (the caller retries if it is taken in between)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """Poll `condition` until it returns something truthy and return it; PrometheusError after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    pause = threading.Event()  # never set: wait() is an interruptible pause between polls
    while True:
        try:
            result = condition()
            if result:
                return result
        except (OSError, PrometheusError, urllib.error.URLError) as e:
            last_error = e
        if time.monotonic() > deadline:
            raise PrometheusError(f"timed out after {timeout:.0f}s waiting for {what}"
                                  + (f" (last error: {last_error})" if last_error else ""))
        pause.wait(POLL_SECONDS)


class Prometheus:
    """One Prometheus server scraping `targets` (host:port, path /metrics) as job `job`, every `interval`.

    The default job is what prometheus-operator names the chart's trainer PodMonitor's job
    (<namespace>/<fullname>-trainer), which the exporter-down alert selects on."""

    def __init__(self, workdir: Path, targets: Iterable[str], *, rule_files: Iterable[Path] = (),
                 job: str = "default/llmctl-trainer", interval: str = "1s",
                 target_labels: dict[str, dict[str, str]] | None = None) -> None:
        if shutil.which("prometheus") is None:
            raise PrometheusError("prometheus is not installed (python -m tests.tools installs it)")
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job = job
        self.interval = interval
        self.target_labels = target_labels or {}  # target -> labels, as a PodMonitor's relabeling adds `pod`
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict:
        return {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": self.job, "static_configs": [
                {"targets": [t], "labels": self.target_labels[t]} if t in self.target_labels else {"targets": [t]}
                for t in self.targets]}],
        }

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        for attempt in range(3):  # the free port can be taken between free_port() and the bind
            self.port = free_port()
            with open(self._log, "wb") as log:
                self._proc = subprocess.Popen(
                    ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_until(self._ready, "prometheus to become ready", timeout)
                return self
            except PrometheusError:
                self.stop()
                if "address already in use" not in self._log.read_text() or attempt == 2:
                    raise PrometheusError(f"prometheus did not start; its log:\n{self._log.read_text()[-3000:]}")
        raise AssertionError("unreachable")

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self._proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -----------------------------------------------------------------------------------------
    # HTTP API

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns `data`, raises PrometheusError with Prometheus's own message."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad query; the body says why
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query, now or at unix time `at`: the result vector (empty when there is no data)."""
        data = self.api("query", query=expr, **({} if at is None else {"time": f"{at:.3f}"}))
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """A range query: one {"metric", "values": [[t, "v"], ...]} per series."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def targets_up(self) -> dict[str, str]:
        """scrape URL -> health ('up', 'down', 'unknown') of the active targets."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def alerts(self, name: str | None = None, state: str | None = None) -> list[dict]:
        """Active alerts (GET /api/v1/alerts: labels, annotations, state pending|firing, activeAt, value),
        only those named `name` and in `state` when given."""
        return [a for a in self.api("alerts")["alerts"]
                if (name is None or a["labels"].get("alertname") == name) and (state is None or a["state"] == state)]

    def rules(self) -> list[dict]:
        """Every loaded rule with its health and last error, flattened over groups."""
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def wait_until(self, condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
        return wait_until(condition, what, timeout)


# ---------------------------------------------------------------------------------------------
# The PromQL our chart ships, ready to run: dashboard panels and variables, alert rules.

_COMPARISON = re.compile(r"\s(==|!=|>=|<=|>|<)\s")
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")


def substitute(expr: str, *, run: str, rate_interval: str) -> str:
    """A dashboard expression with Grafana's variables replaced by concrete values."""
    return (expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
            .replace("${run}", run).replace("$run", run))


def dashboard_queries(paths: Iterable[Path], *, run: str, rate_interval: str) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboards.

    `label_values(X, label)` (Grafana's variable function) becomes `count by (label) (X)`, which returns
    data exactly when X has series carrying the label.
    """
    out = []
    for path in paths:
        d = json.loads(Path(path).read_text())
        for var in d.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                m = _LABEL_VALUES.match(q.strip())
                expr = f"count by ({m.group(2)}) ({m.group(1)})" if m else q
                out.append((f"{Path(path).name} variable ${var['name']}",
                            substitute(expr, run=run, rate_interval=rate_interval)))
        for panel in d["panels"]:
            for t in panel.get("targets", []):
                out.append((f"{Path(path).name} panel {panel['id']} '{panel['title']}' {t['refId']}",
                            substitute(t["expr"], run=run, rate_interval=rate_interval)))
    return out


def alert_rules(path: Path) -> list[tuple[str, str]]:
    """(alert name, expr) of every alerting rule in a `groups:` file."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    return [(r["alert"], r["expr"].strip()) for g in doc["groups"] for r in g["rules"] if "alert" in r]


def as_bool(expr: str) -> str:
    """The expression with every comparison turned into its `bool` form: instead of keeping only the series
    that breach the threshold (none, in a healthy run), it returns 0/1 for every series the inputs have.
    So a non-empty result proves the inputs exist and the expression evaluates, firing or not."""
    return _COMPARISON.sub(lambda m: f" {m.group(1)} bool ", expr)


def alert_queries(path: Path) -> list[tuple[str, str]]:
    return [(f"alert {name}", as_bool(expr)) for name, expr in alert_rules(path)]

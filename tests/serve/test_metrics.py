"""The serving observability, end to end: a real Prometheus scrapes a served replica's metrics port, and every
serving panel of the fleet dashboard and the serving alert return data (tests/test_metrics.py does the same for
training); the chart's serve PodMonitor scrapes the port the RayService declares.

The served app is tests/serve_app.py's (shared with tests/serve/test_app.py). The alert's firing and quiet cases
are promtool unit tests in tests/promtool/alerts_test.yaml (tests/test_alerts.py runs them).
Run: .venv/bin/pytest tests/serve/test_metrics.py
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import prom as promlib

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "charts/llmctl/files/alerts.yaml"
FLEET = ROOT / "charts/llmctl/dashboards/fleet.json"


def _request(served, body: dict) -> int:
    req = urllib.request.Request(served.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_prometheus_scrapes_a_replica_and_the_serving_panels_and_alert_return_data(served, tmp_path):
    from tests.tools import ensure_prometheus

    ensure_prometheus()
    port = served.get("/healthz")["metrics_port"]
    queries = [q for q in promlib.dashboard_queries([FLEET], run=served.model, rate_interval="5s")
               + promlib.alert_queries(ALERTS) if "llmctl_serve_" in q[1]]
    assert len(queries) >= 8  # 5 panels (7 targets) and the alert
    with promlib.Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], rule_files=[ALERTS],
                            job="default/llmctl-serve") as prom:
        prom.wait_until(lambda: prom.query('count_over_time(up[5s]) >= 3'), "3 scrapes of the replica", 60)

        def traffic_and_gaps():
            # keep traffic flowing while the rate windows fill: good requests and a client error
            assert _request(served, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}) == 200
            assert _request(served, {"messages": []}) == 400
            return {where: expr for where, expr in queries if not prom.query(expr)} or None

        try:
            prom.wait_until(lambda: not traffic_and_gaps(), "every serving query to return data", 90)
        except promlib.PrometheusError:
            pytest.fail("serving queries without data:\n" + "\n".join(f"  {k}: {v}" for k, v in
                                                                         (traffic_and_gaps() or {}).items()))
        got = {r["metric"]["code"]: float(r["value"][1]) for r in prom.query(
            f'llmctl_serve_requests_total{{run="{served.model}"}}')}
        assert got["200"] >= 1 and got["400"] >= 1
        # the error ratio the alert computes is 0 here: clients' 4xx are not server errors
        ratio = [r for where, expr in queries if where == "alert LlmctlServeErrorRate" for r in prom.query(expr)]
        assert [float(r["value"][1]) for r in ratio] == [0.0]
        prom.wait_until(lambda: any(r["name"] == "LlmctlServeErrorRate" and r["health"] == "ok"
                                    and r.get("lastEvaluation", "").startswith("2") for r in prom.rules()),
                        "the serving alert to be evaluated healthy", 30)


def test_the_chart_scrapes_the_port_the_rayservice_declares(tmp_path):
    from cli.kube.config import ClusterConfig
    from cli.kube.rayservice import build_rayservice
    from tests.tools import ensure_helm
    from trainer.plan import RunSpec, plan

    out = subprocess.run([str(ensure_helm()), "template", "llmctl", str(ROOT / "charts/llmctl")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    monitors = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(out.stdout)
                if d and d.get("kind") == "PodMonitor"}
    serve = monitors["llmctl-serve"]
    run = json.loads(plan(RunSpec(depth=12, gpus=8, storage_root="s3://b", name="chatbot")).to_json())
    svc = build_rayservice(run, ClusterConfig(), namespace="team")
    cluster = svc["spec"]["rayClusterConfig"]
    worker, head = cluster["workerGroupSpecs"][0]["template"], cluster["headGroupSpec"]["template"]

    def selected(template) -> bool:
        labels = template["metadata"]["labels"]
        return all(labels.get(k) == v for k, v in serve["selector"]["matchLabels"].items())

    assert selected(worker) and not selected(head)
    ports = {p["name"] for p in worker["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in serve["podMetricsEndpoints"]} == {"llm-serve"} <= ports
    trainer = monitors["llmctl-trainer"]["selector"]["matchLabels"]
    assert not all(worker["metadata"]["labels"].get(k) == v for k, v in trainer.items())  # not a trainer


def test_hostile_metrics_server_binds_the_address_it_is_given():
    import psutil

    from trainer.serve.metrics import ServeMetrics

    class Engine:
        queue_depth = active = 0

    m = ServeMetrics("run", Engine())
    m.serve_http(0, host="127.0.0.1")
    (conn,) = [c for c in psutil.Process().net_connections("tcp") if c.laddr.port == m.port
               and c.status == psutil.CONN_LISTEN]
    assert conn.laddr.ip == "127.0.0.1" and m.host == "127.0.0.1"

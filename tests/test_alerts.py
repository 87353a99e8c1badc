"""Tests of the alert rules (charts/llmctl/files/alerts.yaml): promtool's own checks, a firing and a quiet
unit-test case for every alert (tests/promtool/alerts_test.yaml), the metric contract, the rules wrapped as
a PrometheusRule against the prometheus-operator CRD schema, and (once the chart exists) what helm renders.
Every rule is also run against a real Prometheus scraping a real run in tests/test_metrics.py.

Run: .venv/bin/pytest tests/test_alerts.py -v
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prom import alert_rules, as_bool
from trainer.metrics import METRIC_NAMES
from trainer.serve.metrics import SERVE_METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "charts/llmctl/files/alerts.yaml"
PROMTOOL_TESTS = ROOT / "tests/promtool/alerts_test.yaml"
CHART = ROOT / "charts/llmctl"

# The issue's list: stalled, MFU drop, NaN/inf loss, spend over estimate, cap reached, straggler, exporter down.
EXPECTED = {"LlmctlTrainingStalled", "LlmctlMFUDropped", "LlmctlLossNotFinite", "LlmctlSpendOverEstimate",
            "LlmctlBudgetCapReached", "LlmctlRankStraggling", "LlmctlExporterDown",
            "LlmctlServeErrorRate",  # served models (llmctl serve), tests/serve/test_metrics.py
            "LlmctlServeIdle", "LlmctlRayClusterIdle",  # idle GPUs: a served model, a Ray cluster
            "LlmctlStepStale"}  # a step that overran half the watchdog's bound: names the stuck rank
RAY_METRICS = {"ray_resources"}  # Ray's own system metrics the cluster alerts read (docs.ray.io system-metrics)


@pytest.fixture(scope="module")
def promtool():
    from tests.tools import ensure_prometheus

    ensure_prometheus()
    return shutil.which("promtool")


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules(promtool):
    out = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in out.stdout


def test_promtool_unit_tests_pass(promtool):
    out = subprocess.run([promtool, "test", "rules", str(PROMTOOL_TESTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    doc = yaml.safe_load(PROMTOOL_TESTS.read_text())
    assert [(PROMTOOL_TESTS.parent / p).resolve() for p in doc["rule_files"]] == [ALERTS.resolve()]
    firing, quiet = set(), set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert firing == EXPECTED, f"alerts without a firing case: {EXPECTED - firing}"
    assert quiet == EXPECTED, f"alerts without a quiet case: {EXPECTED - quiet}"


def test_alerts_are_the_issue_list_with_severity_and_words():
    assert {r["alert"] for r in rules()} == EXPECTED
    for r in rules():
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert set(r["annotations"]) == {"summary", "description"}, r["alert"]
        assert "{{ $labels.run }}" in r["annotations"]["summary"] or r["alert"] in (
            "LlmctlExporterDown", "LlmctlRayClusterIdle")  # a cluster is named by {{ $labels.ray_io_cluster }}


def test_alerts_use_only_contract_metrics():
    names = set(METRIC_NAMES) | set(SERVE_METRIC_NAMES) | {"up"} | RAY_METRICS
    for alert, expr in alert_rules(ALERTS):
        used = set(re.findall(r"\b(?:llmctl|ray)_[a-z_]+\b", expr)) - {"ray_io_cluster"} | ({"up"} if re.search(r"\bup\{", expr) else set())
        assert used, alert
        assert used <= names, f"{alert} uses names outside the contract: {used - names}"


def test_bool_form_keeps_label_matchers_and_turns_every_comparison():
    expr = 'up{job=~".*llmctl.*"} == 0\nand max_over_time(up{job!="x"}[1h]) == 1 and a > on (run) group_left () 2 * b'
    assert as_bool(expr) == ('up{job=~".*llmctl.*"} == bool 0\nand max_over_time(up{job!="x"}[1h]) == bool 1 '
                             'and a > bool on (run) group_left () 2 * b')


def test_rules_wrapped_as_a_prometheusrule_validate_against_the_operator_crd():
    from tests.schemas import validate  # strict: unknown fields fail, metadata checked as ObjectMeta

    validate({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
              "metadata": {"name": "llmctl", "labels": {"app.kubernetes.io/name": "llmctl"}},
              "spec": yaml.safe_load(ALERTS.read_text())})
    # The CRD's schema is loose about durations; Prometheus is not: every `for` parses as a duration.
    for r in rules():
        assert re.fullmatch(r"\d+[smh]", r.get("for", "0s")), r["alert"]


def test_helm_renders_these_rules_into_a_valid_prometheusrule():
    from tests.schemas import validate
    from tests.tools import ensure_helm

    out = subprocess.run([str(ensure_helm()), "template", "llmctl", str(CHART)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    found = [d for d in yaml.safe_load_all(out.stdout) if d and d.get("kind") == "PrometheusRule"]
    assert found, "helm template renders no PrometheusRule with the default values"
    want = yaml.safe_load(ALERTS.read_text())["groups"]
    assert any(d["spec"]["groups"] == want for d in found), "no PrometheusRule carries alerts.yaml unchanged"
    for d in found:
        validate(d)

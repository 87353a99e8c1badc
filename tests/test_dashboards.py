"""Tests of the Grafana dashboards (charts/llmctl/dashboards/*.json), without a Grafana server (none is
packaged here): structure and conventions (stable uid, `$datasource` and `$run` variables,
`$__rate_interval`), the metric contract, PromQL syntax through promtool, the panels the issue asks for, and
(once the chart exists) the ConfigMaps helm renders. Running every expression against a real Prometheus that
scrapes a real run is tests/test_metrics.py's end-to-end test.

Run: .venv/bin/pytest tests/test_dashboards.py -v
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prom import dashboard_queries
from trainer.metrics import METRIC_NAMES
from trainer.serve.metrics import SERVE_METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "charts/llmctl/dashboards"
CHART = ROOT / "charts/llmctl"
UIDS = {"overview.json": "llmctl-overview", "fleet.json": "llmctl-fleet"}  # stable: links and bookmarks use them
DS = {"type": "prometheus", "uid": "${datasource}"}


def load(name: str) -> dict:
    return json.loads((DIR / name).read_text())


def targets(d: dict):
    for p in d["panels"]:
        for t in p.get("targets", []):
            yield p, t


def names_used(d: dict) -> set[str]:
    return {n for _, t in targets(d) for n in re.findall(r"\bllmctl_[a-z_]+\b", t["expr"])}


def test_the_dashboards_are_exactly_overview_and_fleet_with_stable_uids():
    assert {p.name for p in DIR.glob("*.json")} == set(UIDS)
    for name, uid in UIDS.items():
        d = load(name)
        assert d["uid"] == uid and d["title"].startswith("llmctl / ") and "llmctl" in d["tags"]
        assert d["refresh"] and d["schemaVersion"] >= 36 and d["editable"] is True
        assert (DIR / name).read_text() == json.dumps(d, indent=2) + "\n", "keep the files formatted (indent 2)"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_datasource_and_run_variables(name):
    variables = {v["name"]: v for v in load(name)["templating"]["list"]}
    assert set(variables) == {"datasource", "run"}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query" and run["datasource"] == DS
    assert run["query"]["query"] == run["definition"] == "label_values(llmctl_run_info, run)"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_every_panel_and_target_uses_the_datasource_variable(name):
    for p in load(name)["panels"]:
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS and t["expr"].strip(), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


@pytest.mark.parametrize("name", sorted(UIDS))
def test_panels_have_unique_ids_and_do_not_overlap(name):
    panels = load(name)["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


@pytest.mark.parametrize("name", sorted(UIDS))
def test_expressions_follow_the_contract(name):
    """Only contract names; every selector filtered by $run; every range is $__rate_interval; every legend
    label survives the expression's aggregation."""
    for p, t in targets(load(name)):
        expr, where = t["expr"], f"{name} '{p['title']}' {t['refId']}"
        for metric in re.findall(r"\bllmctl_[a-z_]+\b", expr):
            assert metric in METRIC_NAMES + SERVE_METRIC_NAMES, f"{where}: {metric} is not a metric we export"
        selectors = re.findall(r"\bllmctl_[a-z_]+(\{[^}]*\})?", expr)
        assert selectors and all(s.startswith('{run=~"$run"') for s in selectors), f"{where}: filter by $run"
        assert set(re.findall(r"\[([^\]]+)\]", expr)) <= {"$__rate_interval"}, f"{where}: use $__rate_interval"
        kept = {lbl.strip() for grp in re.findall(r"\bby \(([^)]*)\)", expr) for lbl in grp.split(",")}
        for label in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")):
            assert label in kept, f"{where}: legend uses {label}, which the aggregation drops"


def test_overview_shows_what_the_issue_asks_for():
    used = names_used(load("overview.json"))
    want = {
        "tokens/s": "llmctl_tokens_total", "MFU": "llmctl_mfu_ratio", "loss": "llmctl_train_loss",
        "bpb": "llmctl_val_bpb", "progress": "llmctl_steps_total_planned", "ETA": "llmctl_eta_seconds",
        "$ spent": "llmctl_cost_dollars", "estimate": "llmctl_cost_estimated_dollars", "cap": "llmctl_cost_cap_dollars",
        "per-rank step time": "llmctl_step_seconds_count", "data-wait share": "llmctl_data_wait_seconds_total",
    }
    assert not {k for k, v in want.items() if v not in used}
    per_rank = [t for p, t in targets(load("overview.json")) if p["title"] == "Step time per rank"]
    assert per_rank and "rank)" in per_rank[0]["expr"]


def test_spend_panels_show_gpu_hours_restarts_and_time_lost():
    """Real spend: GPU-hours paid, restarts and the time they lost, on both dashboards."""
    for name in UIDS:
        exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in load(name)["panels"]}
        gpu_hours = [e for es in exprs.values() for e in es if "llmctl_gpu_seconds{" in e]
        assert gpu_hours and all(e.endswith("/ 3600") and "sum by (run, stage)" in e for e in gpu_hours), name
        assert any("max by (run) (llmctl_attempts" in e and e.endswith("- 1") for es in exprs.values() for e in es)
        assert any("llmctl_lost_seconds" in e for es in exprs.values() for e in es), name
    overview = {p["title"]: p for p in load("overview.json")["panels"]}
    hours = " ".join(t["expr"] for t in overview["GPU-hours: paid vs estimate, and lost to restarts"]["targets"])
    assert "max by (run) (llmctl_gpu_seconds_estimated" in hours
    assert overview["Time lost to restarts"]["fieldConfig"]["defaults"]["unit"] == "s"
    assert overview["Restarts"]["fieldConfig"]["defaults"]["decimals"] == 0


def test_fleet_shows_gpus_burn_and_mfu_per_run():
    d = load("fleet.json")
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in d["panels"]}
    assert "count by (run) (llmctl_run_info" in exprs["GPUs per run"]
    assert "deriv(llmctl_cost_dollars" in exprs["Burn rate per run ($/hour)"] and "* 3600" in exprs["Burn rate per run ($/hour)"]
    assert "avg by (run) (llmctl_mfu_ratio" in exprs["MFU per run"]
    run_var = {v["name"]: v for v in d["templating"]["list"]}["run"]
    assert run_var["multi"] and run_var["includeAll"] and run_var["allValue"] == ".*"


def test_every_expression_is_valid_promql(tmp_path):
    """promtool parses every expression (variables substituted) as a recording rule, offline."""
    from tests.tools import ensure_prometheus

    ensure_prometheus()
    queries = dashboard_queries(sorted(DIR.glob("*.json")), run="r", rate_interval="1m")
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:q{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}
    f = tmp_path / "dashboards.rules.yaml"
    f.write_text(yaml.safe_dump(rules))
    out = subprocess.run([shutil.which("promtool"), "check", "rules", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(queries)} rules found" in out.stdout


def test_helm_ships_each_dashboard_in_a_configmap_with_the_sidecar_label():
    from tests.tools import ensure_helm

    out = subprocess.run([str(ensure_helm()), "template", "llmctl", str(CHART)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    maps = [d for d in yaml.safe_load_all(out.stdout) if d and d.get("kind") == "ConfigMap"
            and "grafana_dashboard" in (d["metadata"].get("labels") or {})]
    shipped = [json.loads(v) for m in maps for k, v in (m.get("data") or {}).items() if k.endswith(".json")]
    for name in UIDS:
        assert load(name) in shipped, f"{name} is not shipped unchanged in a grafana_dashboard ConfigMap"


def _unit_of(panel: dict, target: dict) -> str | None:
    """The unit Grafana shows a target's values in: an override for its column (a table renames `Value #<ref>`),
    else the panel's default."""
    fc = panel.get("fieldConfig") or {}
    names = {f"Value #{target['refId']}"}
    for t in panel.get("transformations", []):
        if t["id"] == "organize":
            names |= {new for old, new in t["options"].get("renameByName", {}).items() if old in names}
    for o in fc.get("overrides", []):
        if o["matcher"]["id"] in ("byName", "byFrameRefID") and o["matcher"]["options"] in names | {target["refId"]}:
            for prop in o["properties"]:
                if prop["id"] == "unit":
                    return prop["value"]
    return fc.get("defaults", {}).get("unit")


@pytest.mark.parametrize("name", sorted(UIDS))
def test_every_dollar_figure_is_shown_in_dollars(name):
    """A cost value (llmctl_cost_*) is labelled as money, in tables too (each column has its own unit)."""
    shown = [(p["title"], t["refId"], _unit_of(p, t)) for p, t in targets(load(name))
             if re.search(r"\bllmctl_cost_(dollars|estimated_dollars|cap_dollars)\b", t["expr"])
             and "deriv(" not in t["expr"]]  # a burn rate is $/hour: also money, checked below
    assert shown and all(unit == "currencyUSD" for *_, unit in shown), shown
    burn = [(p["title"], _unit_of(p, t)) for p, t in targets(load(name)) if "deriv(llmctl_cost_dollars" in t["expr"]]
    assert all(unit == "currencyUSD" for _, unit in burn), burn

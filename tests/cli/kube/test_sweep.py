"""cli/kube/sweep.py and the chart's WorkloadPriorityClasses: a sweep's RayJobs rendered strictly valid for every
supported KubeRay release, each carrying the sweep and cell labels, the Kueue queue and the sweep's priority class;
the priority classes the chart ships valid for every supported Kueue release (through the real helm), the sweep's
value below production's; cell states read from RayJob statuses.

The cluster side (submission over quota, never twice, states, cancel) runs against the real control plane:
tests/test_sweep_real_cluster.py.

Run: .venv/bin/pytest tests/cli/kube/test_sweep.py -v
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cli.kube.config import PRODUCTION_PRIORITY_CLASS, SWEEP_PRIORITY_CLASS, ClusterConfig, config_from_configmap
from cli.kube.rayjob import PRIORITY_LABEL, QUEUE_LABEL, build_rayjob
from cli.kube.sweep import CELL_LABEL, SWEEP_LABEL, cell_state, render_cells, selector
from tests import schemas
from tests.tools import ensure_helm
from trainer.plan import RunSpec, plan

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "llmctl"
SWEEP = "isoflop"
DEPTHS = (10, 12, 14)


@pytest.fixture(scope="module")
def cells():
    """A 3-cell sweep as trainer/plan/sweep.py plans one: pretrain-only runs named <sweep>-<cell>."""
    out = []
    for d in DEPTHS:
        cell = f"f1e18-d{d}"
        out.append((cell, plan(RunSpec(depth=d, gpus=8, stages=("pretrain",), num_iterations=500,
                                       storage_root="s3://runs", name=f"{SWEEP}-{cell}"))))
    return out


@pytest.mark.parametrize("kuberay", schemas.KUBERAY_RELEASES)
def test_sweep_rayjobs_are_strictly_valid_on_every_kuberay_and_carry_label_queue_priority(cells, kuberay):
    cfg = ClusterConfig(queue="h100", kuberay_version=kuberay, kueue_priority_class=PRODUCTION_PRIORITY_CLASS)
    objs = render_cells(SWEEP, cells, cfg, namespace="team")
    assert schemas.validate_all(objs, {"kuberay": kuberay}) == 3
    assert [o["metadata"]["name"] for o in objs] == [p.name for _, p in cells]
    for (cell, _), rj in zip(cells, objs):
        labels = rj["metadata"]["labels"]
        assert labels[SWEEP_LABEL] == SWEEP and labels[CELL_LABEL] == cell
        assert labels[QUEUE_LABEL] == "h100" and rj["spec"]["suspend"] is True  # Kueue admits it
        assert labels[PRIORITY_LABEL] == SWEEP_PRIORITY_CLASS  # the sweep's, not the production runs' class
        for _, tpl in schemas.pod_templates(rj):  # `kubectl get pods -l llmctl.dev/sweep=...` finds its pods
            assert tpl["metadata"]["labels"][SWEEP_LABEL] == SWEEP and tpl["metadata"]["labels"][CELL_LABEL] == cell
    # the same cells render the same objects (names included): a re-run is recognised
    assert render_cells(SWEEP, cells, cfg, namespace="team") == objs


def test_sweep_and_production_runs_carry_their_own_kueue_priority(cells):
    cfg = ClusterConfig(queue="h100", kueue_priority_class="prod", kueue_sweep_priority_class="sweepers")
    run = build_rayjob(cells[0][1], cfg, namespace="team")
    (cell,) = render_cells(SWEEP, cells[:1], cfg, namespace="team")
    assert run["metadata"]["labels"][PRIORITY_LABEL] == "prod" and SWEEP_LABEL not in run["metadata"]["labels"]
    assert cell["metadata"]["labels"][PRIORITY_LABEL] == "sweepers"
    # Kueue reads the label only on queued jobs; without a queue neither carries one (and nothing is suspended)
    bare = render_cells(SWEEP, cells[:1], ClusterConfig(), namespace="team")[0]
    assert PRIORITY_LABEL not in bare["metadata"]["labels"] and "suspend" not in bare["spec"]
    assert PRIORITY_LABEL not in build_rayjob(cells[0][1], ClusterConfig(kueue_priority_class="prod"),
                                              namespace="team")["metadata"]["labels"]


@pytest.mark.parametrize("sweep, cell, message", [
    ("bad sweep", "c1", "sweep: 'bad sweep' cannot be a Kubernetes label value"),
    ("s", "x" * 64, "sweep cell"),
    ("s", "a,b=c", "sweep cell"),  # nothing that would widen the label selector
])
def test_sweep_names_that_cannot_be_labels_are_refused(cells, sweep, cell, message):
    with pytest.raises(ValueError, match=message):
        render_cells(sweep, [(cell, cells[0][1])], ClusterConfig(), namespace="team")


def test_sweep_cells_twice_or_sharing_a_run_name_are_refused(cells):
    with pytest.raises(ValueError, match="listed twice"):
        render_cells(SWEEP, [cells[0], cells[0]], ClusterConfig(), namespace="team")
    with pytest.raises(ValueError, match="share the run name"):
        render_cells(SWEEP, [cells[0], ("other", cells[0][1])], ClusterConfig(), namespace="team")
    assert selector(SWEEP) == "app.kubernetes.io/managed-by=llmctl,llmctl.dev/sweep=isoflop"


# ---------------------------------------------------------------------------------------------
# Cell states from RayJob statuses (KubeRay's jobDeploymentStatus / jobStatus; Kueue's suspend)

QUEUED = {"kueue.x-k8s.io/queue-name": "h100"}


@pytest.mark.parametrize("suspend, status, want", [
    (True, {}, "queued"),  # created, Kueue has not admitted it
    (True, {"jobDeploymentStatus": "Suspended"}, "queued"),
    (False, {}, "queued"),  # admitted, the operator has not taken it up yet
    (False, {"jobDeploymentStatus": "Initializing"}, "running"),
    (False, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "running"),
    (False, {"jobDeploymentStatus": "Retrying"}, "running"),
    (True, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "queued"),  # Kueue preempted it
    (False, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "done"),
    (False, {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "reason": "AppFailed"}, "failed"),
    (False, {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "failed"),
    (False, {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "failed"),
    (False, {"jobDeploymentStatus": "Waiting"}, "running"),
    (False, {"jobDeploymentStatus": "SomethingNewer"}, "running"),
    (False, "not a mapping", "queued"),  # a hostile answer reads as nothing reported
])
def test_sweep_cell_state_from_rayjob_status(suspend, status, want):
    rj = {"metadata": {"name": "s-c", "labels": QUEUED}, "spec": {"suspend": suspend}, "status": status}
    assert cell_state(rj) == want


# ---------------------------------------------------------------------------------------------
# The chart's (and k8s/kueue/'s) WorkloadPriorityClasses


def _helm(*args: str) -> list[dict]:
    res = subprocess.run([str(ensure_helm()), "template", "r", str(CHART), "-n", "team", *args],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [d for d in schemas.load_yaml_stream(res.stdout) if d]


@pytest.mark.parametrize("kueue", schemas.KUEUE_RELEASES)
def test_sweep_priority_classes_from_the_chart_validate_on_every_kueue_and_rank_below_production(cells, kueue):
    api = [a for v in schemas.served_versions("kueue.x-k8s.io", "LocalQueue", kueue)
           for a in ("--api-versions", f"kueue.x-k8s.io/{v}")]
    docs = _helm("--set", "kueue.priorityClasses.create=true", "--set", "kueue.localQueue.create=true", *api)
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "WorkloadPriorityClass"}
    assert sorted(classes) == [PRODUCTION_PRIORITY_CLASS, SWEEP_PRIORITY_CLASS]
    assert schemas.validate_all(classes.values(), {"kueue": kueue}) == 2
    # the ConfigMap names them, and a sweep cell and a run rendered from it carry them
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "llmctl-config"]
    cfg, warnings = config_from_configmap(cm)
    assert warnings == []
    run = build_rayjob(cells[0][1], cfg, namespace="team")["metadata"]["labels"][PRIORITY_LABEL]
    cell = render_cells(SWEEP, cells[:1], cfg, namespace="team")[0]["metadata"]["labels"][PRIORITY_LABEL]
    assert classes[cell]["value"] < classes[run]["value"]
    assert classes[cell]["value"] < 0  # below a run that carries no priority at all (Kueue's 0)


def test_sweep_priority_classes_in_k8s_match_the_chart():
    """k8s/kueue/priority-classes.yaml is for installs without the chart: the same names and values."""
    raw = schemas.load_yaml_stream((ROOT / "k8s" / "kueue" / "priority-classes.yaml").read_text())
    chart = _helm("--set", "kueue.priorityClasses.create=true")
    pick = lambda docs: {(d["metadata"]["name"], d["value"]) for d in docs if d["kind"] == "WorkloadPriorityClass"}  # noqa: E731
    assert pick(raw) == pick(chart) and len(pick(raw)) == 2
    for release in schemas.KUEUE_RELEASES:  # v1beta1: served by every supported Kueue
        assert schemas.validate_all(raw, {"kueue": release}) == 2

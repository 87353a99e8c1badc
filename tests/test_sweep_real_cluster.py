"""A sweep over its queue's quota, on the real control plane (tests/controlplane/, the session's `real_cluster`:
kube-apiserver, KubeRay 1.6.2, Kueue 0.17.0, kwok H100 nodes): cli/kube/sweep.py submits every cell as a user bound
only by the chart's Role, Kueue admits what the quota holds and keeps the rest suspended, a re-submission creates
nothing, a deleted (failed) cell is created again alone, `cell_states` says queued and running as the cluster does,
a production run preempts a sweep cell (the chart's WorkloadPriorityClasses), and cancel removes the sweep.

The cells' heads carry a node selector no node matches, so their Ray clusters stay Initializing: admitted and
holding quota for as long as the test looks. (No Ray runs in kwok's pods; a head that came up would start a
submitter, and KubeRay fails a K8sJobMode run ~30 s after its submitter ends: tests/cli/test_real_cluster.py.)

Run alone: .venv/bin/pytest tests/test_sweep_real_cluster.py -v   (the control plane starts once, 30-70 s)
"""

from __future__ import annotations

import argparse
import time

import pytest

from cli.errors import CLIError
from cli.kube.config import PRODUCTION_PRIORITY_CLASS, SWEEP_PRIORITY_CLASS, ClusterConfig
from cli.kube.rayjob import build_rayjob
from cli.kube.runs import create_run
from cli.kube.sweep import cancel_sweep, cell_states, delete_cells, render_cells, selector, submit_cells
from tests.controlplane.cluster import local_queue, wait_for
from tests.test_k8s_render_real_cluster import KUBERAY, RESTRICTED, _bind_chart_role, _helm, _ns
from trainer.plan import RunSpec, plan

WAIT_S = 180  # each wait returns as soon as its condition holds; the bound is for a saturated shared box
NS, SWEEP, USER = "sweep-over-quota", "iso", "erin"
GPU_QUOTA = 16  # two cells' worth: the sweep below asks for 4 x 8
# Everything else generous, so GPUs alone decide (every resource the pods request must be covered).
QUOTA = {"cpu": "1000", "memory": "16Ti", "nvidia.com/gpu": str(GPU_QUOTA), "ephemeral-storage": "16Ti"}
NOWHERE = {"llmctl.dev/test-no-node": "true"}  # the heads' node selector: no node carries it


def _workloads(api) -> list[dict]:
    code, wls = api.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{NS}/workloads")
    assert code == 200, wls
    return wls.get("items", [])


def _true(wl: dict, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in (wl.get("status") or {}).get("conditions", []))


def _gpus(wl: dict) -> int:
    """GPUs a Workload asks for: each pod set's count x its pods' nvidia.com/gpu requests."""
    total = 0
    for ps in wl["spec"]["podSets"]:
        for c in ps["template"]["spec"]["containers"]:
            total += ps["count"] * int(((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu", 0))
    return total


def _owner(wl: dict) -> str:
    return next(o["name"] for o in wl["metadata"]["ownerReferences"] if o["kind"] == "RayJob")


def test_real_cluster_sweep_over_quota_queues_never_submits_twice_yields_to_production_and_cancels(
        real_cluster, tmp_path, monkeypatch):
    from cli.kube.client import connect

    admin = real_cluster.admin()
    _ns(admin, NS, RESTRICTED)
    _bind_chart_role(admin, NS, USER)
    local_queue(admin, NS, "cq-sweep", QUOTA, preemption={"withinClusterQueue": "LowerPriority"}, deadline_s=WAIT_S)
    # the chart's classes, as an admin installs them (helm install: the cluster serves v1beta2)
    for d in _helm("--set", "kueue.priorityClasses.create=true", "--api-versions", "kueue.x-k8s.io/v1beta2"):
        if d["kind"] == "WorkloadPriorityClass":
            admin.create("/apis/kueue.x-k8s.io/v1beta2/workloadpriorityclasses", d)
    monkeypatch.setenv("KUBECONFIG", str(real_cluster.kubeconfig(USER, tmp_path / "kc.yaml", namespace=NS)))
    kube = connect(argparse.Namespace(kubeconfig=None, context=None, namespace=NS))

    cfg = ClusterConfig(queue="lq", kuberay_version=KUBERAY, head_node_selector=NOWHERE)
    cells = [(f"f1e18-d{d}", plan(RunSpec(depth=d, gpus=8, stages=("pretrain",), num_iterations=200,
                                          storage_root="s3://runs", name=f"{SWEEP}-f1e18-d{d}")))
             for d in (4, 6, 8, 10)]
    objs = render_cells(SWEEP, cells, cfg, namespace=NS)
    assert submit_cells(kube, objs) == [p.name for _, p in cells]  # every RayJob accepted

    # Kueue admits what the quota holds; the rest wait, suspended, their Workloads pending (never failed)
    def settled():
        wls = _workloads(admin)
        admitted = [w for w in wls if _true(w, "Admitted")]
        pending = [w for w in wls if not _true(w, "QuotaReserved")
                   and any(c["type"] == "QuotaReserved" and c["status"] == "False"
                           for c in (w.get("status") or {}).get("conditions", []))]
        return (admitted, pending) if len(wls) == 4 and len(admitted) == 2 and len(pending) == 2 else None

    admitted, pending = wait_for("2 cells admitted, 2 pending", settled, time.monotonic() + WAIT_S, real_cluster.procs)
    assert sum(_gpus(w) for w in admitted) <= GPU_QUOTA and all(_gpus(w) == 8 for w in admitted + pending)
    for w in admitted + pending:  # the chart's llmctl-sweep and its value
        assert w["spec"]["priorityClassRef"]["name"] == SWEEP_PRIORITY_CLASS and w["spec"]["priority"] == -1000
    assert all("insufficient" in next(c["message"] for c in w["status"]["conditions"] if c["type"] == "QuotaReserved")
               for w in pending)
    running_cells = {_owner(w).removeprefix(f"{SWEEP}-") for w in admitted}
    queued_cells = {_owner(w).removeprefix(f"{SWEEP}-") for w in pending}
    for w in pending:
        code, rj = admin.get(f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/{_owner(w)}")
        assert code == 200 and rj["spec"]["suspend"] is True, rj

    want = {**{c: "running" for c in running_cells}, **{c: "queued" for c in queued_cells}}
    states = wait_for("cell_states: admitted cells running", lambda: (s := cell_states(kube, NS, SWEEP)) == want and s,
                      time.monotonic() + WAIT_S, real_cluster.procs)
    assert "failed" not in states.values()

    # Re-submitting the same sweep creates nothing: the RayJobs are there as the same cells
    assert submit_cells(kube, render_cells(SWEEP, cells, cfg, namespace=NS)) == []
    code, listed = admin.get(f"/apis/ray.io/v1/namespaces/{NS}/rayjobs?labelSelector={selector(SWEEP)}")
    assert code == 200 and len(listed["items"]) == 4

    # A failed cell is retried by deleting its RayJob first: the next submission creates that one and only it
    retry = sorted(queued_cells)[0]
    assert delete_cells(kube, NS, SWEEP, {retry}) == [f"{SWEEP}-{retry}"]
    assert submit_cells(kube, render_cells(SWEEP, cells, cfg, namespace=NS)) == [f"{SWEEP}-{retry}"]

    # A production run (llmctl-production) on the same queue preempts one sweep cell instead of waiting behind them
    prod = plan(RunSpec(depth=4, gpus=8, stages=("pretrain",), num_iterations=200, storage_root="s3://runs",
                        name="production"))
    create_run(kube, prod.name, build_rayjob(prod, cfg.replace(kueue_priority_class=PRODUCTION_PRIORITY_CLASS),
                                             namespace=NS))

    def production_admitted():
        wls = _workloads(admin)
        mine = [w for w in wls if _owner(w) == prod.name and _true(w, "Admitted")]
        sweep_admitted = [w for w in wls if _owner(w) != prod.name and _true(w, "Admitted")]
        return mine if mine and len(sweep_admitted) == 1 else None

    (wl,) = wait_for("the production run admitted over a sweep cell", production_admitted,
                     time.monotonic() + WAIT_S, real_cluster.procs)
    assert wl["spec"]["priorityClassRef"]["name"] == PRODUCTION_PRIORITY_CLASS and wl["spec"]["priority"] == 100000
    states = wait_for("cell_states: one cell preempted back to queued",
                      lambda: (s := cell_states(kube, NS, SWEEP)) and list(s.values()).count("queued") == 3 and s,
                      time.monotonic() + WAIT_S, real_cluster.procs)
    assert list(states.values()).count("running") == 1 and "failed" not in states.values()

    # Cancel removes the sweep's RayJobs (by label), and only them
    assert cancel_sweep(kube, NS, SWEEP) == sorted(p.name for _, p in cells)
    wait_for("the sweep's RayJobs gone", lambda: cell_states(kube, NS, SWEEP) == {}, time.monotonic() + WAIT_S,
             real_cluster.procs)
    assert admin.get(f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/{prod.name}")[0] == 200
    assert cancel_sweep(kube, NS, SWEEP) == []


def test_real_cluster_sweep_cell_naming_a_missing_priority_class_stays_queued_and_status_says_why(
        real_cluster, tmp_path, monkeypatch):
    """Kueue makes no Workload for a job whose WorkloadPriorityClass does not exist (its job reconciler stops at the
    lookup): the cell stays queued, and `llmctl status`'s reason names the class."""
    import datetime

    from cli.kube.client import connect
    from cli.kube.runs import kueue_reason
    from trainer.spend import parse_iso

    admin = real_cluster.admin()
    ns = _ns(admin, "sweep-missing-class")
    local_queue(admin, ns, "cq-sweep-missing", QUOTA, deadline_s=WAIT_S)
    monkeypatch.setenv("KUBECONFIG", str(real_cluster.kubeconfig("admin", tmp_path / "kc.yaml", namespace=ns)))
    kube = connect(argparse.Namespace(kubeconfig=None, context=None, namespace=ns))
    cfg = ClusterConfig(queue="lq", kuberay_version=KUBERAY, kueue_sweep_priority_class="llmctl-no-such-class")
    p = plan(RunSpec(depth=4, gpus=8, stages=("pretrain",), num_iterations=200, storage_root="s3://runs",
                     name="lost-f1e18-d4"))
    (name,) = submit_cells(kube, render_cells("lost", [("f1e18-d4", p)], cfg, namespace=ns))

    log = real_cluster.log("kueue")
    # Kueue 0.17 logs: "Handling job with no workload" ... WorkloadPriorityClass.kueue.x-k8s.io "<name>" not found
    wait_for("Kueue's reconciler stopping at the missing class", lambda: any(
        "Handling job with no workload" in line and name in line and "llmctl-no-such-class" in line
        for line in log.read_text(errors="replace").splitlines()), time.monotonic() + WAIT_S, real_cluster.procs)
    code, wls = admin.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads")
    assert code == 200 and wls["items"] == []
    assert cell_states(kube, ns, "lost") == {"f1e18-d4": "queued"}
    _, rj = admin.get(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/{name}")
    later = parse_iso(rj["metadata"]["creationTimestamp"]) + datetime.timedelta(minutes=2)
    assert "WorkloadPriorityClass llmctl-no-such-class does not exist" in kueue_reason(kube, rj, now=later)
    # a RayJob of that name that is not this cell of this sweep is neither skipped nor replaced
    with pytest.raises(CLIError, match=f"RayJob {name} already exists .* but is not cell c1 of sweep other"):
        submit_cells(kube, render_cells("other", [("c1", p)], cfg, namespace=ns))
    assert cancel_sweep(kube, ns, "other") == [] and cancel_sweep(kube, ns, "lost") == [name]

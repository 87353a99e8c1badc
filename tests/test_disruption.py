"""Disruption guards (cli/kube/guards.py, charts/llmctl/templates/pdb.yaml): the head never on spot, the
autoscalers' do-not-disrupt annotations on every Ray pod, and a PodDisruptionBudget over the head, rendered
valid for every supported release and proved on the real control plane: the scheduler keeps the head off a
spot node, and the Eviction API refuses to evict the guarded head (429).

Run: .venv/bin/pytest tests/test_disruption.py -v
"""

from __future__ import annotations

import time

import pytest
import yaml

from cli.kube.config import ClusterConfig
from cli.kube.guards import DO_NOT_DISRUPT, SPOT_NODE_LABELS, head_affinity, head_pdb
from cli.kube.rayjob import build_rayjob
from tests import schemas
from trainer.plan import RunSpec, plan

STORAGE = "s3://llmctl-runs"
WAIT_S = 180


def _rayjob(cfg: ClusterConfig | None = None, **spec):
    p = plan(RunSpec(depth=12, gpus=16, storage_root=STORAGE, **spec))
    return build_rayjob(p, cfg or ClusterConfig(), namespace="team")


def _node_matches(affinity: dict, labels: dict) -> bool:
    """Whether a node with `labels` passes the required node affinity (terms ORed, expressions ANDed)."""
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]

    def ok(e):
        have = labels.get(e["key"])
        return {"In": lambda: have in e["values"], "NotIn": lambda: have not in e["values"],
                "Exists": lambda: have is not None, "DoesNotExist": lambda: have is None}[e["operator"]]()

    return any(all(ok(e) for e in t.get("matchExpressions", [])) for t in terms)


@pytest.mark.parametrize("provider, spot", [("gke", {"cloud.google.com/gke-spot": "true"}),
                                            ("eks", {"eks.amazonaws.com/capacityType": "SPOT"}),
                                            ("gke", {"karpenter.sh/capacity-type": "spot"}),
                                            ("gke", {"kubernetes.azure.com/scalesetpriority": "spot"}),
                                            ("label", {"pool": "cheap"})])
def test_disruption_head_is_never_placed_on_spot_for_any_provider(provider, spot):
    cfg = ClusterConfig(spot_provider=provider, spot_node_selector={"pool": "cheap"} if provider == "label" else {})
    for run_on_spot in (False, True):
        rj = _rayjob(cfg, spot=run_on_spot)
        head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert not _node_matches(head["affinity"], {"kubernetes.io/hostname": "n", **spot})
        assert _node_matches(head["affinity"], {"kubernetes.io/hostname": "n", "pool": "on-demand"})
        assert _node_matches(head["affinity"], {"eks.amazonaws.com/capacityType": "ON_DEMAND"})


def test_disruption_head_affinity_keeps_the_configured_affinity():
    base = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]},
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]}]}},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    aff = head_affinity(ClusterConfig(), base)
    assert aff["podAntiAffinity"] == base["podAntiAffinity"]
    assert _node_matches(aff, {"pool": "b"}) and not _node_matches(aff, {"pool": "c"})
    assert not _node_matches(aff, {"pool": "a", "cloud.google.com/gke-spot": "true"})
    assert len(base["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
               ["matchExpressions"]) == 1  # the config's own affinity is not changed in place
    rj = _rayjob(ClusterConfig(affinity=base))
    workers = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["affinity"] == base  # workers keep the configured affinity; spot is their choice (--spot)


def test_disruption_annotations_on_every_ray_pod_and_pdb_over_the_head_only():
    rj = _rayjob(ClusterConfig(pod_annotations={"team": "x"}))
    cluster = rj["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        ann = group["template"]["metadata"]["annotations"]
        assert ann == {"team": "x", **DO_NOT_DISRUPT}
    created = {**rj, "metadata": {**rj["metadata"], "uid": "u-1"}}
    pdb = head_pdb(created)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {"llmctl.dev/run": rj["metadata"]["name"], "llmctl.dev/role": "head"}
    head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    worker_labels = cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    submitter_labels = rj["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    sel = pdb["spec"]["selector"]["matchLabels"]
    assert sel.items() <= head_labels.items()
    assert not sel.items() <= worker_labels.items() and not sel.items() <= submitter_labels.items()
    assert pdb["metadata"]["ownerReferences"] == [{"apiVersion": "ray.io/v1", "kind": "RayJob",
                                                   "name": rj["metadata"]["name"], "uid": "u-1"}]
    schemas.validate(pdb)


@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
def test_disruption_guards_render_valid_for_every_supported_kuberay(release):
    for spot in (False, True):
        rj = _rayjob(ClusterConfig(kuberay_version=release, queue="h100"), spot=spot)
        schemas.validate(rj, {"kuberay": release})
        assert rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["affinity"]


def test_disruption_chart_guards_the_warm_cluster_head_and_lets_its_user_create_budgets(tmp_path):
    import subprocess

    from tests.test_chart import CHART, CI_VALUES
    from tests.tools import ensure_helm

    out = subprocess.run([str(ensure_helm()), "template", "r", str(CHART), "-n", "team", "-f", str(CI_VALUES),
                          "--set", "rayCluster.enabled=true"], capture_output=True, text=True, check=True).stdout
    docs = schemas.load_yaml_stream(out)
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    (rc,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    schemas.validate(pdb)
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-submit")]
    assert any("poddisruptionbudgets" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    off = subprocess.run([str(ensure_helm()), "template", "r", str(CHART), "-n", "team"], capture_output=True,
                         text=True, check=True).stdout
    assert "PodDisruptionBudget" not in off  # no warm cluster, no budget


# ---------------------------------------------------------------------------------------------
# On the real control plane


def _pods(api, ns, selector):
    _, pods = api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector={selector}")
    return pods.get("items", [])


def test_disruption_real_cluster_head_off_spot_and_its_eviction_refused(real_cluster, tmp_path, capsys):
    from cli.main import main
    from tests.controlplane.cluster import wait_for
    from tests.test_controlplane import _ns

    api = real_cluster.admin()
    ns = _ns(api, "guarded")
    pool = {"llmctl.test/pool": "guarded-heads"}
    real_cluster.add_node("heads-spot-0", "gke-n2-standard-16", {**pool, "cloud.google.com/gke-spot": "true"})
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"storageRoot": "s3://llmctl-runs", "head": {"nodeSelector": pool},
                                   "workers": {"gpuLabels": "gke"}}))
    kc = real_cluster.kubeconfig("admin", tmp_path / "admin.yaml", namespace=ns)
    rc = main(["submit", "--depth", "12", "--gpus", "8", "--yes", "--cluster-config", str(cfg), "--kubeconfig", str(kc),
               "-n", ns, "--name", "guarded-d12"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "warning" not in err, err  # the budget was created
    code, pdb = api.get(f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/guarded-d12-head")
    assert code == 200, pdb
    assert pdb["metadata"]["ownerReferences"][0]["kind"] == "RayJob"
    head_sel = "llmctl.dev/run=guarded-d12,llmctl.dev/role=head"

    def pending_for_affinity():
        for pod in _pods(api, ns, head_sel):
            for c in pod["status"].get("conditions") or []:
                if c["type"] == "PodScheduled" and c["status"] == "False" and "affinity" in (c.get("message") or ""):
                    return pod
        return None

    # The only node of the head's pool is a spot node: the scheduler leaves the head Pending.
    pod = wait_for("head Pending: only a spot node in its pool", pending_for_affinity, time.monotonic() + WAIT_S,
                   real_cluster.procs)
    assert not pod["spec"].get("nodeName")
    real_cluster.add_node("heads-ondemand-0", "gke-n2-standard-16", pool)

    def head_running():
        for p in _pods(api, ns, head_sel):
            if p["status"].get("phase") == "Running":
                return p
        return None

    head = wait_for("head Running on the on-demand node", head_running, time.monotonic() + WAIT_S, real_cluster.procs)
    assert head["spec"]["nodeName"] == "heads-ondemand-0"
    assert head["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"

    def budget_counted():
        _, b = api.get(f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/guarded-d12-head")
        st = b.get("status") or {}
        ok = (st.get("observedGeneration") == b["metadata"]["generation"] and st.get("currentHealthy") == 1
              and st.get("disruptionsAllowed") == 0)
        return b if ok else None

    wait_for("the disruption controller counts the head", budget_counted, time.monotonic() + WAIT_S, real_cluster.procs)
    name = head["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": ns}}
    code, out = api.request("POST", f"/api/v1/namespaces/{ns}/pods/{name}/eviction", eviction)
    assert code == 429, out
    assert "would violate the pod's disruption budget" in out["message"], out
    code, still = api.get(f"/api/v1/namespaces/{ns}/pods/{name}")
    assert code == 200 and not still["metadata"].get("deletionTimestamp")

    # The same eviction of a pod no budget covers goes through (201): the refusal is the budget's.
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare", "labels": {"llmctl.dev/run": "guarded-d12"}},
            "spec": {"nodeName": "heads-ondemand-0", "containers": [{"name": "c", "image": "busybox:1.36"}]}}
    assert api.request("POST", f"/api/v1/namespaces/{ns}/pods", bare)[0] == 201
    code, out = api.request("POST", f"/api/v1/namespaces/{ns}/pods/bare/eviction",
                            {**eviction, "metadata": {"name": "bare", "namespace": ns}})
    assert code == 201, out

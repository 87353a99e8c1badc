"""Topology-aware placement (cli/kube/topology.py): the worker pod template's Kueue TAS annotation chosen from
the run's size and the config's `placement.topology` levels, the plan pricing a run spread over domains, and
on the real control plane: Kueue admits a block-required run onto one block of simulated nodes, refuses a
run that needs one block but fits only across two, and admits it across two when preferred; `doctor` sees
the Topology and its flavor.

Run: .venv/bin/pytest tests/test_topology_placement.py -v
"""

from __future__ import annotations

import argparse
import time

import pytest
import yaml

from cli.kube.config import ClusterConfig
from cli.kube.rayjob import build_rayjob
from cli.kube.topology import EXAMPLES, PREFERRED, REQUIRED, check_levels, choose
from cli.planning import cluster_interconnect
from tests import schemas
from trainer.plan import RunSpec, plan

STORAGE = "s3://llmctl-runs"
BLOCK = "cloud.google.com/gce-topology-block"
HOST = "kubernetes.io/hostname"
WAIT_S = 180

ONPREM = EXAMPLES["on-prem"]  # spine 64 nodes (2:1 across spines), rack 16, host 1


@pytest.mark.parametrize("pods, mode, level, crosses, factor", [
    (1, None, None, (), 1.0),  # one pod is one node
    (2, "required", "rack", ("host",), 1.0),
    (16, "required", "rack", ("host",), 1.0),
    (17, "required", "spine", ("rack", "host"), 1.0),
    (64, "required", "spine", ("rack", "host"), 1.0),
    (65, "preferred", "spine", ("spine", "rack", "host"), 2.0),  # bigger than a spine: spread, at half bandwidth
])
def test_topology_placement_level_follows_the_run_size(pods, mode, level, crosses, factor):
    p = choose(pods, ONPREM)
    assert (p.mode, p.level, p.crosses, p.busbw_factor) == (mode, level, crosses, factor)


def test_topology_placement_unknown_domain_size_asks_for_one_of_the_widest():
    p = choose(3, EXAMPLES["gke"])  # block and subblock sizes unknown: one block, required
    assert (p.mode, p.node_label) == ("required", BLOCK)
    assert p.annotations() == {REQUIRED: BLOCK}
    assert choose(3, [{"nodeLabel": BLOCK, "nodes": 2}]).annotations() == {PREFERRED: BLOCK}


@pytest.mark.parametrize("levels, why, config_says", [  # config_says: the chart's schema where it can say it
    ([{"name": "x"}], "needs a nodeLabel", r"placement\.topology\.0: 'nodeLabel' is a required property"),
    ([{"nodeLabel": "a", "nodes": 0}], "integer >= 1", r"placement\.topology\.0\.nodes: must be >= 1"),
    ([{"nodeLabel": "a", "nodes": 2}, {"nodeLabel": "b", "nodes": 4}], "widest to narrowest",
     r"placement\.topology: .*widest to narrowest"),
    ([{"nodeLabel": "a"}, {"nodeLabel": "a"}], "listed twice", r"placement\.topology: .*listed twice"),
    ([{"nodeLabel": "a", "oversubscription": 0.5}], ">= 1", r"placement\.topology\.0\.oversubscription: must be >= 1"),
    ([{"nodeLabel": "a", "racks": 2}], "unknown keys", r"placement\.topology\.0: .*'racks' was unexpected"),
])
def test_topology_placement_bad_levels_are_refused_naming_the_key(levels, why, config_says):
    assert why in check_levels(levels)
    from cli.errors import UsageError

    with pytest.raises(UsageError, match=config_says):
        ClusterConfig.from_dict({"placement": {"topology": levels}})


@pytest.mark.parametrize("provider", sorted(EXAMPLES))
@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
def test_topology_placement_annotation_on_workers_only_valid_for_every_release(provider, release):
    cfg = ClusterConfig(topology=tuple(EXAMPLES[provider]), queue="h100", kuberay_version=release)
    rj = build_rayjob(plan(RunSpec(depth=20, gpus=32, storage_root=STORAGE)), cfg, namespace="team")
    schemas.validate(rj, {"kuberay": release})
    cluster = rj["spec"]["rayClusterSpec"]
    ann = cluster["workerGroupSpecs"][0]["template"]["metadata"]["annotations"]
    assert ann.get(REQUIRED) == choose(4, EXAMPLES[provider]).node_label
    assert REQUIRED not in cluster["headGroupSpec"]["template"]["metadata"].get("annotations", {})
    one_node = build_rayjob(plan(RunSpec(depth=12, gpus=8, storage_root=STORAGE)), cfg, namespace="team")
    assert not {REQUIRED, PREFERRED} & set(one_node["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
                                           ["metadata"]["annotations"])


def test_topology_placement_config_round_trips_through_the_configmap_shape():
    cfg = ClusterConfig(topology=tuple(ONPREM))
    back, warnings = ClusterConfig.from_dict(cfg.to_dict())
    assert back == cfg and warnings == []
    values = yaml.safe_load(open("charts/llmctl/values.yaml"))["config"]["placement"]
    assert values["topology"] == []  # off by default


def test_topology_placement_the_plan_prices_a_spread_run():
    """A run larger than a spine crosses spines at 2:1: the plan's interconnect time per step doubles (or more)
    against the same run at the fabric's full bandwidth, and the plan's note says why."""
    levels = ({"name": "spine", "nodeLabel": "example.com/spine", "nodes": 8, "oversubscription": 2},
              {"name": "rack", "nodeLabel": "example.com/rack", "nodes": 4}, {"name": "host", "nodeLabel": HOST, "nodes": 1})
    cfg = ClusterConfig(topology=levels)
    gbs, note = cluster_interconnect(argparse.Namespace(interconnect_gbs=None, gpus=128), cfg)  # 16 pods
    assert gbs == pytest.approx(150.0) and "preferred by spine" in note and "bus bandwidth / 2" in note
    spread = plan(RunSpec(depth=26, gpus=128, storage_root=STORAGE, interconnect_busbw_gbs=gbs))
    packed = plan(RunSpec(depth=26, gpus=128, storage_root=STORAGE, interconnect_busbw_gbs=300.0))
    assert spread.interconnect["interconnect_seconds"] > 1.9 * packed.interconnect["interconnect_seconds"]
    assert spread.estimate.total_dollars > packed.estimate.total_dollars
    inside, note = cluster_interconnect(argparse.Namespace(interconnect_gbs=None, gpus=64), cfg)  # 8 pods
    assert inside is None and note == "topology: required in one spine; crosses rack, host"
    measured, note = cluster_interconnect(argparse.Namespace(interconnect_gbs=200.0, gpus=128), cfg)
    assert measured == pytest.approx(100.0)  # a given figure is divided the same way


# ---------------------------------------------------------------------------------------------
# On the real control plane: Kueue's TAS admits, refuses and spreads


def _hostnames(assignment: dict) -> list[str]:
    """The node names of a v1beta2 topologyAssignment (levels = [hostname]), one per pod."""
    out = []
    for sl in assignment["slices"]:
        n = sl["domainCount"]
        vals = sl["valuesPerLevel"][-1]
        if "universal" in vals:
            names = [vals["universal"]] * n
        else:
            ind = vals["individual"]
            names = [ind.get("prefix", "") + r + ind.get("suffix", "") for r in ind["roots"]]
        counts = sl["podCounts"].get("individual") or [sl["podCounts"].get("universal")] * n
        for name, c in zip(names, counts):
            out += [name] * c
    return out


def _workload(api, ns, job):
    _, wls = api.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads")
    for wl in wls.get("items", []):
        if any(o["name"] == job for o in wl["metadata"].get("ownerReferences", [])):
            return wl
    return None


def _cond(wl, kind):
    return next((c for c in (wl or {}).get("status", {}).get("conditions", []) if c["type"] == kind), None)


def test_topology_placement_real_cluster_one_block_or_none(real_cluster, tmp_path, capsys):
    from cli.main import main
    from tests.controlplane.cluster import wait_for
    from tests.test_controlplane import _ns

    api = real_cluster.admin()
    ns = _ns(api, "tas")
    pool = {"llmctl.test/pool": "tas"}
    blocks = {}
    for b in ("b1", "b2"):
        for i in range(2):
            name = f"tas-{b}-{i}"
            real_cluster.add_node(name, "gke-a3-highgpu-8g", {**pool, BLOCK: b})
            blocks[name] = b
    api.create("/apis/kueue.x-k8s.io/v1beta2/topologies", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Topology", "metadata": {"name": "fleet"},
        "spec": {"levels": [{"nodeLabel": BLOCK}, {"nodeLabel": HOST}]}})
    api.create("/apis/kueue.x-k8s.io/v1beta2/resourceflavors", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "tas-h100"},
        "spec": {"nodeLabels": pool, "topologyName": "fleet",
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}})
    big = [{"name": r, "nominalQuota": q} for r, q in (("cpu", "2000"), ("memory", "20000Gi"),
                                                       ("nvidia.com/gpu", "64"), ("ephemeral-storage", "100Ti"))]
    api.create("/apis/kueue.x-k8s.io/v1beta2/clusterqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "tas-cq"},
        "spec": {"namespaceSelector": {}, "resourceGroups": [{
            "coveredResources": [r["name"] for r in big], "flavors": [{"name": "tas-h100", "resources": big}]}]}})
    api.create(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/localqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "tas"},
        "spec": {"clusterQueue": "tas-cq"}})

    def active():
        _, cq = api.get("/apis/kueue.x-k8s.io/v1beta2/clusterqueues/tas-cq")
        return _cond(cq, "Active") and _cond(cq, "Active")["status"] == "True"

    wait_for("TAS ClusterQueue Active", active, time.monotonic() + WAIT_S, real_cluster.procs)

    def submit(name, gpus, levels):
        cfg = ClusterConfig(queue="tas", gpu_labels="gke", topology=tuple(levels))
        rj = build_rayjob(plan(RunSpec(depth=12, gpus=gpus, storage_root=STORAGE, name=name)), cfg, namespace=ns)
        code, out = api.request("POST", f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", rj)
        assert code == 201, out
        return rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]

    def admitted(name):
        wl = _workload(api, ns, name)
        c = _cond(wl, "Admitted")
        return wl if c and c["status"] == "True" else None

    def delete(name):
        api.request("DELETE", f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/{name}")
        wait_for(f"{name}'s Workload gone", lambda: _workload(api, ns, name) is None, time.monotonic() + WAIT_S,
                 real_cluster.procs)

    # 1. Two worker pods, block size known (2 nodes): required in one block; admitted onto one block.
    two = [{"name": "block", "nodeLabel": BLOCK, "nodes": 2}, {"name": "host", "nodeLabel": HOST, "nodes": 1}]
    group = submit("tas-two", 16, two)
    wl = wait_for("2-pod run admitted", lambda: admitted("tas-two"), time.monotonic() + WAIT_S, real_cluster.procs)
    (ps,) = [a for a in wl["status"]["admission"]["podSetAssignments"] if a["name"] == group]
    hosts = _hostnames(ps["topologyAssignment"])
    assert len(hosts) == 2 and len(set(hosts)) == 2 and {blocks[h] for h in hosts} in ({"b1"}, {"b2"}), hosts
    delete("tas-two")

    # 2. Four pods, one block required (its size unknown to the config): no block has 4 nodes, so Kueue
    # refuses though the 4 nodes of two blocks would hold them.
    one_block = [{"name": "block", "nodeLabel": BLOCK}, {"name": "host", "nodeLabel": HOST, "nodes": 1}]
    submit("tas-four", 32, one_block)

    def refused():
        c = _cond(_workload(api, ns, "tas-four"), "QuotaReserved")
        return c if c and c["status"] == "False" and "topology" in c.get("message", "").lower() else None

    why = wait_for("4-pod one-block run refused", refused, time.monotonic() + WAIT_S, real_cluster.procs)
    assert not admitted("tas-four"), why
    delete("tas-four")

    # 3. The same run with the block size known prefers a block: admitted, spread over both blocks.
    group = submit("tas-spread", 32, two)
    wl = wait_for("4-pod run admitted across blocks", lambda: admitted("tas-spread"), time.monotonic() + WAIT_S,
                  real_cluster.procs)
    (ps,) = [a for a in wl["status"]["admission"]["podSetAssignments"] if a["name"] == group]
    hosts = _hostnames(ps["topologyAssignment"])
    assert len(set(hosts)) == 4 and {blocks[h] for h in hosts} == {"b1", "b2"}, hosts

    # doctor sees the Topology and its flavor
    cfgfile = tmp_path / "cluster.yaml"
    cfgfile.write_text(yaml.safe_dump({"storageRoot": STORAGE, "queue": "tas", "placement": {"topology": two}}))
    kc = real_cluster.kubeconfig("admin", tmp_path / "admin.yaml", namespace=ns)
    main(["doctor", "--cluster-config", str(cfgfile), "--kubeconfig", str(kc), "-n", ns])
    out, _ = capsys.readouterr()
    (line,) = [ln for ln in out.splitlines() if ln[:1] in "✓!✗" and ln.split()[1] == "topology"]
    assert line.startswith("✓") and "Topology fleet" in line and "tas-h100" in line, line

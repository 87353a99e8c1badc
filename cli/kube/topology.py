"""Topology-aware placement of a run's workers through Kueue's topology-aware scheduling (TAS).

Kueue (TopologyAwareScheduling: beta and on by default since 0.14; sigs.k8s.io/kueue pkg/features) reads two
pod-template annotations of each PodSet (apis/kueue/v1beta2/topology_types.go) and admits a Workload only
when the PodSet fits the requested topology domain of a flavor whose ResourceFlavor names a Topology:

    kueue.x-k8s.io/podset-required-topology: <level's node label>   all pods in ONE domain of that level, or wait
    kueue.x-k8s.io/podset-preferred-topology: <level's node label>  as few domains as fit, narrowest first

The cluster config's `placement.topology` lists the levels, widest first, as the Kueue Topology does:
`[{name: block, nodeLabel: cloud.google.com/gce-topology-block, nodes: 16, oversubscription: 2}, ...]`
(`nodes`: nodes per domain, when known; `oversubscription`: how much less bandwidth a ring gets across two
domains of this level than inside one). `choose` picks, from the number of worker pods (one per node):
the narrowest level whose domain holds them all, required; a run larger than every known domain prefers the
widest level. `busbw_factor` is what the plan's interconnect model divides the fabric's bus bandwidth by for
the levels the run crosses (trainer/plan/interconnect.py prices it). The head carries no request.

`doctor_lines` reads whether a Topology and a ResourceFlavor naming it exist (the doctor's topology line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REQUIRED = "kueue.x-k8s.io/podset-required-topology"
PREFERRED = "kueue.x-k8s.io/podset-preferred-topology"

# Examples for the docs and the tests: the node labels each platform puts on GPU nodes.
# GKE (https://cloud.google.com/ai-hypercomputer/docs/workloads/schedule-gke-workloads-tas);
# EKS (EC2 instance topology, https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/ec2-instance-topology.html,
# labels set by the EKS node labeler on supported instance types);
# on premises: whatever labels the site sets (here a rack label), e.g. from NVIDIA Topograph.
EXAMPLES = {
    "gke": [{"name": "block", "nodeLabel": "cloud.google.com/gce-topology-block"},
            {"name": "subblock", "nodeLabel": "cloud.google.com/gce-topology-subblock"},
            {"name": "host", "nodeLabel": "kubernetes.io/hostname", "nodes": 1}],
    "eks": [{"name": "layer-1", "nodeLabel": "topology.k8s.aws/network-node-layer-1"},
            {"name": "layer-2", "nodeLabel": "topology.k8s.aws/network-node-layer-2"},
            {"name": "layer-3", "nodeLabel": "topology.k8s.aws/network-node-layer-3"},
            {"name": "host", "nodeLabel": "kubernetes.io/hostname", "nodes": 1}],
    "on-prem": [{"name": "spine", "nodeLabel": "example.com/spine", "nodes": 64, "oversubscription": 2},
                {"name": "rack", "nodeLabel": "example.com/rack", "nodes": 16, "oversubscription": 1},
                {"name": "host", "nodeLabel": "kubernetes.io/hostname", "nodes": 1}],
}


def check_levels(levels) -> str | None:
    """Why `levels` is not a usable topology, or None."""
    seen = set()
    prev_nodes = math.inf
    for lvl in levels:
        if not isinstance(lvl, dict) or not isinstance(lvl.get("nodeLabel"), str) or not lvl["nodeLabel"]:
            return f"each level needs a nodeLabel (a node label key), got {lvl!r}"
        if set(lvl) - {"name", "nodeLabel", "nodes", "oversubscription"}:
            return f"unknown keys {sorted(set(lvl) - {'name', 'nodeLabel', 'nodes', 'oversubscription'})} in {lvl!r}"
        if lvl["nodeLabel"] in seen:
            return f"nodeLabel {lvl['nodeLabel']} is listed twice"
        seen.add(lvl["nodeLabel"])
        n = lvl.get("nodes")
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                return f"nodes of {lvl['nodeLabel']} must be an integer >= 1, got {n!r}"
            if n > prev_nodes:
                return f"levels go from widest to narrowest, but {lvl['nodeLabel']} has more nodes than the one before"
            prev_nodes = n
        o = lvl.get("oversubscription")
        if o is not None and (isinstance(o, bool) or not isinstance(o, (int, float)) or o < 1):
            return f"oversubscription of {lvl['nodeLabel']} must be a number >= 1, got {o!r}"
    return None


@dataclass(frozen=True)
class Placement:
    mode: str | None  # "required" | "preferred" | None (no request)
    level: str | None  # the level's name (or its label)
    node_label: str | None
    crosses: tuple[str, ...] = ()  # the levels whose domains the run may span more than one of
    busbw_factor: float = 1.0  # divide the fabric's bus bandwidth by this

    def annotations(self) -> dict[str, str]:
        if self.mode is None:
            return {}
        return {REQUIRED if self.mode == "required" else PREFERRED: self.node_label}

    def note(self) -> str | None:
        if self.mode is None:
            return None
        where = f"{self.mode} in one {self.level}" if self.mode == "required" else f"preferred by {self.level}"
        cross = f"; crosses {', '.join(self.crosses)}" if self.crosses else ""
        slow = f" (bus bandwidth / {self.busbw_factor:g})" if self.busbw_factor > 1 else ""
        return f"topology: {where}{cross}{slow}"


def _name(lvl: dict) -> str:
    return lvl.get("name") or lvl["nodeLabel"]


def choose(pods: int, levels) -> Placement:
    """The worker pods' placement: required at the narrowest level that holds `pods` nodes, else preferred at
    the widest. One pod is one node: no request."""
    levels = list(levels)
    if not levels or pods <= 1:
        return Placement(None, None, None)
    fit = None
    for i in range(len(levels) - 1, -1, -1):  # narrowest first
        n = levels[i].get("nodes")
        if n is not None and n >= pods:
            fit = i
            break
    if fit is None and levels[0].get("nodes") is None:
        fit = 0  # the widest domain's size is unknown: ask for one of it (Kueue says so if none fits)
    if fit is not None:
        crossed = [lv for lv in levels[fit + 1:] if (lv.get("nodes") or 0) < pods]
        mode, lvl = "required", levels[fit]
    else:
        crossed = [lv for lv in levels if (lv.get("nodes") or 0) < pods]
        mode, lvl = "preferred", levels[0]
    factor = max([float(lv.get("oversubscription") or 1) for lv in crossed] or [1.0])
    return Placement(mode, _name(lvl), lvl["nodeLabel"], tuple(_name(lv) for lv in crossed), factor)


def placement_for(plan, cfg) -> Placement:
    from cli.kube.layout import worker_layout

    pods, _ = worker_layout(plan.spec.gpus, cfg.gpus_per_node)
    return choose(pods, cfg.topology)


def apply(worker_template: dict, placement: Placement) -> None:
    """Put the placement's annotation on a worker pod template."""
    ann = placement.annotations()
    if ann:
        meta = worker_template.setdefault("metadata", {})
        meta["annotations"] = {**(meta.get("annotations") or {}), **ann}


# ---------------------------------------------------------------------------------------------
# What the cluster has (llmctl doctor)


def doctor_lines(kube, cfg) -> tuple[str, str, str] | None:
    """(status, detail, fix) of the topology check: a Topology exists, a ResourceFlavor names it, and the
    configured levels are its levels; None when there is nothing to say (no TAS configured or installed)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(kube.api_client)
    topologies, flavors = None, None
    for version in ("v1beta2", "v1beta1"):
        try:
            topologies = custom.list_cluster_custom_object("kueue.x-k8s.io", version, "topologies",
                                                           _request_timeout=(10, 30)).get("items", [])
            flavors = custom.list_cluster_custom_object("kueue.x-k8s.io", version, "resourceflavors",
                                                        _request_timeout=(10, 30)).get("items", [])
            break
        except ApiException as e:
            if e.status == 403:
                return ("warn", "cannot list Kueue Topologies/ResourceFlavors (forbidden): topology not checked", "")
            continue
    want = [lv["nodeLabel"] for lv in cfg.topology]
    if topologies is None:
        if want:
            return ("fail", "placement.topology is set but Kueue serves no Topology API (TAS needs Kueue >= 0.9; "
                    "beta and on by default from 0.14)", "install Kueue 0.14+, or empty placement.topology")
        return None  # no topology configured, no Topology API
    tas = {f["metadata"]["name"]: f["spec"]["topologyName"] for f in flavors or []
           if (f.get("spec") or {}).get("topologyName")}
    names = {t["metadata"]["name"]: [lv["nodeLabel"] for lv in (t.get("spec") or {}).get("levels", [])]
             for t in topologies}
    if not want:
        if tas:
            return ("warn", f"TAS flavors exist ({', '.join(f'{f} -> {t}' for f, t in sorted(tas.items()))}) but "
                    f"placement.topology is empty: runs ask for no topology", "set placement.topology to the "
                    f"Topology's levels (docs/kubernetes.md, Many nodes)")
        return None  # no Topology flavor, no topology configured
    match = [n for n, levels in names.items() if levels == want]
    if not match:
        have = "; ".join(f"{n}: {', '.join(ls)}" for n, ls in sorted(names.items())) or "none"
        return ("fail", f"no Topology has the levels of placement.topology ({', '.join(want)}); Topologies: {have}",
                "create a kueue.x-k8s.io Topology with these levels (docs/kubernetes.md, Many nodes)")
    flavor = sorted(f for f, t in tas.items() if t in match)
    if not flavor:
        return ("fail", f"Topology {match[0]} exists but no ResourceFlavor names it (spec.topologyName): Kueue "
                f"would admit runs without placing them", f"set topologyName: {match[0]} on the GPU ResourceFlavor")
    return ("ok", f"Topology {match[0]} ({' > '.join(want)}) with TAS flavor(s) {', '.join(flavor)}", "")

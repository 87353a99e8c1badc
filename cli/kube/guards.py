"""Disruption guards of a run: what keeps a running run's pods from being taken away on purpose.

- The head never on spot: a required node affinity that rules out every provider's spot label (NotIn also
  matches nodes without the label, so ordinary nodes stay eligible). The head holds the GCS and the driver;
  losing it ends the attempt, whereas a lost worker is a restart from the last checkpoint.
- The autoscalers' "do not disrupt" annotations on every Ray pod of the run (head and workers): Karpenter
  (`karpenter.sh/do-not-disrupt: "true"`, v1 API; https://karpenter.sh/docs/concepts/disruption/) does not
  consolidate or drift a node running such a pod, and the cluster autoscaler
  (`cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`; its FAQ "What types of pods can prevent CA from
  removing a node?") does not scale its node down. Neither stops a spot reclaim or a node failure
  (involuntary): those are what checkpoints are for.
- A PodDisruptionBudget (policy/v1) over the head pod with `minAvailable: 1`: the Eviction API (`kubectl
  drain`, node upgrades, Karpenter's and the autoscaler's drains) is refused with 429 while the head runs.
  It is owned by the RayJob, so the garbage collector deletes it with the run. Workers get no PDB: a drain
  that must proceed (a node upgrade) can take a worker, and the run resumes from its checkpoint.

Pure data; `create_head_pdb` is the one API call (made by `llmctl submit` after the RayJob).
"""

from __future__ import annotations

from cli.kube.pods import ROLE_LABEL, RUN_LABEL

DO_NOT_DISRUPT = {
    "karpenter.sh/do-not-disrupt": "true",
    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
}

# Spot/preemptible node labels by provider, as the nodes carry them: GKE Spot VMs (and the older preemptible
# VMs), EKS managed node groups, Karpenter NodePools (any cloud) and AKS spot node pools.
SPOT_NODE_LABELS = (
    ("cloud.google.com/gke-spot", "true"),
    ("cloud.google.com/gke-preemptible", "true"),
    ("eks.amazonaws.com/capacityType", "SPOT"),
    ("karpenter.sh/capacity-type", "spot"),
    ("kubernetes.azure.com/scalesetpriority", "spot"),
)


def not_spot_expressions(cfg) -> list[dict]:
    """matchExpressions that hold only on nodes that are not spot (the providers' labels and, with
    spotProvider "label", the configured spot label)."""
    pairs = list(SPOT_NODE_LABELS)
    if getattr(cfg, "spot_provider", None) == "label":
        pairs += [(k, v) for k, v in (cfg.spot_node_selector or {}).items()]
    by_key: dict[str, list[str]] = {}
    for k, v in pairs:
        by_key.setdefault(k, [])
        if v not in by_key[k]:
            by_key[k].append(v)
    return [{"key": k, "operator": "NotIn", "values": vs} for k, vs in by_key.items()]


def head_affinity(cfg, base: dict | None = None) -> dict:
    """The head's affinity: `base` (the config's placement.affinity) with the not-spot expressions ANDed into
    every required node selector term (a term list is ORed, so each term gets them)."""
    import copy

    out = copy.deepcopy(base or {})
    node = out.setdefault("nodeAffinity", {})
    required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        exprs = term.setdefault("matchExpressions", [])
        have = {(e.get("key"), e.get("operator")) for e in exprs}
        exprs += [e for e in not_spot_expressions(cfg) if (e["key"], e["operator"]) not in have]
    return out


def guard_cluster_spec(cluster_spec: dict, cfg) -> None:
    """On a rayClusterSpec (RayJob) or a RayCluster spec: the head off spot, every Ray pod annotated."""
    head = cluster_spec["headGroupSpec"]["template"]
    head["spec"]["affinity"] = head_affinity(cfg, head["spec"].get("affinity"))
    for group in [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]:
        meta = group["template"].setdefault("metadata", {})
        meta["annotations"] = {**(meta.get("annotations") or {}), **DO_NOT_DISRUPT}


def head_pdb_name(run: str) -> str:
    return f"{run}-head"


def head_pdb(rayjob: dict) -> dict:
    """The head's PodDisruptionBudget for a RayJob (as created, with its uid: the owner reference needs it)."""
    meta = rayjob["metadata"]
    run = meta["name"]
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(("app.kubernetes.io/", "llmctl.dev/"))}
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": head_pdb_name(run), "namespace": meta.get("namespace"),
                     "labels": {**labels, "app.kubernetes.io/component": "disruption-budget"}},
        "spec": {
            "minAvailable": 1,  # an integer: counts pods of any owner (maxUnavailable needs a /scale)
            "selector": {"matchLabels": {RUN_LABEL: run, ROLE_LABEL: "head"}},
            # An unhealthy (not Ready) head may be evicted: a crash-looping head must not block a drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    if meta.get("uid"):
        pdb["metadata"]["ownerReferences"] = [{"apiVersion": rayjob.get("apiVersion", "ray.io/v1"), "kind": "RayJob",
                                               "name": run, "uid": meta["uid"]}]
    if not pdb["metadata"]["namespace"]:
        del pdb["metadata"]["namespace"]
    return pdb


def create_head_pdb(kube, rayjob: dict) -> str | None:
    """Create the head's PDB for a created RayJob; None when done, else a warning line (the run goes on
    without it, e.g. when the caller may not create PodDisruptionBudgets)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    pdb = head_pdb(rayjob)
    try:
        client.PolicyV1Api(kube.api_client).create_namespaced_pod_disruption_budget(kube.namespace, pdb,
                                                                              field_validation="Strict")
    except ApiException as e:
        if e.status == 409:  # a resubmitted run: the same name, the same selector
            return None
        return (f"no PodDisruptionBudget for the head of {rayjob['metadata']['name']} ({e.status} {e.reason}): a "
                f"drain may evict it; the chart's Role grants poddisruptionbudgets create")
    return None

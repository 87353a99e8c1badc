"""Idle Ray clusters for `llmctl list`: a RayCluster whose GPUs are paid for while no llmctl job runs on it.

From the API alone (the LlmctlRayClusterIdle alert does the same from Ray's metrics): a cluster is busy while
a RayJob that owns it or targets it is active, and idle since the last such RayJob ended (else since it was
created). `list` prints one warning line per cluster idle longer than `--idle-after`.
"""

from __future__ import annotations

import datetime

from cli.errors import UsageError
from cli.console import clean
from trainer.spend import parse_iso

GROUP, VERSION = "ray.io", "v1"


def _age(seconds: float) -> str:
    return f"{seconds / 86400:.1f}d" if seconds >= 86400 else f"{seconds / 3600:.1f}h" if seconds >= 3600 \
        else f"{seconds / 60:.0f}m"

ACTIVE = ("submitted", "queued", "starting", "running", "retrying")


def parse_duration(text: str) -> float:
    """'90m', '2h', '1d', '45s' -> seconds; anything else is a UsageError."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text or "")
    if not m:
        raise UsageError(f"--idle-after: expected a duration like 30m, 2h or 1d, got {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def list_clusters(kube, all_namespaces: bool) -> list[dict]:
    """The RayClusters `list` can see; none when it may not list them (an older chart's Role) or KubeRay is
    absent: idle detection is a courtesy, never a failure of `list`."""
    from kubernetes.client.rest import ApiException

    try:
        if all_namespaces:
            res = kube.custom.list_cluster_custom_object(GROUP, VERSION, "rayclusters", _request_timeout=(10, 60))
        else:
            res = kube.custom.list_namespaced_custom_object(GROUP, VERSION, kube.namespace, "rayclusters",
                                                            _request_timeout=(10, 60))
    except ApiException:
        return []
    return res.get("items", []) if isinstance(res, dict) else []


def cluster_gpus(rc: dict) -> int:
    """GPUs a RayCluster holds: each worker group's replicas x its containers' nvidia.com/gpu limits."""
    total = 0
    for group in (rc.get("spec") or {}).get("workerGroupSpecs") or []:
        try:
            per_pod = sum(int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
                          for c in group["template"]["spec"]["containers"])
            total += per_pod * int(group.get("replicas") or 0)
        except (KeyError, TypeError, ValueError):
            continue
    return total


def idle_warnings(clusters: list[dict], rayjobs: list[dict], now: datetime.datetime, idle_after: float,
                  state_of) -> list[str]:
    """One line per RayCluster that has run no llmctl job for longer than `idle_after` seconds. A cluster is
    busy while a RayJob that owns it (one cluster per run) or targets it (`spec.clusterSelector`, e.g. the
    chart's warm cluster with `submit --ray-cluster`) is active; it has been idle since the last such
    RayJob ended, else since it was created. A RayService's cluster is left to the serving alert.
    `state_of(rayjob)` is the run's state in words (cli/jobs.py `describe`, passed in: jobs imports this module)."""
    by_uid = {(rj.get("metadata") or {}).get("uid"): rj for rj in rayjobs}
    out = []
    for rc in clusters:
        meta = rc.get("metadata") or {}
        name, ns = meta.get("name") or "?", meta.get("namespace") or ""
        owners = meta.get("ownerReferences") or []
        if any(o.get("kind") == "RayService" for o in owners):
            continue
        jobs = [by_uid[o.get("uid")] for o in owners if o.get("kind") == "RayJob" and o.get("uid") in by_uid]
        jobs += [rj for rj in rayjobs if ((rj.get("spec") or {}).get("clusterSelector") or {}).get("ray.io/cluster")
                 == name and (rj.get("metadata") or {}).get("namespace", ns) == ns]
        if any(state_of(rj)[0] in ACTIVE for rj in jobs):
            continue
        ends = [parse_iso((rj.get("status") or {}).get("endTime")) for rj in jobs]
        since = max([t for t in ends if t] + [t for t in [parse_iso(meta.get("creationTimestamp"))] if t],
                    default=None)
        if since is None or (now - since).total_seconds() <= idle_after:
            continue
        gpus = cluster_gpus(rc)
        out.append(f"RayCluster {clean(name, limit=63)}{f' in {ns}' if ns else ''} has run no job for "
                   f"{_age((now - since).total_seconds())}" + (f" and holds {gpus} GPU(s)" if gpus else "")
                   + f"; delete it (kubectl delete raycluster {clean(name, limit=63)}"
                   + (f" -n {ns}" if ns else "") + ") or scale its workers to 0 until the next run")
    return out

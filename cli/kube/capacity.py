"""Why a queued run waits, from its Kueue Workload: for quota, for capacity (a ProvisioningRequest admission
check: GKE DWS, check-capacity, EKS Capacity Blocks through the cluster autoscaler), or requeued after its
pods were not ready in time (Kueue's waitForPodsReady, with backoff). `llmctl status` shows the line.

Workload fields read (kueue.x-k8s.io v1beta2/v1beta1, pkg/workload): conditions QuotaReserved / Admitted /
Evicted / Requeued, `status.admissionChecks[{name, state: Pending|Ready|Retry|Rejected, message}]`,
`status.requeueState{count, requeueAt}`. The Workload of a RayJob is the one whose owner is that RayJob.
"""

from __future__ import annotations


def _cond(wl: dict, kind: str) -> dict | None:
    return next((c for c in (wl.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def waiting_reason(wl: dict) -> str | None:
    """One line: why this Workload is not admitted, or None when it is (or nothing is known)."""
    admitted = _cond(wl, "Admitted")
    if admitted and admitted.get("status") == "True":
        return None
    st = wl.get("status") or {}
    evicted = _cond(wl, "Evicted")
    requeue = st.get("requeueState") or {}
    if evicted and evicted.get("status") == "True" and evicted.get("reason") == "PodsReadyTimeout":
        line = f"requeued: its pods were not ready in time ({evicted.get('message', '').strip()})"
        if requeue.get("count"):
            line += f"; retry {requeue['count']}"
        if requeue.get("requeueAt"):
            line += f", next at {requeue['requeueAt']}"
        return line
    quota = _cond(wl, "QuotaReserved")
    if quota and quota.get("status") == "True":
        pending = [c for c in st.get("admissionChecks") or [] if c.get("state") != "Ready"]
        if pending:
            parts = [f"{c.get('name')} {c.get('state', 'Pending')}" + (f": {c['message']}" if c.get("message") else "")
                     for c in pending]
            return "waiting for capacity: " + "; ".join(parts)
        return None
    if quota and quota.get("message"):
        return f"waiting for quota: {quota['message']}"
    if requeue.get("requeueAt"):
        return f"requeued (retry {requeue.get('count', '?')}), next at {requeue['requeueAt']}"
    return None


def workload_of(kube, run: str) -> dict | None:
    """The run's Workload, or None (Kueue absent, no permission, none yet)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(kube.api_client)
    for version in ("v1beta2", "v1beta1"):
        try:
            items = custom.list_namespaced_custom_object("kueue.x-k8s.io", version, kube.namespace, "workloads",
                                                         _request_timeout=(10, 30)).get("items", [])
        except (ApiException, ValueError, OSError):
            continue
        for wl in items:
            if any(o.get("kind") == "RayJob" and o.get("name") == run
                   for o in wl.get("metadata", {}).get("ownerReferences") or []):
                return wl
        return None
    return None


def queue_reason(kube, run: str) -> str | None:
    wl = workload_of(kube, run)
    return waiting_reason(wl) if wl else None

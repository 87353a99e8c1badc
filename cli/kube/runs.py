"""Runs on the cluster: KubeRay RayJobs that llmctl created, read back and said in words.

`get_run` (a missing namespace told apart from a missing run), `describe` (the RayJob's status as one of
submitted, queued, starting, running, retrying, succeeded, stopped, failed, and why), `summary` (one run as a
flat dict: what `status -o json` prints and the tables show), `create_run` (POST, waiting out a same-named run
that KubeRay is still deleting). The API coordinates are GROUP, VERSION, PLURAL; MANAGED selects llmctl's runs.
"""

from __future__ import annotations

import datetime

from cli import console
from cli.errors import CLIError
from cli.kube.pods import GROUP, VERSION
from trainer.plan.pricing import dollars
from trainer.spend import parse_iso

PLURAL = "rayjobs"
MANAGED = "app.kubernetes.io/managed-by=llmctl"


def get_run(kube, name: str) -> dict:
    """GET the RayJob `name`; a plain 404 whose namespace does not exist says so (a real server answers
    `rayjobs.ray.io "x" not found` for both cases, so the namespace is asked for separately)."""
    try:
        return kube.call(kube.custom.get_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL, name,
                         what=f"get run {name}", verb="get", resource=PLURAL, name=name, group=GROUP)
    except CLIError as e:
        if f"no rayjob {name!r}" in str(e):
            check_namespace(kube)
        raise


def check_namespace(kube) -> None:
    """Raise a CLIError when the namespace does not exist (GET /api/v1/namespaces/<ns> answers 404
    `namespaces "x" not found`); anything else (403: the user may not read namespaces) says nothing."""
    from kubernetes.client.rest import ApiException

    try:
        kube.core.read_namespace(kube.namespace, _request_timeout=(10, 30))
    except ApiException as e:
        if e.status == 404:
            raise CLIError(f"namespace {kube.namespace} does not exist; check -n and the kubeconfig context's "
                           f"namespace (kubectl get namespaces)") from None
    except Exception:  # noqa: BLE001 - only a hint; the caller's own error stands
        return


FAILURE_REASONS = {
    "DeadlineExceeded": "ran past its deadline (activeDeadlineSeconds, from the estimate with a margin)",
    "PreRunningDeadlineExceeded": "its pods did not start in time (no free GPUs, a node selector no node "
                                  "matches, or a slow image pull; see the pod events)",
    "AppFailed": "the training program exited with an error (see llmctl logs)",
    "SubmissionFailed": "the job could not be submitted to the Ray cluster (see llmctl logs)",
    "JobStatusCheckTimeoutExceeded": "the Ray head stopped answering (head pod lost?)",
    "JobDeploymentStatusTransitionGracePeriodExceeded": "the Ray job ended but the cluster did not settle",
    "ValidationFailed": "KubeRay rejected the spec",
}


def describe(rj: dict) -> tuple[str, str]:
    """(state, detail): the state is one of submitted, queued, starting, running, retrying, succeeded,
    stopped, failed; the detail says why, in words (RayJob jobDeploymentStatus / jobStatus / reason)."""
    st = rj.get("status") or {}
    spec = rj.get("spec") or {}
    dep, job, reason = st.get("jobDeploymentStatus") or "", st.get("jobStatus") or "", st.get("reason") or ""
    message = (st.get("message") or "").strip()
    queue = (rj.get("metadata", {}).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
    if dep in ("", "New"):
        if spec.get("suspend") and queue:
            return "queued", f"waiting for Kueue to admit it from queue {queue}"
        return "submitted", "waiting for the KubeRay operator to pick it up (is it running?)"
    if dep in ("Suspended", "Suspending"):
        return "queued", (f"waiting for Kueue to admit it from queue {queue}" if queue else "suspended")
    if dep == "Initializing":
        return "starting", "creating the Ray cluster (pods scheduling, image pulling)"
    if dep == "Waiting":
        return "starting", "waiting for a job to be submitted (interactive mode)"
    if dep == "Retrying":
        failed = st.get("failed") or 0
        return "retrying", (f"attempt {failed} of {1 + (spec.get('backoffLimit') or 0)} failed; a new Ray "
                            f"cluster resumes from the last checkpoint")
    if dep == "Running":
        if job == "RUNNING":
            return "running", f"training on Ray cluster {st.get('rayClusterName', '?')}"
        return "starting", f"Ray cluster up, Ray job {job or 'not yet submitted'}"
    if dep == "Complete":
        if job == "SUCCEEDED":
            return "succeeded", "all stages finished"
        if job == "STOPPED":
            return "stopped", "the Ray job was stopped"
        return "failed", FAILURE_REASONS.get(reason, f"Ray job {job or 'ended'}") + (f": {message}" if message else "")
    if dep in ("Failed", "ValidationFailed"):
        why = FAILURE_REASONS.get(reason or dep, reason or "failed")
        return "failed", why + (f": {message}" if message else "")
    return dep.lower(), message or f"jobDeploymentStatus {dep}"


def summary(rj: dict, now: datetime.datetime | None = None) -> dict:
    """The status of one run as a flat dict (what `status -o json` prints and the table shows)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    meta, st = rj.get("metadata") or {}, rj.get("status") or {}
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    state, detail = describe(rj)

    def num(key: str) -> float | None:
        try:
            return float(ann[key])
        except (KeyError, ValueError):
            return None

    gpus = int(labels.get("llmctl.dev/gpus", "0") or 0)
    price = num("llmctl.dev/price-per-gpu-hour")
    start, end = parse_iso(st.get("startTime")), parse_iso(st.get("endTime"))
    elapsed = ((end or now) - start).total_seconds() if start else None
    out = {
        "name": meta.get("name"), "namespace": meta.get("namespace"), "state": state, "detail": detail,
        "depth": int(labels["llmctl.dev/depth"]) if "llmctl.dev/depth" in labels else None,
        "gpus": gpus, "gpu_type": labels.get("llmctl.dev/gpu-type"),
        "created": meta.get("creationTimestamp"), "started": st.get("startTime"), "ended": st.get("endTime"),
        "elapsed_hours": None if elapsed is None else elapsed / 3600,
        "estimate_hours": num("llmctl.dev/estimate-hours"), "estimate_dollars": num("llmctl.dev/estimate-dollars"),
        "budget_cap_dollars": num("llmctl.dev/budget-cap-dollars"), "price_per_gpu_hour": price,
        # GPU time paid so far at the plan's price: wall clock since the cluster started x GPUs x price
        "spent_dollars": None if elapsed is None or price is None else dollars(elapsed / 3600, gpus, price),
        "storage": ann.get("llmctl.dev/storage"), "progress": None,
    }
    return out


def wait_gone(kube, name: str) -> bool:
    """Wait (bounded: console.wait_until) until the RayJob `name` is gone; whether it went."""
    def gone() -> bool:
        try:
            get_run(kube, name)
        except CLIError as e:
            if f"no rayjob {name!r}" in str(e):
                return True
            raise
        return False

    return console.wait_until(gone)


def create_run(kube, name: str, rayjob: dict) -> dict:
    """POST the RayJob. A 409 "object is being deleted" (a cancelled run of the same name still holds KubeRay's
    finalizer while the operator stops its Ray job) waits, bounded and said on stderr, for the old object to go,
    then creates."""
    def create() -> dict:
        return kube.call(kube.custom.create_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL,
                         rayjob, what=f"create RayJob {name}", verb="create", resource=PLURAL, name=name,
                         group=GROUP)

    try:
        return create()
    except CLIError as e:
        if "is still being deleted" not in str(e):
            raise
    console.say(f"RayJob {name} is still being deleted (KubeRay stops its Ray job before it lets go); waiting up to "
        f"{console.WAIT_SECONDS:.0f} s for it to go, then creating")
    if not wait_gone(kube, name):
        raise CLIError(f"RayJob {name} in namespace {kube.namespace} was still being deleted after "
                       f"{console.WAIT_SECONDS:.0f} s; is the KubeRay operator running? Try again later")
    return create()


# ---------------------------------------------------------------------------------------------
# Why a run waits: its Kueue Workload, its RayCluster's conditions, and Warning events


KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")  # v1beta2 from Kueue 0.15; v1beta1 served by 0.13 to 0.19
WORKLOAD_GRACE_SECONDS = 60  # Kueue makes a job's Workload within seconds; after this its absence means something


def _true(conds: list, kind: str) -> dict | None:
    return next((c for c in conds or [] if c.get("type") == kind and c.get("status") == "True"), None)


def _false(conds: list, kind: str) -> dict | None:
    return next((c for c in conds or [] if c.get("type") == kind and c.get("status") == "False"), None)


def find_workload(kube, rj: dict) -> tuple[dict | None, str | None]:
    """(the Kueue Workload made for this RayJob, None) or (None, why it could not be read). Kueue labels a job's
    Workload kueue.x-k8s.io/job-uid=<the job's uid> (pkg/controller/constants)."""
    from kubernetes.client.rest import ApiException

    uid = (rj.get("metadata") or {}).get("uid")
    if not uid:
        return None, None
    for version in KUEUE_VERSIONS:
        try:
            res = kube.custom.list_namespaced_custom_object(KUEUE_GROUP, version, kube.namespace, "workloads",
                                                            label_selector=f"kueue.x-k8s.io/job-uid={uid}",
                                                            _request_timeout=(10, 30))
        except ApiException as e:
            if e.status == 404:
                continue  # this version is not served; try the older one
            if e.status == 403:
                from cli.kube.client import permission

                return None, (f"cannot read its Kueue Workload ({permission('list', 'workloads', KUEUE_GROUP, kube.namespace)} "
                              f"is not granted; the chart's Role grants it from this version)")
            return None, f"cannot read its Kueue Workload (HTTP {e.status})"
        items = (res or {}).get("items") or []
        return (items[0] if items else None), None
    return None, "Kueue's API (kueue.x-k8s.io) is not served: is Kueue installed?"


def kueue_reason(kube, rj: dict, now: datetime.datetime | None = None) -> str | None:
    """Why Kueue has not admitted a queued run, in words, from its Workload (None when there is nothing to add)."""
    from cli.console import clean

    now = now or datetime.datetime.now(datetime.timezone.utc)
    meta = rj.get("metadata") or {}
    queue = (meta.get("labels") or {}).get("kueue.x-k8s.io/queue-name")
    wl, problem = find_workload(kube, rj)
    if problem:
        return problem
    if wl is None:
        created = parse_iso(meta.get("creationTimestamp"))
        age = (now - created).total_seconds() if created else 0
        if age < WORKLOAD_GRACE_SECONDS:
            return "Kueue has not made its Workload yet"
        wpc = (meta.get("labels") or {}).get("kueue.x-k8s.io/priority-class")
        missing = (f", or its WorkloadPriorityClass {clean(wpc, limit=253)} does not exist (kubectl get "
                   f"workloadpriorityclasses; docs/kubernetes.md, Sweeps in the queue)") if wpc else ""
        return (f"Kueue made no Workload for it in {age:.0f} s: Kueue does not manage namespace {kube.namespace} "
                f"(its managedJobsNamespaceSelector), or its controller is not running{missing}; the run stays "
                f"suspended until one is made (kubectl get workloads -n {kube.namespace})")
    conds = (wl.get("status") or {}).get("conditions") or []
    name = (wl.get("metadata") or {}).get("name")
    if _true(conds, "Admitted"):
        return None
    for kind in ("Evicted", "Preempted", "PodsReady"):
        c = _true(conds, kind) if kind != "PodsReady" else None
        if c and c.get("message"):
            return clean(f"Workload {name} {kind.lower()}: {c['message']}", limit=400)
    c = _false(conds, "QuotaReserved")
    if c and c.get("message"):
        msg = c["message"]
        if "doesn't exist" in msg and "LocalQueue" in msg:
            return clean(f"{msg} in namespace {kube.namespace}: Kueue cannot admit it until that LocalQueue exists "
                         f"(helm upgrade llmctl charts/llmctl --set kueue.localQueue.create=true, or --queue "
                         f"another)", limit=400)
        if "insufficient quota" in msg or "couldn't assign flavors" in msg:
            return clean(f"over its queue's quota: {msg} (Workload {name}; ClusterQueue quota from "
                         f"kubectl get clusterqueue); it runs when enough quota frees up, or ask for fewer GPUs",
                         limit=500)
        return clean(f"Kueue: {msg} (Workload {name})", limit=400)
    if _true(conds, "QuotaReserved"):
        return f"quota reserved in queue {queue}; waiting for its admission checks (Workload {name})"
    return f"Workload {name} is waiting for Kueue's scheduler"


def warning_events(kube, names: set[str], limit: int = 5) -> list[str]:
    """The newest Warning events about these objects (the RayJob, its RayCluster, its pods), 'Reason: message',
    oldest first and de-duplicated; [] when events are not readable."""
    from kubernetes.client.rest import ApiException

    from cli.console import clean

    try:
        res = kube.core.list_namespaced_event(kube.namespace, field_selector="type=Warning",
                                              _request_timeout=(10, 30))
    except ApiException:
        return []
    items = kube.api_client.sanitize_for_serialization(res).get("items", [])
    items = [e for e in items if (e.get("involvedObject") or {}).get("name") in names]
    items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or
               (e.get("metadata") or {}).get("creationTimestamp") or "")
    out = []
    for e in items:
        obj = e.get("involvedObject") or {}
        line = clean(f"{obj.get('kind', '?')} {obj.get('name', '?')}: {e.get('reason', '?')}: "
                     f"{(e.get('message') or '').strip()}", limit=400)
        if line in out:
            out.remove(line)
        out.append(line)
    return out[-limit:]


def raycluster_reasons(kube, rj: dict) -> list[str]:
    """What the RayJob's RayCluster says is wrong: its failure conditions (KubeRay >= 1.2: ReplicaFailure,
    HeadPodReady False with a message) and its state's reason."""
    from kubernetes.client.rest import ApiException

    from cli.console import clean

    name = (rj.get("status") or {}).get("rayClusterName")
    if not name:
        return []
    try:
        res = kube.custom.list_namespaced_custom_object(GROUP, VERSION, kube.namespace, "rayclusters",
                                                        field_selector=f"metadata.name={name}",
                                                        _request_timeout=(10, 30))
    except ApiException:
        return []
    items = (res or {}).get("items") or []
    if not items:
        return []
    st = items[0].get("status") or {}
    out = []
    for c in st.get("conditions") or []:
        bad = (c.get("type") == "ReplicaFailure" and c.get("status") == "True") or \
              (c.get("type") in ("HeadPodReady", "RayClusterProvisioned") and c.get("status") == "False")
        if bad and c.get("message"):
            out.append(clean(f"RayCluster {name} {c['type']}={c['status']} ({c.get('reason', '')}): {c['message']}",
                             limit=400))
    if st.get("reason"):
        out.append(clean(f"RayCluster {name}: {st['reason']}", limit=400))
    return out


def pod_reasons(pods: list[dict]) -> list[str]:
    """Why pods are not running, from their conditions and container states: unschedulable (the scheduler's
    message says which resource no node has), image pull errors, crash loops."""
    from cli.console import clean

    out = []
    for pod in pods:
        name = pod["metadata"]["name"]
        st = pod.get("status") or {}
        c = _false(st.get("conditions"), "PodScheduled")
        if c and c.get("message"):
            out.append(clean(f"pod {name} is not scheduled ({c.get('reason', '')}): {c['message']}", limit=500))
        for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                out.append(clean(f"pod {name} container {cs.get('name')}: {waiting['reason']}"
                                 + (f": {waiting['message']}" if waiting.get("message") else ""), limit=400))
    return out


def reasons(kube, rj: dict, state: str, pods: list[dict]) -> list[str]:
    """Everything the cluster says about why a run is not (yet) running: the Workload while queued, else the
    RayCluster's conditions, the pods' conditions and the Warning events about any of them."""
    out = []
    if state == "queued":
        why = kueue_reason(kube, rj)
        if why:
            out.append(why)
        return out
    out += raycluster_reasons(kube, rj)
    out += pod_reasons(pods)
    names = {rj["metadata"]["name"], (rj.get("status") or {}).get("rayClusterName")} | \
        {p["metadata"]["name"] for p in pods}
    out += [e for e in warning_events(kube, {n for n in names if n}) if e not in out]
    return out

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

    def gone() -> bool:
        try:
            get_run(kube, name)
        except CLIError as e:
            if f"no rayjob {name!r}" in str(e):
                return True
            raise
        return False

    if not console.wait_until(gone):
        raise CLIError(f"RayJob {name} in namespace {kube.namespace} was still being deleted after "
                       f"{console.WAIT_SECONDS:.0f} s; is the KubeRay operator running? Try again later")
    return create()

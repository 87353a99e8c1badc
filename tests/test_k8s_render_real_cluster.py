"""What llmctl renders (RayJob, RayService, the chart's NetworkPolicies), judged by the real control plane
(tests/controlplane/): the API server's strict field validation and Pod Security admission, Kueue's
webhooks and scheduler, the KubeRay operator (v1.6.2) that turns them into pods, kwok nodes.

Each test makes its own namespace; the session's cluster is shared (tests/conftest.py `real_cluster`).
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import time
from pathlib import Path

import pytest

from cli.kube.config import ClusterConfig
from tests import schemas
from tests.controlplane.cluster import local_queue, wait_for
from tests.tools import ensure_helm
from trainer.plan import RunSpec, plan

WAIT_S = 180
CHART = Path(__file__).resolve().parents[1] / "charts" / "llmctl"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
KUBERAY = "1.6.2"  # the fixture's operator
# Kueue quota for two 8-GPU worker pods of the default size and their heads: every resource llmctl's pods request.
RUN_QUOTA = {"cpu": "400", "memory": "4Ti", "nvidia.com/gpu": "16", "ephemeral-storage": "2Ti"}


def _ns(api, name: str, labels: dict | None = None) -> str:
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": name, "labels": labels or {}}})
    wait_for(f"default ServiceAccount in {name}",
             lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
             time.monotonic() + WAIT_S)
    return name


def _helm(*args: str) -> list[dict]:
    res = subprocess.run([str(ensure_helm()), "template", "r", str(CHART), *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [d for d in schemas.load_yaml_stream(res.stdout) if d]


def _bind_chart_role(api, ns: str, user: str) -> None:
    """The chart's Role and RoleBinding in ns, rendered by helm with `user` as a subject, created as admin."""
    docs = _helm("-n", ns, "--set", "namespace.create=false", "--set-json",
                 f'rbac.subjects=[{{"kind":"User","name":"{user}","apiGroup":"rbac.authorization.k8s.io"}}]')
    for d in docs:
        if d["kind"] in ("Role", "RoleBinding"):
            plural = d["kind"].lower() + "s"
            api.create(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/{plural}", d)


def _queue(api, ns: str, cq: str) -> None:
    """A ClusterQueue `cq` with room for a 16-GPU run (every resource llmctl's pods request) and a LocalQueue
    `lq` in ns, Active."""
    local_queue(api, ns, cq, RUN_QUOTA, deadline_s=WAIT_S)


def _pods(api, ns: str, selector: str) -> list[dict]:
    _, pods = api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector={selector}")
    return pods.get("items", [])


def _admitted(api, ns: str):
    _, wls = api.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads")
    for wl in wls.get("items", []):
        if any(c["type"] == "Admitted" and c["status"] == "True" for c in wl.get("status", {}).get("conditions", [])):
            return wl
    return None


def _strict_create(api, path: str, obj: dict) -> dict:
    """POST with fieldValidation=Strict (as kubectl sends it): a field this release does not serve is a 400."""
    code, out = api.request("POST", f"{path}?fieldValidation=Strict", obj)
    assert code == 201, out
    return out


def _operator_log_says(real_cluster, text: str) -> bool:
    return text in real_cluster.log("kuberay-operator").read_text(errors="replace")


# ---------------------------------------------------------------------------------------------
# Defect 2: an elastic run (--min-gpus) on a Kueue queue, in a namespace enforcing "restricted"


def test_real_cluster_elastic_rayjob_from_a_chart_bound_user_is_admitted_by_kueue_and_pod_security(real_cluster):
    from cli.kube.rayjob import build_rayjob

    admin = real_cluster.admin()
    ns = _ns(admin, "elastic-run", RESTRICTED)
    _bind_chart_role(admin, ns, "dave")
    _queue(admin, ns, "cq-elastic")
    cfg = ClusterConfig(queue="lq", kuberay_version=KUBERAY, kueue_elastic_jobs=True)
    p = plan(RunSpec(depth=12, gpus=16, min_gpus=8, storage_root="s3://runs"))
    rj = build_rayjob(p, cfg, namespace=ns)
    assert rj["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True

    dave = real_cluster.api_as("dave")
    created = _strict_create(dave, f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", rj)
    assert created["spec"]["suspend"] is True  # Kueue's webhook accepted autoscaling: workload slicing

    wl = wait_for("the elastic RayJob's Workload Admitted", lambda: _admitted(admin, ns), time.monotonic() + WAIT_S,
                  real_cluster.procs)
    assert wl["metadata"]["annotations"]["kueue.x-k8s.io/elastic-job"] == "true"

    # The operator builds the head pod with its autoscaler sidecar; Pod Security "restricted" admits it.
    head = wait_for("the head pod (with the autoscaler) created", lambda: next(iter(
        _pods(admin, ns, f"ray.io/node-type=head,llmctl.dev/run={p.name}")), None), time.monotonic() + WAIT_S,
        real_cluster.procs)
    by_name = {c["name"]: c for c in head["spec"]["containers"]}
    assert set(by_name) == {"ray-head", "autoscaler"}
    auto = by_name["autoscaler"]
    assert auto["securityContext"]["allowPrivilegeEscalation"] is False
    assert auto["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # Only the autoscaler reads the API token; the Ray head container (which runs the driver) has none.
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert any(m["mountPath"] == token_dir for m in auto["volumeMounts"])
    assert not any(m["mountPath"] == token_dir for m in by_name["ray-head"]["volumeMounts"])
    assert head["spec"]["automountServiceAccountToken"] is False
    # KubeRay made the autoscaler's ServiceAccount and the RoleBinding the token speaks for.
    sa = head["spec"]["serviceAccountName"]
    assert admin.get(f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}")[0] == 200


def test_real_cluster_kueue_refuses_an_elastic_rayjob_without_workload_slicing(real_cluster):
    """What the render-time refusal (no `kueue.elasticJobs`) stands for: Kueue's own webhook says no."""
    from cli.kube.rayjob import build_rayjob

    admin = real_cluster.admin()
    ns = _ns(admin, "elastic-refused")
    _queue(admin, ns, "cq-elastic-refused")
    p = plan(RunSpec(depth=12, gpus=16, min_gpus=8, storage_root="s3://runs"))
    with pytest.raises(ValueError, match="ElasticJobsViaWorkloadSlices"):
        build_rayjob(p, ClusterConfig(queue="lq", kuberay_version=KUBERAY), namespace=ns)
    rj = build_rayjob(p, ClusterConfig(queue="lq", kuberay_version=KUBERAY, kueue_elastic_jobs=True), namespace=ns)
    del rj["metadata"]["annotations"]["kueue.x-k8s.io/elastic-job"]
    code, out = admin.request("POST", f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", rj)
    assert code == 403, out
    assert "autoscaling when workload slicing is enabled" in out["message"]


# ---------------------------------------------------------------------------------------------
# Defect 6: workers deleted as soon as the run ends (KubeRay >= 1.6 deletionRules)


def test_real_cluster_kuberay_accepts_deletion_rules_that_delete_workers_first(real_cluster):
    from cli.kube.rayjob import build_rayjob

    admin = real_cluster.admin()
    ns = _ns(admin, "deletion-rules", RESTRICTED)
    p = plan(RunSpec(depth=12, gpus=8, storage_root="s3://runs"))
    rj = build_rayjob(p, ClusterConfig(kuberay_version=KUBERAY), namespace=ns)
    rules = rj["spec"]["deletionStrategy"]["deletionRules"]
    assert {"policy": "DeleteWorkers", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 0}} in rules
    created = _strict_create(admin, f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", rj)
    assert created["spec"]["deletionStrategy"] == rj["spec"]["deletionStrategy"]  # nothing pruned

    def deployed():
        _, j = admin.get(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/{p.name}")
        st = j.get("status") or {}
        return st if st.get("jobDeploymentStatus") and st.get("rayClusterName") else None

    st = wait_for("the operator takes the RayJob up", deployed, time.monotonic() + WAIT_S, real_cluster.procs)
    # The operator validated the spec (KubeRay's validateDeletionRules: no ValidationFailed) and built the cluster.
    assert st["jobDeploymentStatus"] != "ValidationFailed", st
    wait_for("the run's worker pod", lambda: _pods(admin, ns, f"ray.io/node-type=worker,llmctl.dev/run={p.name}"),
             time.monotonic() + WAIT_S, real_cluster.procs)


# ---------------------------------------------------------------------------------------------
# Defects 3 and 5: the chart's NetworkPolicies


def _np_peers_select(api, peer: dict, ns_labels_of) -> list[str]:
    """The pods a NetworkPolicy peer selects, asked of the API server: namespaces by the peer's
    namespaceSelector, then pods in them by its podSelector (both as label selectors)."""
    def selector(s: dict) -> str:
        parts = [f"{k}={v}" for k, v in (s.get("matchLabels") or {}).items()]
        for e in s.get("matchExpressions") or []:
            op = {"In": "in", "NotIn": "notin"}[e["operator"]]
            parts.append(f"{e['key']} {op} ({','.join(e['values'])})")
        return ",".join(parts)

    q = urllib.parse.quote
    _, nss = api.get(f"/api/v1/namespaces?labelSelector={q(selector(peer['namespaceSelector']))}")
    out = []
    for n in nss["items"]:
        name = n["metadata"]["name"]
        for pod in _pods(api, name, q(selector(peer.get("podSelector") or {}))):
            out.append(f"{name}/{pod['metadata']['name']}")
    return out


def _pod(name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}


def test_real_cluster_chart_network_policy_finds_the_operator_in_any_namespace(real_cluster):
    admin = real_cluster.admin()
    ns = _ns(admin, "np-runs")
    docs = _helm("-n", ns, "--set", "namespace.create=false")
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-ray")]
    _strict_create(admin, f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", np)

    # KubeRay operators where their installs put them: ray-system (KubeRay docs), default (older docs),
    # kuberay-system; labelled as the kuberay-operator Helm chart labels its pod.
    operator_labels = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/component": "kuberay-operator"}
    for where in ("ray-system", "default"):
        admin.create(f"/api/v1/namespaces/{where}/pods", _pod("kuberay-operator-np-probe", operator_labels))
    other_ns = _ns(admin, "kuberay-system-np")
    admin.create(f"/api/v1/namespaces/{other_ns}/pods", _pod("kuberay-operator-x", operator_labels))
    admin.create(f"/api/v1/namespaces/{other_ns}/pods", _pod("not-the-operator", {"app": "web"}))

    (rule,) = [r for r in np["spec"]["ingress"] if r.get("ports") == [{"port": 8265, "protocol": "TCP"}]]
    selected = {p for peer in rule["from"] for p in _np_peers_select(admin, peer, None)}
    assert {"ray-system/kuberay-operator-np-probe", "default/kuberay-operator-np-probe",
            f"{other_ns}/kuberay-operator-x"} <= selected
    assert f"{other_ns}/not-the-operator" not in selected


def test_real_cluster_serve_network_policy_opens_8000_to_gateways_and_9500_to_prometheus(real_cluster):
    from cli.kube.rayservice import build_rayservice

    admin = real_cluster.admin()
    ns = _ns(admin, "np-serve")
    docs = _helm("-n", ns, "--set", "namespace.create=false")
    (np,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-serve")]
    stored = _strict_create(admin, f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", np)

    # The serve pods the operator makes carry the labels the policy selects.
    run = _run_doc()
    svc = build_rayservice(run, ClusterConfig(kuberay_version=KUBERAY), namespace=ns, gpus_per_replica=0)
    _strict_create(admin, f"/apis/ray.io/v1/namespaces/{ns}/rayservices", svc)
    head = wait_for("the RayService's head pod", lambda: next(iter(_pods(admin, ns, "ray.io/node-type=head")), None),
                    time.monotonic() + WAIT_S, real_cluster.procs)
    sel = stored["spec"]["podSelector"]["matchLabels"]
    assert sel.items() <= head["metadata"]["labels"].items()

    gateway_ns = _ns(admin, "ingress-nginx")
    admin.create(f"/api/v1/namespaces/{gateway_ns}/pods", _pod("controller", {"app": "ingress-nginx"}))
    monitoring = _ns(admin, "monitoring")
    admin.create(f"/api/v1/namespaces/{monitoring}/pods", _pod("prometheus", {"app": "prometheus"}))
    by_port = {}
    for rule in stored["spec"]["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], set()).update(
                p for peer in rule["from"] for p in _np_peers_select(admin, peer, None))
    assert f"{gateway_ns}/controller" in by_port[8000]
    assert f"{monitoring}/prometheus" in by_port[9500]
    assert f"{monitoring}/prometheus" not in by_port[8000]


# ---------------------------------------------------------------------------------------------
# The RayService's pods, made by the operator, under "restricted"


def _run_doc(name: str = "chatbot") -> dict:
    p = plan(RunSpec(depth=12, gpus=8, storage_root="s3://serve", name=name))
    return json.loads(p.to_json())


def test_real_cluster_rayservice_head_passes_restricted_with_token_auth_affinity_and_volumes(real_cluster):
    from cli.kube.rayservice import build_rayservice

    admin = real_cluster.admin()
    ns = _ns(admin, "serve-restricted", RESTRICTED)
    _bind_chart_role(admin, ns, "erin")
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/region", "operator": "In",
                               "values": ["us-central1", "us-east-2", "eastus"]}]}]}}}
    cfg = ClusterConfig(kuberay_version=KUBERAY, affinity=affinity,
                        extra_volumes=({"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},),
                        extra_volume_mounts=({"name": "cache", "mountPath": "/cache"},),
                        serve_allowed_hosts=("chat.example.com",))
    svc = build_rayservice(_run_doc("chatsvc"), cfg, namespace=ns, gpus_per_replica=0)
    _strict_create(real_cluster.api_as("erin"), f"/apis/ray.io/v1/namespaces/{ns}/rayservices", svc)

    head = wait_for("the RayService's head pod, admitted by Pod Security", lambda: next(iter(
        _pods(admin, ns, "ray.io/node-type=head")), None), time.monotonic() + WAIT_S, real_cluster.procs)
    spec = head["spec"]
    ray_head = next(c for c in spec["containers"] if c["name"] == "ray-head")
    env = {e["name"]: e for e in ray_head.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token"  # KubeRay >= 1.5.1 authOptions, injected by the operator
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"name": "cache", "mountPath": "/cache"} in ray_head["volumeMounts"]
    assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    # The spot anti-affinity keeps the head off spot nodes (defect 9), merged with the configured affinity.
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert all(any(e["key"] == "cloud.google.com/gke-spot" and e["operator"] == "NotIn" for e in t["matchExpressions"])
               for t in terms)

"""The real control plane fixture (tests/controlplane/) proves itself: real kube-apiserver, scheduler,
controller-manager, KubeRay operator, Kueue and kwok on 127.0.0.1, built from their Go modules."""

from __future__ import annotations

import json
import time

import pytest

from tests.controlplane.cluster import local_queue, wait_for

RAY_IMAGE = "rayproject/ray:2.52.0"
# Each wait returns as soon as its condition holds; the bound is for a saturated shared box.
WAIT_S = 180


def _ns(api, name: str, labels: dict | None = None) -> str:
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": name, "labels": labels or {}}})
    # Pods need the namespace's default ServiceAccount (ServiceAccount admission); the controller-manager
    # makes it.
    wait_for(f"default ServiceAccount in {name}",
             lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
             time.monotonic() + WAIT_S)
    return name


def _restricted_container(name="main", image="busybox:1.36", **extra) -> dict:
    return {"name": name, "image": image, "command": ["sleep", "3600"],
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 1000,
                                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
            **extra}


def _queue(api, ns: str, cq: str) -> None:
    """A ClusterQueue `cq` (16 CPU, 64Gi, 8 GPUs) and a LocalQueue `lq` in ns, Active."""
    local_queue(api, ns, cq, {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "8"}, deadline_s=WAIT_S)


def _admitted_workload(api, ns: str):
    _, wls = api.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads")
    for wl in wls.get("items", []):
        if any(c["type"] == "Admitted" and c["status"] == "True" for c in wl.get("status", {}).get("conditions", [])):
            return wl
    return None


def test_real_cluster_components_are_up(real_cluster):
    api = real_cluster.admin()
    code, version = api.get("/version")
    assert code == 200 and version["gitVersion"] == real_cluster.versions["kubernetes"], version

    code, nodes = api.get("/api/v1/nodes")
    by_name = {n["metadata"]["name"]: n for n in nodes["items"]}
    assert {"gke-a3-0", "gke-a3-1", "eks-p5-0", "aks-nd96-0", "cpu-0"} <= set(by_name)
    for name in ("gke-a3-0", "eks-p5-0", "aks-nd96-0"):
        node = by_name[name]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8", name
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"]), name
    assert by_name["gke-a3-0"]["metadata"]["labels"]["cloud.google.com/gke-accelerator"] == "nvidia-h100-80gb"
    assert by_name["gke-a3-0"]["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in by_name["cpu-0"]["status"]["allocatable"]

    for crd in ("rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io", "clusterqueues.kueue.x-k8s.io",
                "localqueues.kueue.x-k8s.io", "workloads.kueue.x-k8s.io", "resourceflavors.kueue.x-k8s.io"):
        code, obj = api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
        assert code == 200, crd
        assert any(c["type"] == "Established" and c["status"] == "True" for c in obj["status"]["conditions"]), crd

    code, hooks = api.get("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations")
    urls = [h["clientConfig"]["url"] for cfg in hooks["items"] for h in cfg["webhooks"]]
    assert any(u.startswith("https://127.0.0.1:") and u.endswith("/mutate-ray-io-v1-rayjob") for u in urls), urls


def test_real_cluster_user_kubeconfig_is_bound_only_by_rbac(real_cluster, tmp_path):
    """A named user's kubeconfig works with the Kubernetes client; RBAC, not the fixture, decides."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    ns = _ns(real_cluster.admin(), "rbac-check")
    kc = real_cluster.kubeconfig("alice", tmp_path / "alice.yaml", namespace=ns)
    core = client.CoreV1Api(config.new_client_from_config(str(kc)))
    with pytest.raises(ApiException) as denied:
        core.list_namespaced_pod(ns)
    assert denied.value.status == 403
    assert 'User "alice" cannot list resource "pods"' in json.loads(denied.value.body)["message"]

    real_cluster.admin().create(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "alice-view"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]})
    # the authorizer reads bindings from an informer: the new one takes effect a moment later, so poll for it
    listed = wait_for("alice's RoleBinding to take effect", lambda: core.list_namespaced_pod(ns),
                      time.monotonic() + 60)
    assert listed.items == []
    with pytest.raises(ApiException) as other:
        core.list_namespaced_pod("default")
    assert other.value.status == 403

    # A ServiceAccount token made at run time is another identity, just as unprivileged.
    token = real_cluster.service_account_token(ns, "runner")
    sa = client.CoreV1Api(config.new_client_from_config(
        str(real_cluster.kubeconfig("runner", tmp_path / "runner.yaml", namespace=ns, token=token))))
    with pytest.raises(ApiException) as sa_denied:
        sa.list_namespaced_pod(ns)
    assert 'User "system:serviceaccount:rbac-check:runner" cannot list' in json.loads(sa_denied.value.body)["message"]


def test_real_cluster_pod_security_rejects_privileged_pod(real_cluster):
    api = real_cluster.admin()
    ns = _ns(api, "psa-restricted", {"pod-security.kubernetes.io/enforce": "restricted",
                                     "pod-security.kubernetes.io/enforce-version": "latest"})
    privileged = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "priv"},
                  "spec": {"containers": [{"name": "c", "image": "busybox:1.36",
                                           "securityContext": {"privileged": True}}]}}
    code, out = api.request("POST", f"/api/v1/namespaces/{ns}/pods", privileged)
    assert code == 403, out
    assert 'violates PodSecurity "restricted:latest"' in out["message"] and "privileged" in out["message"]

    ok = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fine"},
          "spec": {"containers": [_restricted_container()]}}
    code, out = api.request("POST", f"/api/v1/namespaces/{ns}/pods", ok)
    assert code == 201, out


def test_real_cluster_kuberay_operator_creates_head_pod_for_a_raycluster(real_cluster):
    api = real_cluster.admin()
    ns = _ns(api, "ray-head")
    head = {"rayStartParams": {}, "template": {"spec": {"containers": [{
        "name": "ray-head", "image": RAY_IMAGE,
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}}]}}}
    api.create(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters", {
        "apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "tiny"},
        "spec": {"rayVersion": "2.52.0", "headGroupSpec": head}})

    def head_running():
        _, pods = api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=ray.io/cluster=tiny,ray.io/node-type=head")
        for pod in pods.get("items", []):
            if pod["status"].get("phase") == "Running" and pod["status"].get("podIP"):
                return pod
        return None

    pod = wait_for("the operator's head pod Running", head_running, time.monotonic() + WAIT_S, real_cluster.procs)
    # Made by the operator, bound by the scheduler, run by kwok.
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "RayCluster"
    assert pod["spec"]["nodeName"] in {"cpu-0", "eks-p5-0", "aks-nd96-0"}  # the GKE A3 nodes are tainted
    code, svc = api.get(f"/api/v1/namespaces/{ns}/services/tiny-head-svc")
    assert code == 200 and any(p["port"] == 8265 for p in svc["spec"]["ports"]), svc

    def cluster_ready():
        _, rc = api.get(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/tiny")
        return rc if rc.get("status", {}).get("state") == "ready" else None

    wait_for("RayCluster state ready", cluster_ready, time.monotonic() + WAIT_S, real_cluster.procs)


def test_real_cluster_kueue_webhook_suspends_and_kueue_admits_a_job(real_cluster):
    api = real_cluster.admin()
    ns = _ns(api, "queued")
    _queue(api, ns, "cq")

    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "small", "labels": {"kueue.x-k8s.io/queue-name": "lq"}},
           "spec": {"suspend": False, "backoffLimit": 0, "template": {"spec": {
               "restartPolicy": "Never",
               "containers": [_restricted_container(resources={"requests": {"cpu": "1", "memory": "1Gi"}})]}}}}
    code, created = api.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", job)
    assert code == 201, created
    # Kueue's mutating webhook, called by the API server over loopback, suspended it on the way in.
    assert created["spec"]["suspend"] is True

    wl = wait_for("Workload Admitted", lambda: _admitted_workload(api, ns), time.monotonic() + WAIT_S, real_cluster.procs)
    assert wl["status"]["admission"]["clusterQueue"] == "cq"

    def completed():
        _, j = api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/small")
        return j if j.get("status", {}).get("succeeded") == 1 else None

    done = wait_for("Job unsuspended, its pod run by kwok, Succeeded", completed, time.monotonic() + WAIT_S,
                    real_cluster.procs)
    assert not done["spec"].get("suspend")


def test_real_cluster_kueue_admits_a_rayjob_and_the_operator_places_its_gpu_worker(real_cluster):
    api = real_cluster.admin()
    ns = _ns(api, "queued-ray")
    _queue(api, ns, "cq-ray")
    container = {"name": "ray", "image": RAY_IMAGE}
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
              "metadata": {"name": "gpu-job", "labels": {"kueue.x-k8s.io/queue-name": "lq"}},
              "spec": {"entrypoint": "python -c 'print(1)'", "shutdownAfterJobFinishes": True,
                       "rayClusterSpec": {"rayVersion": "2.52.0",
                           "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
                               {**container, "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                                           "limits": {"cpu": "1", "memory": "2Gi"}}}]}}},
                           "workerGroupSpecs": [{"groupName": "gpu", "replicas": 1, "minReplicas": 1,
                                                 "maxReplicas": 1, "rayStartParams": {},
                                                 "template": {"spec": {"containers": [
                               {**container, "resources": {
                                   "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "8"},
                                   "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "8"}}}]}}}]}}}
    code, created = api.request("POST", f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", rayjob)
    assert code == 201, created
    assert created["spec"]["suspend"] is True  # Kueue's mrayjob.kb.io webhook, over loopback

    wl = wait_for("RayJob's Workload Admitted", lambda: _admitted_workload(api, ns), time.monotonic() + WAIT_S,
                  real_cluster.procs)
    assert {ps["name"] for ps in wl["spec"]["podSets"]} >= {"head", "gpu"}

    def worker_running():
        _, pods = api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=ray.io/group=gpu")
        for pod in pods.get("items", []):
            if pod["status"].get("phase") == "Running":
                return pod
        return None

    worker = wait_for("the 8-GPU worker Running", worker_running, time.monotonic() + WAIT_S, real_cluster.procs)
    # The GKE A3 nodes carry nvidia.com/gpu:NoSchedule and the worker has no toleration; the CPU node has no
    # GPUs: only the EKS or the AKS node fits.
    assert worker["spec"]["nodeName"] in {"eks-p5-0", "aks-nd96-0"}
    _, job = api.get(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/gpu-job")
    assert not job["spec"].get("suspend")  # Kueue unsuspended it (false is omitted)

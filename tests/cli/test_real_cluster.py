"""llmctl's commands against the real control plane (tests/controlplane/, the `real_cluster` fixture): a real
kube-apiserver with RBAC and Pod Security, the scheduler, KubeRay 1.6 and Kueue 0.17 with their webhooks, and
kwok nodes with the allocatable of real H100 node types.

The chart is installed with `helm install` as the admin, twice, in namespaces that enforce Pod Security
"restricted":
  - `llm` (user alice, the chart's default RBAC: the namespaced Role only), runs queued in Kueue (the chart's
    ClusterQueue, one GKE A3 node of quota) and workers labelled for GKE: the happy path;
  - `llm-wide` (user bob, plus the chart's opt-in ClusterRole, rbac.clusterScope=true), no queue, and the
    default worker size (96 CPU, 1000Gi, 220Gi of disk) on GPU-operator-labelled nodes: the EKS p5 and AKS ND96
    nodes, neither of which holds such a pod, so its workers stay Pending.
Every command runs in this process as a user bound only by those objects. No Ray runs in the pods (kwok marks
them Running) and there is no dashboard: the operator fails K8sJobMode runs about 30 s after their submitter
pod ends, so tests assert the states before that, or say which they expect.

Run: .venv/bin/pytest tests/cli/test_real_cluster.py -v   (the control plane starts once, 30-70 s)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cli import console
from cli.main import main
from tests.controlplane.cluster import wait_for
from tests.test_chart import CHART
from tests.tools import ensure_helm

WAIT_S = 180  # each wait returns as soon as its condition holds; the bound is for a saturated shared box
NS, WIDE = "llm", "llm-wide"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
NO_MONITORING = ("--set", "monitoring.podMonitors.enabled=false", "--set", "monitoring.prometheusRule.enabled=false")


def _namespace(api, name: str) -> None:
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": name, "labels": RESTRICTED}})
    wait_for(f"default ServiceAccount in {name}",
             lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
             time.monotonic() + WAIT_S)


def _helm_install(kubeconfig: Path, namespace: str, *values: str) -> None:
    out = subprocess.run([str(ensure_helm()), "install", "llmctl", str(CHART), "-n", namespace,
                          "--kubeconfig", str(kubeconfig), *NO_MONITORING, *values],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


class Cluster:
    """The installed chart and the users: `run(user, *argv)` runs llmctl as that user in-process."""

    def __init__(self, real, tmp: Path, storage: str):
        self.real, self.tmp, self.storage = real, tmp, storage
        self.kubeconfigs = {}

    def kubeconfig(self, user: str, namespace: str) -> Path:
        key = (user, namespace)
        if key not in self.kubeconfigs:
            self.kubeconfigs[key] = self.real.kubeconfig(user, self.tmp / f"{user}-{namespace}.yaml",
                                                         namespace=namespace)
        return self.kubeconfigs[key]

    def run(self, capsys, monkeypatch, user: str, namespace: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setenv("KUBECONFIG", str(self.kubeconfig(user, namespace)))
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    def get(self, path: str) -> dict:
        code, obj = self.real.admin().get(path)
        assert code == 200, obj
        return obj

    def pods(self, namespace: str, run: str) -> list[dict]:
        return self.get(f"/api/v1/namespaces/{namespace}/pods?labelSelector=llmctl.dev/run={run}")["items"]

    def rayjob(self, namespace: str, run: str) -> dict:
        return self.get(f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs/{run}")

    def wait(self, what: str, check):
        return wait_for(what, check, time.monotonic() + WAIT_S, self.real.procs, interval=0.5)


@pytest.fixture(scope="module")
def cluster(real_cluster, s3_server, tmp_path_factory):
    """Both installs (see the module's docstring) and a bucket for the chart's storageRoot."""
    tmp = tmp_path_factory.mktemp("llmctl-real")
    admin = real_cluster.admin()
    bucket = s3_server.bucket("real")
    for ns in (NS, WIDE):
        _namespace(admin, ns)
    admin_kc = real_cluster.kubeconfig("admin", tmp / "admin.yaml")
    _helm_install(admin_kc, NS, "--set", f"config.storageRoot={bucket}",
                  "--set", "rbac.subjects[0].kind=User", "--set", "rbac.subjects[0].name=alice",
                  "--set", "config.workers.gpuLabels=gke",
                  "--set", "kueue.clusterQueue.create=true", "--set", "kueue.clusterQueue.nodes=1",
                  "--set", "kueue.localQueue.create=true")
    _helm_install(admin_kc, WIDE, "--set", f"config.storageRoot={bucket}",
                  "--set", "rbac.subjects[0].kind=User", "--set", "rbac.subjects[0].name=bob",
                  "--set", "rbac.clusterScope=true",
                  # the sizes stated, not the chart's defaults of the day: 96 CPU, 1000Gi, 200Gi + 20Gi per worker
                  "--set", "config.workers.gpuLabels=gpu-operator", "--set", "config.workers.cpuPerGpu=12",
                  "--set", "config.workers.memoryPerGpuGi=125", "--set", "config.workers.scratchSize=200Gi",
                  "--set", "config.tmpSize=20Gi")
    c = Cluster(real_cluster, tmp, bucket)
    # Kueue's LocalQueue is Active once its ClusterQueue is (the chart made both)
    c.wait("LocalQueue h100 Active", lambda: any(
        x.get("type") == "Active" and x.get("status") == "True"
        for x in (c.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{NS}/localqueues/h100").get("status") or {})
        .get("conditions") or []))
    return c


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(console, "POLL_SECONDS", 0.5)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")  # set per test where storage is read


def _submit(c, capsys, monkeypatch, user, ns, *argv) -> str:
    rc, out, err = c.run(capsys, monkeypatch, user, ns, "submit", "--yes", *argv)
    assert rc == 0, err
    return out.split()[0].split("/", 1)[1]


def _lines(out: str) -> dict[str, str]:
    return {line.split()[1]: line for line in out.splitlines() if line[:1] in "✓!✗"}


# ---------------------------------------------------------------------------------------------
# doctor


def test_real_cluster_doctor_as_the_charts_user_passes_and_reads_kuberay_16(cluster, capsys, monkeypatch):
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "doctor")
    assert rc == 0, out + err
    got = _lines(out)
    assert "as alice" in got["api"]
    # The Role cannot read CRDs; the published OpenAPI schema (open to every authenticated user) says 1.6.
    assert got["kuberay"].startswith("✓") and "KubeRay 1.6" in got["kuberay"], got["kuberay"]
    assert got["kueue"].startswith("✓") and "LocalQueue h100 exists" in got["kueue"]
    assert got["permissions"].startswith("✓"), got["permissions"]
    assert got["gpu"].startswith("!") and "cannot list nodes" in got["gpu"]  # no ClusterRole in this namespace


def test_real_cluster_doctor_says_no_node_holds_a_default_worker(cluster, capsys, monkeypatch):
    """Defect 4: the nodes have 8 GPUs each, so a GPU-only comparison said ✓; the whole pod fits none of them."""
    rc, out, err = cluster.run(capsys, monkeypatch, "bob", WIDE, "doctor")
    gpu = _lines(out)["gpu"]
    assert rc == 1 and gpu.startswith("✗"), out
    assert "cpu 96, memory 1000Gi, ephemeral-storage 220Gi, nvidia.com/gpu 8" in gpu
    assert "eks-p5-0 (allocatable ephemeral-storage 17Gi < 220Gi)" in gpu
    assert "aks-nd96-0 (allocatable cpu 95.1 < 96" in gpu
    assert "cpuPerGpu" in gpu  # the fix names the values to change

    rc, out, err = cluster.run(capsys, monkeypatch, "admin", NS, "doctor")  # GKE labels: the A3 nodes hold it
    assert "fits gke-a3-0, gke-a3-1" in _lines(out)["gpu"], out


# ---------------------------------------------------------------------------------------------
# submit, status, list, logs, cancel


def test_real_cluster_submit_is_admitted_by_kueue_and_pods_pass_restricted_on_nodes_that_fit(
        cluster, capsys, monkeypatch, fast):
    run = _submit(cluster, capsys, monkeypatch, "alice", NS, "--depth", "4", "--gpus", "8")
    rj = cluster.rayjob(NS, run)
    # KubeRay 1.6 fields, rendered for a user who cannot read the CRD (the OpenAPI schema told the release)
    assert rj["spec"].get("preRunningDeadlineSeconds") == 1800, rj["spec"]
    assert (rj["spec"]["rayClusterSpec"].get("authOptions") or {}).get("mode") == "token"
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100"

    def running():
        pods = cluster.pods(NS, run)
        roles = {p["metadata"]["labels"].get("llmctl.dev/role"): p for p in pods if p["spec"].get("nodeName")}
        return pods if {"head", "worker"} <= set(roles) else None

    pods = cluster.wait("head and worker pods bound", running)
    wl = cluster.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{NS}/workloads")["items"]
    assert any(w["metadata"]["labels"].get("kueue.x-k8s.io/job-uid") == rj["metadata"]["uid"] for w in wl)
    for pod in pods:  # created in a namespace enforcing restricted: the API server admitted each
        role = pod["metadata"]["labels"]["llmctl.dev/role"]
        node = cluster.get(f"/api/v1/nodes/{pod['spec']['nodeName']}") if pod["spec"].get("nodeName") else None
        if role == "worker":
            assert node["metadata"]["labels"]["cloud.google.com/gke-accelerator"] == "nvidia-h100-80gb"
        if role == "head":
            assert pod["spec"]["nodeName"] == "cpu-0" or "nvidia.com/gpu" not in str(pod["spec"]["containers"])
    svc = cluster.get(f"/api/v1/namespaces/{NS}/services")["items"]
    assert any(s["metadata"]["name"].endswith("head-svc") for s in svc)

    # status and list as alice, while it is up
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "status", run, "--no-storage", "-o", "json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["state"] in ("starting", "running", "failed") and "head" in (s["pods"] or ""), s
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "list")
    assert rc == 0 and run in out, err

    # logs: kwok plays the kubelet without serving logs; the CLI says the node's kubelet did not answer
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "logs", run, "--role", "head")
    assert rc == 1 and "could not reach the node's kubelet" in err, err
    assert "Traceback" not in err

    # cancel: the RayJob goes, and the garbage collector takes its RayCluster and pods
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "cancel", run, "--yes")
    assert rc == 0 and f"rayjob.ray.io/{run} deleted" in out, err
    cluster.wait("the run's pods gone", lambda: not cluster.pods(NS, run))
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "status", run, "--no-storage")
    assert rc == 1 and f"no rayjob {run!r}" in err


def test_real_cluster_list_all_namespaces_needs_the_opt_in_cluster_role(cluster, capsys, monkeypatch, fast):
    mine = _submit(cluster, capsys, monkeypatch, "bob", WIDE, "--depth", "5", "--gpus", "8")
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "list", "-A")
    assert rc == 1 and 'User "alice" cannot list resource "rayjobs"' in err
    assert "rbac.clusterScope=true" in err  # points at the chart's opt-in

    rc, out, err = cluster.run(capsys, monkeypatch, "bob", WIDE, "list", "-A")
    assert rc == 0, err
    assert out.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert any(line.split()[:2] == [WIDE, mine] for line in out.splitlines())
    cluster.run(capsys, monkeypatch, "bob", WIDE, "cancel", mine, "--yes")


def test_real_cluster_a_worker_that_fits_no_node_stays_pending_and_status_says_why(
        cluster, capsys, monkeypatch, fast):
    run = _submit(cluster, capsys, monkeypatch, "bob", WIDE, "--depth", "6", "--gpus", "8")

    def worker_unschedulable():
        for p in cluster.pods(WIDE, run):
            if p["metadata"]["labels"].get("llmctl.dev/role") == "worker":
                for c in p["status"].get("conditions") or []:
                    if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("message"):
                        return p
        return None

    cluster.wait("the worker Unschedulable", worker_unschedulable)
    rc, out, err = cluster.run(capsys, monkeypatch, "bob", WIDE, "status", run, "--no-storage")
    assert rc == 0, err
    why = [line for line in out.splitlines() if line.startswith("why")]
    assert any("is not scheduled (Unschedulable)" in w and "Insufficient" in w for w in why), out

    # logs -f of that worker says it waits for the scheduler, and why; bounded, then an error (not exit 0)
    monkeypatch.setattr(console, "WAIT_SECONDS", 2.0)
    rc, out, err = cluster.run(capsys, monkeypatch, "bob", WIDE, "logs", run, "--role", "worker", "-f")
    assert rc == 1 and out == "", (out, err)
    assert "waiting for pod" in err and "to be scheduled (Unschedulable" in err
    assert "was not scheduled within 2 s" in err
    rc, out, err = cluster.run(capsys, monkeypatch, "bob", WIDE, "logs", run, "--role", "worker")
    assert rc == 1 and "is not on a node yet, so it has no log: Unschedulable" in err
    cluster.run(capsys, monkeypatch, "bob", WIDE, "cancel", run, "--yes")


def test_real_cluster_a_run_over_its_queues_quota_says_why(cluster, capsys, monkeypatch, fast):
    """Defect 8: 16 GPUs against a ClusterQueue of one 8-GPU node: Kueue keeps it suspended; status says why."""
    run = _submit(cluster, capsys, monkeypatch, "alice", NS, "--depth", "4", "--gpus", "16")

    def said():
        rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "status", run, "--no-storage")
        # the Workload's QuotaReserved=False condition, not an earlier line that already quotes Kueue's message
        return out if "over its queue's quota" in out else None

    out = cluster.wait("status names the quota", said)
    assert "queued" in out and "over its queue's quota" in out and "> maximum capacity" in out, out
    assert cluster.rayjob(NS, run)["spec"]["suspend"] is True
    cluster.run(capsys, monkeypatch, "alice", NS, "cancel", run, "--yes")


def test_real_cluster_a_run_for_a_missing_local_queue_says_so(cluster, capsys, monkeypatch, fast):
    run = _submit(cluster, capsys, monkeypatch, "alice", NS, "--depth", "5", "--gpus", "8", "--queue", "nosuch")

    def said():
        rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "status", run, "--no-storage")
        return out if "LocalQueue nosuch doesn't exist" in out else None

    out = cluster.wait("status names the missing LocalQueue", said)
    assert "kueue.localQueue.create=true" in out
    cluster.run(capsys, monkeypatch, "alice", NS, "cancel", run, "--yes")


def test_real_cluster_status_shows_why_the_operator_cannot_create_pods(cluster, capsys, monkeypatch, fast):
    """Defect 2 (status): a ResourceQuota refuses the head pod; KubeRay says so only in the RayCluster's
    conditions and events, which status now reads (the Role grants events)."""
    admin = cluster.real.admin()
    admin.create(f"/api/v1/namespaces/{WIDE}/resourcequotas", {
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "small"},
        "spec": {"hard": {"requests.cpu": "2"}}})
    try:
        run = _submit(cluster, capsys, monkeypatch, "bob", WIDE, "--depth", "7", "--gpus", "8")

        def said():
            rc, out, err = cluster.run(capsys, monkeypatch, "bob", WIDE, "status", run, "--no-storage")
            return out if "exceeded quota" in out else None

        out = cluster.wait("status shows the quota refusal", said)
        assert "why" in out and "small" in out, out
    finally:
        admin.request("DELETE", f"/api/v1/namespaces/{WIDE}/resourcequotas/small")
    cluster.run(capsys, monkeypatch, "bob", WIDE, "cancel", run, "--yes")


def test_real_cluster_kueue_webhook_refusal_is_not_called_a_permission_problem(cluster, capsys, monkeypatch):
    """Kueue's vrayjob webhook refuses an autoscaling RayJob not marked as a sliced workload with a 403, which the
    CLI once answered with an RBAC hint for a permission alice has. `submit` itself no longer sends such a job
    (it refuses --min-gpus on a queue without kueue.elasticJobs), so the job is rendered with the mark, sent
    without it, through the CLI's own create path, as alice."""
    from cli.errors import CLIError
    from cli.kube.client import connect
    from cli.kube.config import ClusterConfig
    from cli.kube.rayjob import build_rayjob
    from cli.kube.runs import create_run
    from cli.main import build_parser
    from trainer.plan import RunSpec, plan

    p = plan(RunSpec(depth=4, gpus=16, min_gpus=8, storage_root="s3://runs", name="elastic-refused"))
    rj = build_rayjob(p, ClusterConfig(queue="h100", kuberay_version="1.6.2", kueue_elastic_jobs=True), namespace=NS)
    del rj["metadata"]["annotations"]["kueue.x-k8s.io/elastic-job"]
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig("alice", NS)))
    kube = connect(build_parser().parse_args(["status", "elastic-refused", "-n", NS]))
    with pytest.raises(CLIError) as refused:
        create_run(kube, rj["metadata"]["name"], rj)
    err = str(refused.value)
    assert "admission webhook" in err and "Kueue refused it" in err, err
    assert "RBAC" not in err and "bind you" not in err


# ---------------------------------------------------------------------------------------------
# 403 hints for a user the chart does not bind


def test_real_cluster_403_hints_match_what_the_chart_grants(cluster, capsys, monkeypatch):
    """carol is bound to nothing: every refusal the API server gives her names the chart's Role as the grant
    (defect 10: rayservices and the ConfigMap patch were missing from the CLI's table)."""
    from cli.kube.client import _CHART_ROLE

    rc, out, err = cluster.run(capsys, monkeypatch, "carol", NS, "list")
    assert rc == 1 and "which the llmctl chart's Role grants" in err, err
    rc, out, err = cluster.run(capsys, monkeypatch, "carol", NS, "serve", "--delete", "--yes", "chatbot")
    assert rc == 1 and 'cannot get resource "rayservices"' in err and "the llmctl chart's Role grants" in err, err

    # the table against the API server: what alice (bound only by the chart's Role) may do, carol may not
    alice = cluster.real.api_as("alice")
    for verb, group, resource in sorted(_CHART_ROLE):
        res, _, sub = resource.partition("/")
        attrs = {"namespace": NS, "verb": verb, "group": group, "resource": res}
        if sub:
            attrs["subresource"] = sub
        if res == "configmaps":
            attrs["name"] = "llmctl-config"
        code, review = alice.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs}})
        assert code == 201 and review["status"]["allowed"], (verb, group, resource, review["status"])


# ---------------------------------------------------------------------------------------------
# doctor --network, serve


def test_real_cluster_doctor_network_can_run_twice(cluster, capsys, monkeypatch, fast):
    """Defect 7: the check's RayJob had a fixed name: the second check was a 409 suggesting a flag doctor lacks."""
    names = []
    for _ in range(2):
        rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "doctor", "--network", "--gpus", "8",
                                   "--no-wait")
        assert rc == 0, err
        names.append(next(w for w in err.split() if w.startswith("rayjob.ray.io/")).split("/", 1)[1])
        assert "--name" not in err
    assert names[0] != names[1]
    for name in names:
        assert cluster.rayjob(NS, name)["metadata"]["annotations"]["llmctl.dev/check"] == "network"
        cluster.run(capsys, monkeypatch, "alice", NS, "cancel", name, "--yes")


def test_real_cluster_serve_creates_a_rayservice_the_operator_builds(cluster, capsys, monkeypatch, s3_server):
    from trainer.checkpoint import Meta, dir_name
    from trainer.launch import write_plan
    from trainer.plan import RunSpec, plan

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    p = plan(RunSpec(depth=12, gpus=8, storage_root=cluster.storage, name="chatbot"))
    write_plan(p, s3_server.storage_options)
    ckpt = f"{p.urls['run'][len('s3://'):]}/sft/{dir_name('sft', 30)}"
    fs = s3_server.fs()
    fs.pipe_file(f"{ckpt}/model.pt", b"weights")
    fs.pipe_file(f"{ckpt}/meta.json", Meta(step=30, stage="sft", world_size=1, run=p.name, loop_state={},
                                           files=("model.pt",)).to_json().encode())

    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "serve", "chatbot", "--gpus-per-replica", "0",
                               "--yes")
    assert rc == 0, err
    assert out.strip() == f"rayservice.ray.io/chatbot created in namespace {NS}"

    def head():
        return [x for x in cluster.get(f"/api/v1/namespaces/{NS}/pods?labelSelector=ray.io/node-type=head")["items"]
                if x["metadata"]["labels"].get("llmctl.dev/run") == "chatbot" or "chatbot" in x["metadata"]["name"]]

    pods = cluster.wait("the RayService's head pod (admitted under restricted)", head)
    assert pods[0]["spec"]["securityContext"]["runAsNonRoot"] is True
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "list")
    assert rc == 0 and any(line.split()[:1] == ["chatbot"] for line in out.splitlines()), out
    rc, out, err = cluster.run(capsys, monkeypatch, "alice", NS, "serve", "chatbot", "--delete", "--yes")
    assert rc == 0 and "rayservice.ray.io/chatbot deleted" in out, err

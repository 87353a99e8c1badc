"""charts/llmctl and k8s/: rendered with the real helm binary, every object validated offline (Kubernetes
schemas, the CRDs of every supported KubeRay and Kueue release, KubeRay's rules), `helm lint --strict`, one case per value that changes the output, and the
contracts with the CLI (the ConfigMap it reads, the pods the PodMonitors scrape, the warm RayCluster matching
what `llmctl submit` renders).

The chart is rendered from a copy in a temp dir. dashboards/*.json and files/alerts.yaml belong to the
observability work; when absent from the checkout the copy gets small stand-ins so the templates that read
them are still exercised (never written into the repo).

Run: .venv/bin/pytest tests/test_chart.py -v
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.kube.config import ClusterConfig, config_from_configmap
from cli.kube.rayjob import build_rayjob
from tests import schemas
from tests.tools import ensure_helm
from trainer.plan import RunSpec, plan

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "llmctl"
CI_VALUES = CHART / "ci" / "ci-values.yaml"

STAND_IN_DASHBOARD = {"uid": "llmctl-stand-in", "title": "stand-in", "panels": [], "schemaVersion": 39}
STAND_IN_ALERTS = "groups:\n  - name: stand-in\n    rules:\n      - alert: StandIn\n        expr: vector(1) == 0\n"


@pytest.fixture(scope="module")
def chart(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("chart") / "llmctl"
    shutil.copytree(CHART, dst)
    if not list((dst / "dashboards").glob("*.json")):
        (dst / "dashboards").mkdir(exist_ok=True)
        for name in ("stand_in.json", "stand-in-two.json"):
            (dst / "dashboards" / name).write_text(json.dumps(STAND_IN_DASHBOARD))
    if not (dst / "files" / "alerts.yaml").exists():
        (dst / "files").mkdir(exist_ok=True)
        (dst / "files" / "alerts.yaml").write_text(STAND_IN_ALERTS)
    return dst


@pytest.fixture(scope="module")
def helm() -> str:
    return str(ensure_helm())


def render(helm: str, chart: Path, *args: str, ok: bool = True) -> list[dict] | str:
    res = subprocess.run([helm, "template", "r", str(chart), "-n", "team", *args], capture_output=True, text=True)
    if not ok:
        assert res.returncode != 0, "expected helm to refuse these values"
        return res.stderr
    assert res.returncode == 0, res.stderr
    return schemas.load_yaml_stream(res.stdout)


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str | None = None) -> dict:
    (d,) = find(docs, kind, name)
    return d


def cluster_config(docs) -> ClusterConfig:
    cfg, warnings = config_from_configmap(one(docs, "ConfigMap", "llmctl-config"))
    assert warnings == [], warnings  # the chart writes no key the CLI does not know
    return cfg


@pytest.fixture(scope="module")
def default_docs(helm, chart):
    return render(helm, chart)


@pytest.fixture(scope="module")
def ci_docs(helm, chart):
    return render(helm, chart, "-f", str(CI_VALUES))


# ---------------------------------------------------------------------------------------------
# Lint and validity


@pytest.mark.parametrize("values", [[], ["-f", str(CI_VALUES)]], ids=["default", "ci-values"])
def test_helm_lint_strict(helm, chart, values):
    res = subprocess.run([helm, "lint", "--strict", str(chart), *values], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_default_render_is_valid(default_docs):
    assert schemas.validate_all(default_docs) == len(default_docs)
    kinds = sorted(d["kind"] for d in default_docs)
    assert {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PodMonitor", "PrometheusRule"} <= set(kinds)
    assert not find(default_docs, "RayCluster") and not find(default_docs, "LocalQueue")
    assert not find(default_docs, "Secret"), "the chart never renders secrets"


def test_ci_values_turn_every_option_on_and_render_valid(ci_docs):
    assert schemas.validate_all(ci_docs) == len(ci_docs)
    assert {d["kind"] for d in ci_docs} == {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PodMonitor",
                                           "PrometheusRule", "RayCluster", "LocalQueue", "ClusterQueue",
                                           "ResourceFlavor", "ClusterRole", "ClusterRoleBinding", "NetworkPolicy",
                                           "Namespace", "PodDisruptionBudget", "WorkloadPriorityClass"}
    assert len(find(ci_docs, "PodMonitor")) == 3 and len(find(ci_docs, "Role")) == 1  # no run Role


def test_the_kubernetes_validate_tool_agrees(helm, chart, ci_docs, tmp_path):
    """The real `kubernetes-validate -k 1.30.0 --strict` on the same render: every built-in object passes
    (it only warns about CRD kinds, which tests/schemas.py checks against the CRDs)."""
    path = tmp_path / "ci.yaml"
    path.write_text(yaml.safe_dump_all(ci_docs))
    tool = Path(sys.executable).parent / "kubernetes-validate"
    res = subprocess.run([str(tool), "-k", schemas.K8S_VERSION, "--strict", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    builtin = [d for d in ci_docs if (d["apiVersion"], d["kind"]) not in schemas.CRDS]
    assert res.stdout.count(" passed for resource ") == len(builtin) >= 8
    assert "ERROR" not in res.stdout


def test_cluster_manifests_in_k8s_are_valid():
    # *.cluster-config.yaml are llmctl cluster configs (the ConfigMap's config.yaml shape), not objects
    files = sorted(f for f in (ROOT / "k8s").rglob("*.yaml") if not f.name.endswith(".cluster-config.yaml"))
    kinds = set()
    for f in files:
        for d in schemas.load_yaml_stream(f.read_text()):
            schemas.validate(d)
            kinds.add(d["kind"])
    assert {"ClusterQueue", "LocalQueue", "ResourceFlavor", "PriorityClass", "RayJob"} <= kinds


@pytest.mark.parametrize("release", schemas.KUEUE_RELEASES)
def test_k8s_kueue_manifests_apply_on_every_supported_kueue(release):
    """They use kueue.x-k8s.io/v1beta1, served by every supported release (v1beta2 only from 0.15)."""
    for f in sorted((ROOT / "k8s" / "kueue").glob("*.yaml")):
        for d in schemas.load_yaml_stream(f.read_text()):
            schemas.validate(d, {"kueue": release})
    cq = [d for d in schemas.load_yaml_stream((ROOT / "k8s" / "kueue" / "cluster-queue.yaml").read_text())][0]
    assert "ephemeral-storage" in cq["spec"]["resourceGroups"][0]["coveredResources"]  # the workers' scratch


# ---------------------------------------------------------------------------------------------
# The supported matrix: every object the chart renders, on every KubeRay and Kueue release


def _api_versions_args(kueue_release: str) -> list[str]:
    """What a cluster with that Kueue release tells `helm install` through .Capabilities.APIVersions."""
    out = []
    for v in schemas.served_versions("kueue.x-k8s.io", "LocalQueue", kueue_release):
        out += ["--api-versions", f"kueue.x-k8s.io/{v}"]
    return out


@pytest.mark.parametrize("kuberay", schemas.KUBERAY_RELEASES)
@pytest.mark.parametrize("kueue", schemas.KUEUE_RELEASES)
def test_chart_validates_strictly_on_every_supported_release(helm, chart, kuberay, kueue):
    docs = render(helm, chart, "-f", str(CI_VALUES), "--set", f"config.kuberay.version={kuberay}",
                  *_api_versions_args(kueue))
    releases = {"kuberay": kuberay, "kueue": kueue}
    assert schemas.validate_all(docs, releases) == len(docs)
    want = "kueue.x-k8s.io/v1beta2" if "v1beta2" in schemas.served_versions("kueue.x-k8s.io", "LocalQueue", kueue) \
        else "kueue.x-k8s.io/v1beta1"
    assert {d["apiVersion"] for d in docs if d["apiVersion"].startswith("kueue")} == {want}
    rc = one(docs, "RayCluster")
    assert ("authOptions" in rc["spec"]) == (tuple(map(int, kuberay.split("."))) >= (1, 5, 1))


def test_kueue_api_version_follows_the_cluster(helm, chart):
    """v1beta2 is served only from Kueue 0.15; without it the chart must emit v1beta1."""
    args = ["--set", "kueue.localQueue.create=true"]
    assert one(render(helm, chart, *args), "LocalQueue")["apiVersion"] == "kueue.x-k8s.io/v1beta1"
    lq = one(render(helm, chart, *args, "--api-versions", "kueue.x-k8s.io/v1beta2"), "LocalQueue")
    assert lq["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    with pytest.raises(schemas.Invalid, match="no matches for kind"):
        schemas.validate(lq, {"kueue": "0.13.4"})


@pytest.mark.parametrize("choice", ["gpu-operator", "gke"])
def test_one_gpu_label_choice_for_runs_warm_cluster_and_kueue_flavors(helm, chart, choice):
    from cli.kube.config import default_gpu_node_selectors

    for gpu in ("h100", "h100-pcie", "h200", "a100"):
        docs = render(helm, chart, "--set", f"config.workers.gpuLabels={choice}", "--set", "rayCluster.enabled=true",
                      "--set", f"rayCluster.gpuType={gpu}", "--set", "kueue.clusterQueue.create=true",
                      "--set", f"kueue.clusterQueue.gpuType={gpu}")
        expected = default_gpu_node_selectors(choice)[gpu]
        assert _worker(docs)["template"]["spec"]["nodeSelector"] == expected
        assert one(docs, "ResourceFlavor", f"h100-{gpu}")["spec"]["nodeLabels"] == expected
        cfg = cluster_config(docs)
        rj = build_rayjob(plan(RunSpec(depth=12, gpus=8, gpu_type=gpu, storage_root="s3://b")), cfg, namespace="team")
        pod = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        # A label with known equivalents (GKE's A3 Mega) becomes a node-affinity `In` over all of them.
        chosen = dict(pod.get("nodeSelector", {}))
        for t in (pod.get("affinity") or {}).get("nodeAffinity", {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []):
            chosen.update({e["key"]: e["values"][0] for e in t["matchExpressions"] if e["operator"] == "In"})
        assert chosen == expected


def test_network_policy_opens_ray_ports_only_to_the_namespace_operator_and_prometheus(default_docs):
    np = one(default_docs, "NetworkPolicy", "r-llmctl-ray")["spec"]
    assert np["policyTypes"] == ["Ingress"]
    sel = np["podSelector"]
    head = {"app.kubernetes.io/part-of": "llmctl", "ray.io/node-type": "head"}
    submitter = {"app.kubernetes.io/part-of": "llmctl", "llmctl.dev/role": "submitter"}
    assert _selects(sel, head) and _selects(sel, dict(head, **{"ray.io/node-type": "worker"}))
    assert not _selects(sel, submitter)
    same_ns, operator, metrics = np["ingress"]
    assert same_ns == {"from": [{"podSelector": {}}]}  # no ports: Ray's own traffic inside the namespace
    assert operator["ports"] == [{"port": 8265, "protocol": "TCP"}]
    # The operator's pods by their labels in any namespace: no guess of kuberay-system / ray-system / default.
    assert operator["from"] == [{"namespaceSelector": {},
                                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert 8265 not in {p["port"] for p in metrics["ports"]} and {"port": 9400, "endPort": 9407, "protocol": "TCP"} \
        in metrics["ports"]


def test_serve_network_policy_opens_8000_to_gateways_and_9500_to_prometheus(default_docs):
    np = one(default_docs, "NetworkPolicy", "r-llmctl-serve")["spec"]
    assert np["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "llmctl", "llmctl.dev/kind": "service"}}
    serve, metrics = np["ingress"]
    assert serve["ports"] == [{"port": 8000, "protocol": "TCP"}]
    (gateways,) = serve["from"]
    assert "ingress-nginx" in gateways["namespaceSelector"]["matchExpressions"][0]["values"]
    assert {"port": 9500, "protocol": "TCP"} in metrics["ports"] and 8000 not in {p["port"] for p in metrics["ports"]}
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_notes_say_what_to_do_next(helm, chart):
    args = [helm, "install", "r", str(chart), "-n", "team", "--dry-run=client"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    notes = out[out.index("NOTES:"):]
    assert "install the KubeRay operator" in notes and "llmctl submit --depth 26 --gpus 8 -n team" in notes
    out = subprocess.run(args + ["-f", str(CI_VALUES)], capture_output=True, text=True, check=True).stdout
    notes = out[out.index("NOTES:"):]
    assert "--ray-cluster h100-warm" in notes and "LocalQueue h100" in notes and "Group ml-team" in notes


# ---------------------------------------------------------------------------------------------
# The ConfigMap is exactly what the CLI reads


def test_default_configmap_equals_the_cli_defaults(default_docs):
    assert cluster_config(default_docs) == ClusterConfig(run_service_account="r-llmctl-run")


def test_values_config_has_the_shape_the_cli_reads():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    injected = {"image", "imagePullPolicy", "imagePullSecrets", "runServiceAccount"}  # from other values

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            if isinstance(v, dict) and k in ("s3", "head", "workers", "lifecycle", "placement", "kuberay"):
                out |= keys(v, f"{k}.")
            else:
                out.add(prefix + k)
        return out

    assert keys(values) | injected == keys(ClusterConfig().to_dict())


def test_ci_configmap_carries_every_config_value(ci_docs):
    cfg = cluster_config(ci_docs)
    assert cfg.image == "registry.example.com/ml/llmctl-trainer:0.1.0-ci" and cfg.image_pull_policy == "Always"
    assert cfg.image_pull_secrets == ("regcred",) and cfg.storage_root == "s3://ml-runs/llmctl"
    assert (cfg.s3_endpoint, cfg.s3_region, cfg.s3_secret) == ("http://minio.storage.svc:9000", "us-east-1", "llmctl-s3")
    assert cfg.prices == {"h100": 2.49, "h200": 3.5} and cfg.queue == "h100"  # from kueue.localQueue
    assert cfg.priority_class == "llmctl-training" and cfg.run_service_account == "llmctl-ci-run"
    # the chart's WorkloadPriorityClasses, named in the config the CLI reads
    assert (cfg.kueue_priority_class, cfg.kueue_sweep_priority_class) == ("llmctl-production", "llmctl-sweep-ci")
    assert cfg.labels == {"team": "research", "cost-center": "42"}
    assert cfg.env == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5"}
    assert (cfg.head_cpu, cfg.head_memory, cfg.head_node_selector) == ("16", "64Gi", {"node-pool": "on-demand-cpu"})
    assert cfg.cpu_per_gpu == 20 and cfg.memory_per_gpu_gi == 200 and cfg.worker_extra_resources == {"rdma/ib": "1"}
    assert cfg.gpu_node_selectors["h100"]["node-pool"] == "h100" and cfg.gpu_labels == "gpu-operator"
    assert (cfg.scratch_size, cfg.tmp_size, cfg.kuberay_version, cfg.ray_auth) == ("500Gi", "10Gi", "1.6", "token")
    assert cfg.topology_spread[0]["topologyKey"] == "kubernetes.io/hostname" and cfg.extra_volumes[0]["name"] == "cache"
    assert cfg.pod_annotations == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"} and cfg.affinity
    assert (cfg.backoff_limit, cfg.ttl_seconds_after_finished, cfg.pre_running_deadline_seconds) == (3, 300, 3600)
    assert (cfg.deadline_factor, cfg.deadline_slack_seconds) == (2, 3600)
    # and a run submitted with it is valid
    rj = build_rayjob(plan(RunSpec(depth=20, gpus=16, storage_root=cfg.storage_root)), cfg, namespace="team")
    schemas.validate(rj)


# ---------------------------------------------------------------------------------------------
# One case per value that changes the output


def _labels(d):
    return d["metadata"].get("labels") or {}


def _cm(docs):
    return yaml.safe_load(one(docs, "ConfigMap", "llmctl-config")["data"]["config.yaml"])


def _rc(docs):
    return one(docs, "RayCluster")


def _worker(docs):
    return _rc(docs)["spec"]["workerGroupSpecs"][0]


def _worker_c(docs):
    return _worker(docs)["template"]["spec"]["containers"][0]


WARM = ["--set", "rayCluster.enabled=true"]
CASES = {
    "nameOverride": (["--set", "nameOverride=trainer"],
                     lambda d: _labels(one(d, "Role", "r-trainer-submit"))["app.kubernetes.io/name"] == "trainer"),
    "fullnameOverride": (["--set", "fullnameOverride=ml"], lambda d: find(d, "RoleBinding", "ml-submit")),
    "image.repository+tag": (["--set", "image.repository=reg.io/t", "--set", "image.tag=9"],
                             lambda d: _cm(d)["image"] == "reg.io/t:9"),
    "image.pullPolicy": (WARM + ["--set", "image.pullPolicy=Always"],
                         lambda d: _cm(d)["imagePullPolicy"] == "Always" and _worker_c(d)["imagePullPolicy"] == "Always"),
    "imagePullSecrets": (WARM + ["--set", "imagePullSecrets[0].name=regcred"],
                         lambda d: _cm(d)["imagePullSecrets"] == [{"name": "regcred"}]
                         and _worker(d)["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]),
    "config.rayVersion": (WARM + ["--set", "config.rayVersion=2.61.0"],
                          lambda d: _cm(d)["rayVersion"] == "2.61.0" and _rc(d)["spec"]["rayVersion"] == "2.61.0"),
    "config.storageRoot": (["--set", "config.storageRoot=gs://b/p"], lambda d: _cm(d)["storageRoot"] == "gs://b/p"),
    "config.s3": (WARM + ["--set", "config.s3.endpoint=http://minio:9000", "--set", "config.s3.region=eu",
                          "--set", "config.s3.credentialsSecret=s3creds"],
                  lambda d: _cm(d)["s3"] == {"endpoint": "http://minio:9000", "region": "eu", "credentialsSecret": "s3creds"}
                  and _worker_c(d)["envFrom"] == [{"secretRef": {"name": "s3creds"}}]
                  and {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"} in _worker_c(d)["env"]),
    "config.prices": (["--set-json", 'config.prices={"h100": 2.25}'], lambda d: _cm(d)["prices"] == {"h100": 2.25}),
    "config.queue": (["--set", "config.queue=team-q"], lambda d: _cm(d)["queue"] == "team-q"),
    "config.priorityClass": (WARM + ["--set", "config.priorityClass=llmctl-training"],
                             lambda d: _cm(d)["priorityClass"] == "llmctl-training"
                             and _worker(d)["template"]["spec"]["priorityClassName"] == "llmctl-training"),
    "config.labels": (WARM + ["--set", "config.labels.team=a"],
                      lambda d: _cm(d)["labels"] == {"team": "a"} and _labels(_worker(d)["template"])["team"] == "a"),
    "config.env": (WARM + ["--set", "config.env.NCCL_SOCKET_IFNAME=eth0"],
                   lambda d: _cm(d)["env"] == {"NCCL_SOCKET_IFNAME": "eth0"}
                   and {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in _worker_c(d)["env"]),
    "config.readOnlyRootFilesystem": (WARM + ["--set", "config.readOnlyRootFilesystem=false"],
                                      lambda d: _cm(d)["readOnlyRootFilesystem"] is False
                                      and _worker_c(d)["securityContext"]["readOnlyRootFilesystem"] is False),
    "config.head": (WARM + ["--set", "config.head.cpu=4", "--set", "config.head.memory=16Gi",
                            "--set", "config.head.nodeSelector.pool=cpu"],
                    lambda d: str(_cm(d)["head"]["cpu"]) == "4"
                    and _rc(d)["spec"]["headGroupSpec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
                    and _rc(d)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
                    == {"cpu": "4", "memory": "16Gi"}),
    "config.head.tolerations": (WARM + ["--set-json", 'config.head.tolerations=[{"key":"k","operator":"Exists"}]'],
                                lambda d: _rc(d)["spec"]["headGroupSpec"]["template"]["spec"]["tolerations"]
                                == [{"key": "k", "operator": "Exists"}]),
    "config.workers sizes": (WARM + ["--set", "config.workers.cpuPerGpu=10", "--set", "config.workers.memoryPerGpuGi=100",
                                     "--set", "config.workers.extraResources.rdma/ib=1"],
                             lambda d: _worker_c(d)["resources"]["limits"]
                             == {"cpu": "80", "memory": "800Gi", "nvidia.com/gpu": "8", "rdma/ib": "1",
                                 "ephemeral-storage": "220Gi"}),
    "config.workers.gpusPerNode": (["--set", "config.workers.gpusPerNode=4"], lambda d: _cm(d)["workers"]["gpusPerNode"] == 4),
    "config.workers.nodeSelectors": (WARM + ["--set", "config.workers.nodeSelectors.h100.pool=gpu"],
                                     lambda d: _worker(d)["template"]["spec"]["nodeSelector"]["pool"] == "gpu"),
    "config.workers.tolerations": (WARM + ["--set-json", "config.workers.tolerations=[]"],
                                   lambda d: "tolerations" not in _worker(d)["template"]["spec"]),
    "config.workers.gpuLabels": (WARM + ["--set", "config.workers.gpuLabels=gke"],
                                 lambda d: _worker(d)["template"]["spec"]["nodeSelector"]
                                 == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}),
    "config.workers.scratchSize+tmpSize": (WARM + ["--set", "config.workers.scratchSize=100Gi", "--set", "config.tmpSize=5Gi"],
                                           lambda d: _worker_c(d)["resources"]["limits"]["ephemeral-storage"] == "105Gi"
                                           and {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}
                                           in _worker(d)["template"]["spec"]["volumes"]),
    "config.placement": (WARM + ["--set-json", 'config.placement={"podAnnotations": {"a": "b"}, "topologySpreadConstraints": '
                                 '[{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}], '
                                 '"affinity": {"podAntiAffinity": {}}}'],
                         lambda d: _worker(d)["template"]["metadata"]["annotations"] == {"a": "b"}
                         and _worker(d)["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"]
                         == {"matchLabels": {"app.kubernetes.io/instance": "r", "llmctl.dev/role": "worker"}}
                         and _worker(d)["template"]["spec"]["affinity"] == {"podAntiAffinity": {}}),
    "config.extraVolumes+Mounts": (WARM + ["--set-json", 'config.extraVolumes=[{"name": "c", "emptyDir": {}}]',
                                           "--set-json", 'config.extraVolumeMounts=[{"name": "c", "mountPath": "/c"}]'],
                                   lambda d: {"name": "c", "emptyDir": {}} in _worker(d)["template"]["spec"]["volumes"]
                                   and {"name": "c", "mountPath": "/c"} in _worker_c(d)["volumeMounts"]),
    "config.kuberay.version+rayAuth": (WARM + ["--set", "config.kuberay.version=1.6"],
                                       lambda d: _rc(d)["spec"]["authOptions"] == {"mode": "token"}
                                       and _cm(d)["kuberay"]["version"] == "1.6"),
    "config.rayAuth": (["--set", "config.rayAuth=disabled"], lambda d: _cm(d)["rayAuth"] == "disabled"),
    "rbac.clusterScope": (["--set", "rbac.clusterScope=true"],
                          lambda d: one(d, "ClusterRole")["rules"][0] == {"apiGroups": ["ray.io"],
                                                                          "resources": ["rayjobs", "rayservices",
                                                                                        "rayclusters"],
                                                                          "verbs": ["list", "watch"]}
                          and one(d, "ClusterRoleBinding")["roleRef"]["name"] == one(d, "ClusterRole")["metadata"]["name"]),
    "networkPolicy.enabled": (["--set", "networkPolicy.enabled=false"], lambda d: not find(d, "NetworkPolicy")),
    "networkPolicy.operatorNamespace+metricsFrom": (
        ["--set", "networkPolicy.operatorNamespace=ray", "--set-json", "networkPolicy.metricsFrom=[]"],
        lambda d: [r["from"] for r in one(d, "NetworkPolicy", "r-llmctl-ray")["spec"]["ingress"]]
        == [[{"podSelector": {}}], [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray"}},
                                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]]
        and [r["ports"][0]["port"] for r in one(d, "NetworkPolicy", "r-llmctl-serve")["spec"]["ingress"]] == [8000]),
    "networkPolicy.serveNamespaces+serveFrom": (
        ["--set-json", "networkPolicy.serveNamespaces=[]", "--set-json", 'networkPolicy.serveFrom=[{"ipBlock":{"cidr":"10.0.0.0/8"}}]'],
        lambda d: one(d, "NetworkPolicy", "r-llmctl-serve")["spec"]["ingress"][0]["from"]
        == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]),
    "kueue.clusterQueue": (["--set", "kueue.clusterQueue.create=true", "--set", "kueue.clusterQueue.nodes=2",
                            "--set", "kueue.clusterQueue.runs=3", "--set", "config.workers.extraResources.vpc\\.amazonaws\\.com/efa=32"],
                           lambda d: one(d, "ClusterQueue")["spec"]["resourceGroups"][0]["coveredResources"]
                           == ["cpu", "memory", "nvidia.com/gpu", "ephemeral-storage", "vpc.amazonaws.com/efa"]
                           and {"name": "vpc.amazonaws.com/efa", "nominalQuota": "64"}
                           in one(d, "ClusterQueue")["spec"]["resourceGroups"][0]["flavors"][1]["resources"]
                           and one(d, "ResourceFlavor", "h100-h100")["spec"]["nodeLabels"]
                           == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
    "config.lifecycle": (["--set", "config.lifecycle.backoffLimit=0", "--set", "config.lifecycle.deadlineFactor=3"],
                         lambda d: _cm(d)["lifecycle"]["backoffLimit"] == 0 and _cm(d)["lifecycle"]["deadlineFactor"] == 3),
    "rbac.create": (["--set", "rbac.create=false"], lambda d: not find(d, "Role") and not find(d, "RoleBinding")),
    "rbac.subjects": (["--set", "rbac.subjects[0].kind=User", "--set", "rbac.subjects[0].name=ada"],
                      lambda d: {"kind": "User", "name": "ada"} in one(d, "RoleBinding", "r-llmctl-submit")["subjects"]),
    "serviceAccount.create": (["--set", "serviceAccount.create=false"],
                              lambda d: [s["metadata"]["name"] for s in find(d, "ServiceAccount")] == ["r-llmctl-run"]
                              and "subjects" not in one(d, "RoleBinding", "r-llmctl-submit")
                              or one(d, "RoleBinding", "r-llmctl-submit").get("subjects") in (None, [])),
    "serviceAccount.name+annotations": (["--set", "serviceAccount.name=ci", "--set", "serviceAccount.annotations.a=b"],
                                        lambda d: one(d, "ServiceAccount", "ci")["metadata"]["annotations"] == {"a": "b"}),
    "runServiceAccount.create": (["--set", "runServiceAccount.create=false"],
                                 lambda d: _cm(d)["runServiceAccount"] == "" and not find(d, "Role", "r-llmctl-run")),
    "runServiceAccount.name+annotations": (["--set", "runServiceAccount.name=runner",
                                            "--set", "runServiceAccount.annotations.x=y"],
                                           lambda d: _cm(d)["runServiceAccount"] == "runner"
                                           and one(d, "ServiceAccount", "runner")["metadata"]["annotations"] == {"x": "y"}),
    "monitoring.podMonitors.enabled": (["--set", "monitoring.podMonitors.enabled=false"], lambda d: not find(d, "PodMonitor")),
    "monitoring.podMonitors.interval+labels": (["--set", "monitoring.podMonitors.interval=1m",
                                                "--set", "monitoring.podMonitors.additionalLabels.release=kps"],
                                               lambda d: all(e["interval"] == "1m" for pm in find(d, "PodMonitor")
                                                             for e in pm["spec"]["podMetricsEndpoints"])
                                               and all(_labels(pm)["release"] == "kps" for pm in find(d, "PodMonitor"))),
    "monitoring.prometheusRule.enabled": (["--set", "monitoring.prometheusRule.enabled=false"],
                                          lambda d: not find(d, "PrometheusRule")),
    "monitoring.prometheusRule.additionalLabels": (["--set", "monitoring.prometheusRule.additionalLabels.release=kps"],
                                                   lambda d: _labels(one(d, "PrometheusRule"))["release"] == "kps"),
    "monitoring.dashboards.enabled": (["--set", "monitoring.dashboards.enabled=false"],
                                      lambda d: [c["metadata"]["name"] for c in find(d, "ConfigMap")] == ["llmctl-config"]),
    "monitoring.dashboards label/value/folder/annotations": (
        ["--set", "monitoring.dashboards.label=dash", "--set", "monitoring.dashboards.labelValue=yes",
         "--set", "monitoring.dashboards.folder=", "--set", "monitoring.dashboards.annotations.k=v"],
        lambda d: all(_labels(c).get("dash") == "yes" and c["metadata"]["annotations"] == {"k": "v"}
                      for c in find(d, "ConfigMap") if "dashboard" in c["metadata"]["name"])),
    "rayCluster.enabled+name": (WARM + ["--set", "rayCluster.name=warm"], lambda d: _rc(d)["metadata"]["name"] == "warm"),
    "rayCluster.gpuType": (WARM + ["--set", "rayCluster.gpuType=h200"],
                           lambda d: _worker(d)["groupName"] == "h200"
                           and _worker(d)["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}),
    "rayCluster.gpusPerWorker": (WARM + ["--set", "rayCluster.gpusPerWorker=4"],
                                 lambda d: [p["name"] for p in _worker_c(d)["ports"]] == [f"llm-m{i}" for i in range(4)] + ["metrics"]
                                 and _worker_c(d)["resources"]["limits"]["nvidia.com/gpu"] == "4"),
    "rayCluster.replicas": (WARM + ["--set", "rayCluster.replicas=3"],
                            lambda d: (_worker(d)["replicas"], _worker(d)["minReplicas"], _worker(d)["maxReplicas"]) == (3, 3, 3)),
    "rayCluster.autoscaling": (WARM + ["--set", "rayCluster.autoscaling.enabled=true", "--set", "rayCluster.autoscaling.minReplicas=1",
                                       "--set", "rayCluster.autoscaling.maxReplicas=5", "--set", "rayCluster.autoscaling.idleTimeoutSeconds=60"],
                               lambda d: _rc(d)["spec"]["enableInTreeAutoscaling"] is True
                               and (_worker(d)["minReplicas"], _worker(d)["maxReplicas"], _worker(d)["idleTimeoutSeconds"]) == (1, 5, 60)
                               and _rc(d)["spec"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
                               and "serviceAccountName" not in _rc(d)["spec"]["headGroupSpec"]["template"]["spec"]),
    "kueue.priorityClasses": (["--set", "kueue.priorityClasses.create=true", "--set", "kueue.priorityClasses.production=7",
                               "--set", "kueue.priorityClasses.sweep=-7"],
                              lambda d: {(w["metadata"]["name"], w["value"]) for w in find(d, "WorkloadPriorityClass")}
                              == {("llmctl-production", 7), ("llmctl-sweep", -7)}
                              and _cm(d)["kueue"]["priorityClass"] == "llmctl-production"),
    "kueue.localQueue": (["--set", "kueue.localQueue.create=true", "--set", "kueue.localQueue.name=q1",
                          "--set", "kueue.localQueue.clusterQueue=cq1"],
                         lambda d: one(d, "LocalQueue", "q1")["spec"] == {"clusterQueue": "cq1"} and _cm(d)["queue"] == "q1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_value_changes_the_output(helm, chart, default_docs, case):
    args, check = CASES[case]
    docs = render(helm, chart, *args)
    assert check(docs), f"{case}: {args}"
    schemas.validate_all(docs)
    assert docs != default_docs


CONFIG_SAMPLES = {  # a non-default value for every leaf under `config` in values.schema.json
    "rayVersion": "2.61.0", "storageRoot": "gs://b/p", "s3.endpoint": "http://minio:9000", "s3.region": "eu-west-1",
    "s3.credentialsSecret": "s3creds", "prices": {"h100": 2.25}, "spotPrices": {"h100": 1.5}, "spotProvider": "eks",
    "spotNodeSelector": {"pool": "spot"}, "spotTolerations": [{"key": "spot", "operator": "Exists"}], "queue": "q", "priorityClass": "pc",
    "labels": {"team": "a"}, "env": {"NCCL_IB_HCA": "mlx5"}, "readOnlyRootFilesystem": False, "head.cpu": "4",
    "head.memory": "16Gi", "head.nodeSelector": {"pool": "cpu"},
    "head.tolerations": [{"key": "k", "operator": "Exists"}], "workers.gpusPerNode": 4, "workers.cpuPerGpu": 10,
    "workers.memoryPerGpuGi": 100, "workers.nodeSelectors": {"h100": {"pool": "gpu"}}, "workers.tolerations": [],
    "workers.extraResources": {"rdma/ib": "1"}, "workers.gpuLabels": "gke", "workers.scratchSize": "50Gi",
    "tmpSize": "5Gi", "rayAuth": "disabled", "kuberay.version": "1.5", "placement.affinity": {"podAffinity": {}},
    "placement.topologySpreadConstraints": [{"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}],
    "placement.podAnnotations": {"a": "b"}, "placement.topology": [{"name": "rack", "nodeLabel": "r", "nodes": 4}],
    "extraVolumes": [{"name": "c", "emptyDir": {}}],
    "extraVolumeMounts": [{"name": "c", "mountPath": "/c"}],
    "lifecycle.backoffLimit": 0, "lifecycle.ttlSecondsAfterFinished": 60, "lifecycle.preRunningDeadlineSeconds": 600,
    "lifecycle.deadlineFactor": 2.5, "lifecycle.deadlineSlackSeconds": 0, "lifecycle.maxGraceSeconds": 120,
    "lifecycle.gpuTtlSecondsAfterFinished": 30, "kueue.elasticJobs": True, "kueue.priorityClass": "pc-prod",
    "kueue.sweepPriorityClass": "pc-sweep", "serve.allowedHosts": ["chat.example.com"],
    "serve.apiKeySha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "serve.vllmImage": "registry.example.com/ray-llm:2.60.0-py312-cu130",
}


def test_every_config_value_reaches_the_configmap_and_the_cli(helm, chart, default_docs):
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]

    def leaves(node, prefix=""):
        for k, v in node["properties"].items():
            yield from (leaves(v, f"{prefix}{k}.") if "properties" in v else [prefix + k])

    assert sorted(leaves(schema)) == sorted(CONFIG_SAMPLES), "add a sample for each new config key"
    args = [a for path, v in CONFIG_SAMPLES.items() for a in ("--set-json", f"config.{path}={json.dumps(v)}")]
    docs = render(helm, chart, *args)
    got, default = _cm(docs), _cm(default_docs)

    def has(node, value):  # helm merges maps into the defaults; lists and scalars replace them
        if isinstance(value, dict):
            return isinstance(node, dict) and all(k in node and has(node[k], v) for k, v in value.items())
        return node == value

    for path, value in CONFIG_SAMPLES.items():
        node, base = got, default
        for part in path.split("."):
            node, base = node[part], base[part]
        assert has(node, value) and not has(base, value), path
    cfg = cluster_config(docs)  # and the CLI reads each of them
    assert (cfg.storage_root, cfg.s3_region, cfg.queue, cfg.gpus_per_node, cfg.deadline_factor) == \
        ("gs://b/p", "eu-west-1", "q", 4, 2.5)
    assert cfg.gpu_node_selectors["h100"]["pool"] == "gpu" and cfg.gpu_tolerations == ()


REFUSED = [
    (["--set", "config.workers.gpusPerNode=0"], "at '/config/workers/gpusPerNode': minimum"),
    (["--set", "confg.storageRoot=s3://x"], "additional properties 'confg' not allowed"),
    (["--set", "config.storageRoot=bucket"], "/config/storageRoot"),
    (["--set", "config.storageRoot=file:///data"], "is node-local"),
    (["--set", "config.env.AWS_SECRET_ACCESS_KEY=x"], "config.env.AWS_SECRET_ACCESS_KEY looks like a credential"),
    (WARM + ["--set", "rayCluster.gpusPerWorker=16"], "rayCluster.gpusPerWorker (16) cannot exceed config.workers.gpusPerNode (8)"),
    (WARM + ["--set", "rayCluster.autoscaling.enabled=true", "--set", "rayCluster.autoscaling.minReplicas=5",
             "--set", "rayCluster.autoscaling.maxReplicas=2"], "minReplicas (5) is above maxReplicas (2)"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "rayCluster.name=Warm_Cluster"], "/rayCluster/name"),
    (["--set", "kueue.priorityClasses.create=true", "--set", "kueue.priorityClasses.sweep=100000"],
     "kueue.priorityClasses.sweep (100000) must be below kueue.priorityClasses.production (100000)"),
    (["--set", "kueue.priorityClasses.create=true", "--set", "config.kueue.priorityClass=llmctl-sweep"],
     "config.kueue.priorityClass and config.kueue.sweepPriorityClass are both \"llmctl-sweep\""),
]


@pytest.mark.parametrize("args, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_values_are_refused_naming_the_key(helm, chart, args, message):
    assert message in render(helm, chart, *args, ok=False)


# ---------------------------------------------------------------------------------------------
# Dashboards, alerts, monitoring selectors


def test_one_configmap_per_dashboard_with_the_sidecar_label(chart, default_docs):
    files = sorted((chart / "dashboards").glob("*.json"))
    cms = [c for c in find(default_docs, "ConfigMap") if _labels(c).get("grafana_dashboard") == "1"]
    assert len(cms) == len(files) >= 1
    by_key = {k: v for c in cms for k, v in c["data"].items()}
    assert sorted(by_key) == [f.name for f in files]
    for f in files:
        assert json.loads(by_key[f.name]) == json.loads(f.read_text())
    for c in cms:
        assert c["metadata"]["annotations"]["grafana_folder"] == "llmctl"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", c["metadata"]["name"]) and len(c["metadata"]["name"]) <= 63


def test_prometheus_rule_spec_is_the_alerts_file(chart, default_docs):
    spec = one(default_docs, "PrometheusRule")["spec"]
    assert spec == yaml.safe_load((chart / "files" / "alerts.yaml").read_text())


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


def test_pod_monitors_scrape_the_ports_runs_and_the_warm_cluster_declare(ci_docs):
    trainer = one(ci_docs, "PodMonitor", "llmctl-ci-trainer")["spec"]
    ray = one(ci_docs, "PodMonitor", "llmctl-ci-ray")["spec"]
    rj = build_rayjob(plan(RunSpec(depth=26, gpus=16, storage_root="s3://b")), ClusterConfig(), namespace="team")
    rc = one(ci_docs, "RayCluster")["spec"]
    pods = []  # (labels as KubeRay sets them on the pod, declared port names)
    for cluster in (rj["spec"]["rayClusterSpec"], rc):
        for node_type, tpl in [("head", cluster["headGroupSpec"]["template"])] + \
                [("worker", g["template"]) for g in cluster["workerGroupSpecs"]]:
            labels = dict(tpl["metadata"]["labels"], **{"ray.io/node-type": node_type})
            pods.append((node_type, labels, {p["name"] for p in tpl["spec"]["containers"][0]["ports"]}))
    trainer_ports = {e["port"] for e in trainer["podMetricsEndpoints"]}
    ray_ports = {e["port"] for e in ray["podMetricsEndpoints"]}
    assert trainer_ports == {f"llm-m{i}" for i in range(8)} and ray_ports == {"metrics", "as-metrics", "dash-metrics"}
    for node_type, labels, ports in pods:
        assert _selects(trainer["selector"], labels) == (node_type == "worker")
        assert _selects(ray["selector"], labels)
        if node_type == "worker":
            assert {p for p in ports if p.startswith("llm-m")} == trainer_ports  # 8 GPUs: all eight ports
            assert "metrics" in ports
        else:
            assert ray_ports <= ports


def test_warm_cluster_pods_match_what_submit_renders(ci_docs):
    """The chart's RayCluster and cli/kube/rayjob.py build the same head and worker pods from the same config."""
    rc = one(ci_docs, "RayCluster")["spec"]
    cfg = cluster_config(ci_docs)
    rj = build_rayjob(plan(RunSpec(depth=26, gpus=16, storage_root=cfg.storage_root)), cfg, namespace="team")
    mine = rj["spec"]["rayClusterSpec"]
    for a, b in [(rc["headGroupSpec"], mine["headGroupSpec"]), (rc["workerGroupSpecs"][0], mine["workerGroupSpecs"][0])]:
        assert a["rayStartParams"] == b["rayStartParams"]
        pa, pb = a["template"]["spec"], b["template"]["spec"]
        keys = ["securityContext", "nodeSelector", "tolerations", "priorityClassName", "imagePullSecrets", "volumes"]
        if a is rc["workerGroupSpecs"][0]:  # the head differs when the warm cluster autoscales
            keys += ["serviceAccountName", "automountServiceAccountToken"]
        for key in keys:
            assert pa.get(key) == pb.get(key), key
        ca, cb = pa["containers"][0], pb["containers"][0]
        for key in ("name", "image", "imagePullPolicy", "ports", "resources", "securityContext", "volumeMounts", "envFrom"):
            assert ca.get(key) == cb.get(key), key
        env_a = {e["name"]: e for e in ca["env"]}
        env_b = {e["name"]: e for e in cb["env"] if e["name"] != "LLMCTL_RUN"}
        assert env_a == env_b
    assert rc["rayVersion"] == mine["rayVersion"]


# ---------------------------------------------------------------------------------------------
# Hygiene: every value documented, pods locked down, standard labels


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key path -> line index, for the mapping keys of a block-style YAML file."""
    out, stack = {}, []
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m or line.lstrip().startswith("-"):
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        out[".".join(k for _, k in stack)] = i
    return out


def test_every_value_has_a_helm_docs_comment():
    text = (CHART / "values.yaml").read_text()
    lines, where = text.splitlines(), _key_lines(text)
    schema = json.loads((CHART / "values.schema.json").read_text())

    def leaves(node, prefix=""):
        for k, v in (node.get("properties") or {}).items():
            path = prefix + k
            if "properties" in v:
                yield from leaves(v, path + ".")
            else:
                yield path

    missing = []
    for path in leaves(schema):
        if path == "global":
            continue
        i = where[path] - 1
        block = []
        while i >= 0 and lines[i].lstrip().startswith("#"):
            block.append(lines[i].strip())
            i -= 1
        if not block or not block[-1].startswith("# --"):
            missing.append(path)
    assert missing == [], f"values without a `# --` description: {missing}"


def test_rendered_pods_are_locked_down_and_labelled(ci_docs):
    for d in ci_docs:
        labels = _labels(d)
        assert labels["app.kubernetes.io/part-of"] == "llmctl" and labels["app.kubernetes.io/instance"] == "r"
        assert labels["helm.sh/chart"] == "llmctl-0.1.0"
    for _, tpl in schemas.pod_templates(one(ci_docs, "RayCluster")):
        spec = tpl["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert not any("value" in e and re.search("SECRET|TOKEN|PASSWORD", e["name"]) for e in c["env"])
    role = one(ci_docs, "Role", "llmctl-ci-submit")
    verbs = {(tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]}
    assert (("rayjobs",), ("create", "get", "list", "watch", "delete")) in verbs
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in role["rules"])
    # the run's account has no Role: no pod needs the Kubernetes API
    assert not find(ci_docs, "Role", "llmctl-ci-run") and not find(ci_docs, "RoleBinding", "llmctl-ci-run")


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def _helm(*args: str) -> tuple[list[dict], str]:
    from tests import schemas
    from tests.tools import ensure_helm

    chart = ROOT / "charts" / "llmctl"
    out = subprocess.run([str(ensure_helm()), "template", "r", str(chart), "-n", "team", *args],
                         capture_output=True, text=True, check=True).stdout
    notes = subprocess.run([str(ensure_helm()), "install", "r", str(chart), "-n", "team", "--dry-run=client",
                            *args], capture_output=True, text=True)
    return schemas.load_yaml_stream(out), notes.stdout


def test_hostile_chart_labels_the_namespace_it_creates_for_restricted_pod_security():
    docs, _ = _helm("--set", "namespace.create=true")
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == "team"
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"


def test_hostile_chart_in_an_existing_namespace_prints_the_label_command():
    docs, notes = _helm()
    assert not [d for d in docs if d["kind"] == "Namespace"]
    assert "kubectl label namespace team pod-security.kubernetes.io/enforce=restricted" in notes


def test_hostile_security_doc_exists_and_says_the_run_account_needs_no_rayjob_write():
    text = (ROOT / "docs" / "security.md").read_text()
    for part in ("Threat model", "untrusted submitter", "malicious file", "compromised pod", "operator"):
        assert part.lower() in text.lower(), part
    assert "RayJob" in text and "no write" in text.lower()


@pytest.mark.parametrize("value, message", [
    ("config.env.WANDB_API_KEY=x", "looks like a credential"),
    ("config.env.LLMCTL_RUN=x", "is set by llmctl"),
    ("config.env.NCCL_NOTE=AKIAIOSFODNN7EXAMPLE", "its value looks like a credential"),
    ("config.storageRoot=https://user:pw@host/x", "user:password"),
    ("config.s3.endpoint=http://user:pw@minio:9000", "user:password"),
    ("config.storageRoot=memory://x", "shared storage"),
    ("config.storageRoot=FILE:///x", "storageRoot"),  # the values schema already refuses it
])
def test_hostile_chart_values_follow_the_same_rules(value, message):
    from tests.tools import ensure_helm

    res = subprocess.run([str(ensure_helm()), "template", "r", str(ROOT / "charts" / "llmctl"), "-n", "team",
                          "--set", value], capture_output=True, text=True)
    assert res.returncode != 0 and message in res.stderr and "pw@" not in res.stderr, res.stderr

"""cli/kube/rayjob.py and cli/kube/config.py: the RayJob a plan becomes, checked strictly against the CRD of every
supported KubeRay release (1.3-1.7; only the fields each release serves), the Kubernetes schemas and KubeRay's
admission rules; the plan's trip through three shells; the golden examples
in k8s/examples/; the trainer Dockerfile (hadolint, Ray version agreement).

Run: .venv/bin/pytest tests/cli/kube/test_rayjob.py -v
Regenerate the golden examples after a deliberate change: LLMCTL_REGEN=1 .venv/bin/pytest tests/cli/kube/test_rayjob.py -k golden
"""

from __future__ import annotations

import copy
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.kube.config import IMAGE, RAY_VERSION, ClusterConfig, config_from_configmap
from cli.main import UsageError, main
from cli.kube.layout import LayoutError
from cli.kube.rayjob import (HEAD_PORTS, active_deadline_seconds, build_rayjob, entrypoint,
                        worker_layout)
from tests import schemas
from trainer.plan import RunPlan, RunSpec, plan

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "k8s" / "examples"
STORAGE = "s3://llmctl-runs"


def rayjob(depth=26, gpus=8, cfg: ClusterConfig | None = None, **spec):
    p = plan(RunSpec(depth=depth, gpus=gpus, storage_root=STORAGE, **spec))
    return p, build_rayjob(p, cfg or ClusterConfig(), namespace="team")


def workers(rj):
    return rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def containers(rj):
    yield rj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    cluster = rj["spec"].get("rayClusterSpec")
    if cluster:
        yield cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        for g in cluster["workerGroupSpecs"]:
            yield g["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------------------------------------
# Layout: ceil(gpus/8) pods of min(gpus, 8) GPUs


@pytest.mark.parametrize("gpus, pods, per_pod", [(1, 1, 1), (2, 1, 2), (4, 1, 4), (8, 1, 8), (16, 2, 8), (64, 8, 8)])
def test_worker_layout(gpus, pods, per_pod):
    assert worker_layout(gpus) == (pods, per_pod)
    _, rj = rayjob(depth=12, gpus=gpus)
    (group,) = workers(rj)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == pods
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] == res["limits"], "GPU pods must be Guaranteed: requests = limits"
    assert res["limits"]["nvidia.com/gpu"] == str(per_pod)
    assert res["limits"]["cpu"] == str(12 * per_pod) and res["limits"]["memory"] == f"{125 * per_pod}Gi"


def test_layout_refuses_idle_gpus():
    with pytest.raises(LayoutError, match="multiple of 8"):
        worker_layout(12)
    assert worker_layout(8, gpus_per_node=4) == (2, 4)


def test_d26_on_8_gpus_is_one_whole_node_and_a_cpu_head():
    p, rj = rayjob(26, 8)
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-gpus": "0"}
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    assert {(p_["name"], p_["containerPort"]) for p_ in head_c["ports"]} == set(HEAD_PORTS)
    (group,) = workers(rj)
    worker_c = group["template"]["spec"]["containers"][0]
    assert [(x["name"], x["containerPort"]) for x in worker_c["ports"]] == \
        [(f"llm-m{i}", 9400 + i) for i in range(8)] + [("metrics", 8080)]
    assert group["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        group["template"]["spec"]["tolerations"]
    assert rj["metadata"]["name"] == p.name and len(p.name) <= 47
    schemas.validate(rj)


def test_lifecycle_fields_follow_the_plan():
    p, rj = rayjob(20, 8)
    spec = rj["spec"]
    # KubeRay >= 1.6, no Kueue: GPU workers deleted when the run ends, the CPU head after 600 s.
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    assert {"policy": "DeleteWorkers", "condition": {"jobStatus": "FAILED", "ttlSeconds": 0}} \
        in spec["deletionStrategy"]["deletionRules"]
    assert spec["backoffLimit"] == 2 and spec["preRunningDeadlineSeconds"] == 1800
    assert spec["submissionMode"] == "K8sJobMode"
    deadline = spec["activeDeadlineSeconds"]
    assert deadline == math.ceil(p.estimate.total_hours * 3600 * 1.5) + 1800 == active_deadline_seconds(p, ClusterConfig())
    assert deadline > p.estimate.total_hours * 3600 * 1.5
    assert "suspend" not in spec and "kueue.x-k8s.io/queue-name" not in rj["metadata"]["labels"]
    cfg = ClusterConfig(backoff_limit=0, deadline_factor=2.0, deadline_slack_seconds=0)
    _, rj0 = rayjob(20, 8, cfg)
    assert "backoffLimit" not in rj0["spec"]  # KubeRay wants it positive when present
    assert rj0["spec"]["activeDeadlineSeconds"] == math.ceil(p.estimate.total_hours * 7200)


def test_labels_and_annotations_carry_depth_gpus_estimate_and_price():
    p, rj = rayjob(26, 16, cfg=ClusterConfig(labels={"team": "research"}), price_per_gpu_hour=2.5,
                   budget_cap=500.0)
    labels, ann = rj["metadata"]["labels"], rj["metadata"]["annotations"]
    assert labels["llmctl.dev/depth"] == "26" and labels["llmctl.dev/gpus"] == "16"
    assert labels["llmctl.dev/gpu-type"] == "h100" and labels["app.kubernetes.io/managed-by"] == "llmctl"
    assert labels["team"] == "research"
    assert ann["llmctl.dev/estimate-dollars"] == f"{p.estimate.total_dollars:.2f}"
    assert ann["llmctl.dev/estimate-hours"] == f"{p.estimate.total_hours:.3f}"
    assert ann["llmctl.dev/price-per-gpu-hour"] == "2.50" and ann["llmctl.dev/budget-cap-dollars"] == "500.00"
    assert ann["llmctl.dev/storage"] == f"{STORAGE}/runs/{p.name}"
    for role, tpl in [("submitter", rj["spec"]["submitterPodTemplate"]),
                      ("head", rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]),
                      ("worker", workers(rj)[0]["template"])]:
        assert tpl["metadata"]["labels"]["llmctl.dev/role"] == role
        assert tpl["metadata"]["labels"]["llmctl.dev/run"] == p.name
        assert tpl["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmctl"


def test_kueue_queue_creates_the_job_suspended():
    _, rj = rayjob(26, 16, ClusterConfig(queue="h100"))
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100"
    assert rj["spec"]["suspend"] is True and rj["spec"]["shutdownAfterJobFinishes"] is True
    schemas.validate(rj)


def test_warm_cluster_mode_selects_the_cluster_and_drops_what_kuberay_forbids():
    p = plan(RunSpec(depth=20, gpus=8, storage_root=STORAGE))
    rj = build_rayjob(p, ClusterConfig(), namespace="team", ray_cluster="llmctl-warm")
    spec = rj["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": "llmctl-warm"}
    for forbidden in ("rayClusterSpec", "suspend", "backoffLimit", "shutdownAfterJobFinishes"):
        assert forbidden not in spec
    schemas.validate(rj)
    with pytest.raises(ValueError, match="cannot be queued"):
        build_rayjob(p, ClusterConfig(queue="h100"), namespace="team", ray_cluster="llmctl-warm")


def test_refuses_local_storage_and_local_gpu_type():
    with pytest.raises(ValueError, match="shared storage"):
        build_rayjob(plan(RunSpec(depth=12, gpus=8)), ClusterConfig(), namespace="team")
    with pytest.raises(ValueError, match="--local"):
        build_rayjob(plan(RunSpec(depth=4, gpus=2, gpu_type="cpu", storage_root=STORAGE)), ClusterConfig(),
                     namespace="team")


def test_every_container_is_non_root_and_locked_down():
    cfg = ClusterConfig(s3_secret="llmctl-s3", s3_endpoint="http://minio:9000")
    _, rj = rayjob(26, 16, cfg)
    for tpl in schemas.pod_templates(rj):
        pod = tpl[1]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        c = pod["containers"][0]
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        # Pod Security "restricted" allows adding only NET_BIND_SERVICE; we add nothing
        assert "add" not in sc["capabilities"]
    schemas.validate(rj)


def test_ipc_lock_option_is_refused_with_the_reason():
    """IPC_LOCK did nothing for uid 1000 and Pod Security baseline/restricted reject it."""
    with pytest.raises(UsageError, match="workers.capabilities: removed: .*non-root.*memlock"):
        ClusterConfig.from_dict({"workers": {"capabilities": ["IPC_LOCK"]}})
    ClusterConfig.from_dict({"workers": {"capabilities": []}})  # the old chart's empty default still loads


def test_credentials_only_by_reference():
    _, rj = rayjob(20, 8, ClusterConfig(s3_secret="llmctl-s3", s3_endpoint="http://minio:9000"))
    for c in containers(rj):
        names = {e["name"] for e in c["env"]}
        assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
        if c["name"] == "ray-job-submitter":
            assert "envFrom" not in c  # it only talks to the Ray dashboard
        else:
            assert c["envFrom"] == [{"secretRef": {"name": "llmctl-s3"}}]
            assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"} in c["env"]
    with pytest.raises(UsageError, match="env.AWS_SECRET_ACCESS_KEY: looks like a credential"):
        ClusterConfig(env={"AWS_SECRET_ACCESS_KEY": "x"})
    with pytest.raises(UsageError, match="env.HF_TOKEN"):
        ClusterConfig(env={"HF_TOKEN": "x"})


def test_run_account_on_ray_pods_api_token_only_on_the_head():
    _, rj = rayjob(20, 8, ClusterConfig(run_service_account="llmctl-run"))
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "llmctl-run" and head["automountServiceAccountToken"] is False
    worker = workers(rj)[0]["template"]["spec"]  # the account for cloud identity (S3 via IRSA), no API token
    assert worker["serviceAccountName"] == "llmctl-run" and worker["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in rj["spec"]["submitterPodTemplate"]["spec"]
    assert rj["spec"]["submitterPodTemplate"]["spec"]["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["LLMCTL_RUN"]["value"] == rj["metadata"]["name"]
    assert env["LLMCTL_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_every_config_option_renders_a_valid_rayjob():
    cfg = ClusterConfig(
        image="registry.example.com/llmctl:1", image_pull_policy="Always", image_pull_secrets=("regcred",),
        s3_endpoint="http://minio:9000", s3_region="us-east-1", s3_secret="llmctl-s3", prices={"h100": 2.0},
        queue="h100", priority_class="llmctl-training", run_service_account="llmctl-run",
        labels={"team": "a"}, env={"NCCL_SOCKET_IFNAME": "eth0"}, read_only_root_filesystem=False,
        head_cpu="16", head_memory="64Gi", head_node_selector={"pool": "cpu"},
        head_tolerations=({"key": "dedicated", "operator": "Equal", "value": "head", "effect": "NoSchedule"},),
        gpus_per_node=4, cpu_per_gpu=20, memory_per_gpu_gi=200, worker_extra_resources={"rdma/ib": "1"},
        gpu_labels="gke", scratch_size="500Gi", tmp_size="10Gi",
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}},
        topology_spread=({"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                          "whenUnsatisfiable": "DoNotSchedule"},),
        pod_annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        extra_volumes=({"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}},),
        extra_volume_mounts=({"name": "cache", "mountPath": "/cache", "readOnly": True},),
        kuberay_version="1.6", ray_auth="token",
        backoff_limit=5, ttl_seconds_after_finished=0,
        pre_running_deadline_seconds=60, deadline_factor=3.0, deadline_slack_seconds=0)
    p = plan(RunSpec(depth=20, gpus=16, storage_root=STORAGE))
    rj = build_rayjob(p, cfg, namespace="team", extra_env={"NCCL_DEBUG": "INFO"})
    schemas.validate(rj, {"kuberay": "1.6.2"})
    (group,) = workers(rj)
    assert group["replicas"] == 4
    pod = group["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"] == {"cpu": "80", "memory": "800Gi", "nvidia.com/gpu": "4", "rdma/ib": "1",
                                        "ephemeral-storage": "510Gi"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_SOCKET_IFNAME"] == "eth0"  # --env beats the default
    assert env["TMPDIR"] == "/scratch"  # checkpoints are staged on the sized scratch volume, not /tmp
    assert env["RAY_TMPDIR"] == "/tmp"  # Ray's own files stay where tmpSize accounts for them
    assert [e["name"] for e in c["env"]].count("NCCL_DEBUG") == 1
    assert rj["spec"]["submitterPodTemplate"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    # GKE's H100 label has an equivalent (A3 Mega): an `In` expression ANDed into the configured affinity.
    assert "nodeSelector" not in pod
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (cfg_term,) = cfg.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == cfg_term["matchExpressions"] + [
        {"key": "cloud.google.com/gke-accelerator", "operator": "In",
         "values": ["nvidia-h100-80gb", "nvidia-h100-mega-80gb"]}]
    assert pod["topologySpreadConstraints"] == [dict(cfg.topology_spread[0], labelSelector={
        "matchLabels": {"llmctl.dev/run": p.name, "llmctl.dev/role": "worker"}})]
    from cli.kube.guards import DO_NOT_DISRUPT  # added to every Ray pod (tests/test_disruption.py)

    assert group["template"]["metadata"]["annotations"] == {**cfg.pod_annotations, **DO_NOT_DISRUPT}
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "500Gi"}} in pod["volumes"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}} in pod["volumes"]
    assert cfg.extra_volumes[0] in pod["volumes"] and cfg.extra_volume_mounts[0] in c["volumeMounts"]
    assert {"name": "scratch", "mountPath": "/scratch"} in c["volumeMounts"]
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in head and cfg.extra_volumes[0] in head["volumes"]
    assert rj["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert rj["spec"]["preRunningDeadlineSeconds"] == 60


@pytest.mark.parametrize("data, message", [
    ({"placement": {"topologySpreadConstraints": [{"maxSkew": 1}]}}, "placement.topologySpreadConstraints"),
    ({"placement": {"affinity": {"nodeAfinity": {}}}}, "placement.affinity"),
    ({"extraVolumeMounts": [{"name": "x", "mountPath": "/x"}]}, "'x' is not in extraVolumes"),
    ({"extraVolumes": [{"name": "scratch", "emptyDir": {}}]}, "extraVolumes.0.name: is not allowed, got 'scratch' (A volume name; tmp and scratch are taken by llmctl's own volumes.)"),
    ({"workers": {"scratchSize": "big"}}, "workers.scratchSize"),
    ({"workers": {"gpuLabels": "aws"}}, "workers.gpuLabels: must be one of gpu-operator, gke"),
    ({"kuberay": {"version": 1.6}}, "kuberay.version: must be of type string, got 1.6 (The installed KubeRay release, X.Y or X.Y.Z, quoted"),
    ({"kuberay": {"version": "latest"}}, "kuberay.version: must match"),
    ({"rayAuth": "on"}, "rayAuth: must be one of token, disabled, got 'on'"),
])
def test_placement_and_version_keys_name_the_bad_key(data, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        ClusterConfig.from_dict(data)


def test_gpu_label_choice_sets_every_default_selector():
    for choice, label in (("gpu-operator", "nvidia.com/gpu.product"), ("gke", "cloud.google.com/gke-accelerator")):
        cfg, _ = ClusterConfig.from_dict({"workers": {"gpuLabels": choice}})
        assert {tuple(sel) for sel in cfg.gpu_node_selectors.values()} == {(label,)}
    cfg, _ = ClusterConfig.from_dict({"workers": {"gpuLabels": "gke", "nodeSelectors": {"h100": {"pool": "x"}}}})
    assert cfg.gpu_node_selectors == {"h100": {"pool": "x"}}  # explicit selectors win


# ---------------------------------------------------------------------------------------------
# The supported version matrix: the RayJob holds exactly what each KubeRay release serves


@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
@pytest.mark.parametrize("queue", [None, "h100"])
def test_rayjob_validates_strictly_against_every_supported_kuberay(release, queue):
    major_minor = ".".join(release.split(".")[:2])
    for cfg in (ClusterConfig(kuberay_version=release, queue=queue),
                ClusterConfig(kuberay_version=major_minor, queue=queue, run_service_account="llmctl-run",
                              s3_secret="s3", topology_spread=({"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                                "whenUnsatisfiable": "DoNotSchedule"},))):
        _, rj = rayjob(26, 16, cfg)
        schemas.validate(rj, {"kuberay": release})
    version = tuple(map(int, release.split(".")))
    assert ("preRunningDeadlineSeconds" in rj["spec"]) == (version >= (1, 6, 0))
    _, rj = rayjob(26, 16, ClusterConfig(kuberay_version=release))
    assert ("authOptions" in rj["spec"]["rayClusterSpec"]) == (version >= (1, 5, 1))
    p = plan(RunSpec(depth=20, gpus=8, storage_root=STORAGE))
    warm = build_rayjob(p, ClusterConfig(kuberay_version=release), namespace="team", ray_cluster="llmctl-warm")
    schemas.validate(warm, {"kuberay": release})


def test_the_newest_kuberay_fields_are_what_older_releases_reject():
    """The 1.7 rendering sent to a 1.5 server is a strict-decoding error, not a prune."""
    _, rj = rayjob(26, 8)  # no version known: the newest supported
    schemas.validate(rj, {"kuberay": "1.7.0"})
    with pytest.raises(schemas.Invalid, match="preRunningDeadlineSeconds"):
        schemas.validate(rj, {"kuberay": "1.5.2"})
    unknown = schemas.unknown_fields(rj, schemas.crd_schema("ray.io", "RayJob", "v1", "1.4.2"))
    assert sorted(unknown) == ["spec.deletionStrategy", "spec.preRunningDeadlineSeconds",
                               "spec.rayClusterSpec.authOptions"]


def test_versions_outside_the_matrix_are_refused():
    for bad in ("1.2", "1.8.0", "2.0"):
        with pytest.raises(ValueError, match="KubeRay .* is not supported: llmctl renders RayJobs for KubeRay 1.3 to 1.7"):
            rayjob(26, 8, ClusterConfig(kuberay_version=bad))


def test_ray_auth_only_where_kuberay_and_ray_support_it():
    _, rj = rayjob(26, 8, ClusterConfig(ray_auth="disabled"))
    assert "authOptions" not in rj["spec"]["rayClusterSpec"]
    _, rj = rayjob(26, 8, ClusterConfig(ray_version="2.51.0"))
    assert "authOptions" not in rj["spec"]["rayClusterSpec"]  # KubeRay refuses token mode below Ray 2.52


@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
def test_the_installed_release_is_read_off_its_crd(release):
    from cli.kube.versions import kuberay_release_from_crd

    crd = schemas.crd_object("ray.io", "RayJob", release)
    found = kuberay_release_from_crd(crd)
    expected = tuple(map(int, release.split(".")))[:2]
    assert found[:2] == expected
    # rendering for the inferred release is valid on that release
    _, rj = rayjob(26, 8, ClusterConfig(kuberay_version=".".join(map(str, found))))
    schemas.validate(rj, {"kuberay": release})


def _head_container(rj):
    return rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


MUTATIONS = {
    "typo in a container field": (lambda rj: _head_container(rj).update(imagePullPolcy="Always"), "imagePullPolcy"),
    "typo in the RayJob spec": (lambda rj: rj["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    "typo in metadata": (lambda rj: rj["metadata"].update(label={}), "'label' was unexpected"),
    "replicas as a string": (lambda rj: workers(rj)[0].update(replicas="2"), "is not of type 'integer'"),
    "bad quantity": (lambda rj: _head_container(rj)["resources"]["limits"].update(cpu={"n": 8}), "cpu"),
    "suspend without shutdown": (lambda rj: rj["spec"].update(suspend=True, shutdownAfterJobFinishes=False),
                                 "suspend requires shutdownAfterJobFinishes"),
    "name too long for KubeRay": (lambda rj: rj["metadata"].update(name="r" * 48), "at most 47 characters"),
    "submitter that restarts": (lambda rj: rj["spec"]["submitterPodTemplate"]["spec"].update(restartPolicy="OnFailure"),
                                "restartPolicy"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_validation_catches_what_the_api_server_or_kuberay_would_reject(mutation):
    _, rj = rayjob(20, 16)
    schemas.validate(rj)
    change, message = MUTATIONS[mutation]
    bad = copy.deepcopy(rj)
    change(bad)
    with pytest.raises(schemas.Invalid, match=re.escape(message)):
        schemas.validate(bad)


# ---------------------------------------------------------------------------------------------
# The plan's trip: KubeRay's bash -> ray job submit's shlex.join -> the job supervisor's sh -c


def _argv_after_shell(shell: str, words: str) -> list[str]:
    out = subprocess.run([shell, "-c", f"printf '%s\\0' {words}"], check=True, capture_output=True).stdout
    return out.decode().split("\0")[:-1]


def test_plan_json_survives_the_three_shells_exactly():
    # Quotes, dollars, backquotes, backslashes and globs in free-text fields of the plan.
    spec = RunSpec(depth=12, gpus=8, storage_root=STORAGE, image="it's $HOME `id` \\n *[x]? \"q\"")
    p = plan(spec)
    ep = entrypoint(p)
    assert ep.startswith("python -m trainer.launch --plan-json '")
    argv = _argv_after_shell("bash", ep)  # KubeRay: `... ray job submit ... -- <entrypoint> ;` under bash
    assert argv[:4] == ["python", "-m", "trainer.launch", "--plan-json"] and len(argv) == 5
    joined = shlex.join(argv)  # ray job submit (non-Windows) re-quotes the argv
    argv2 = _argv_after_shell("sh", joined)  # the job supervisor: Popen(entrypoint, shell=True)
    assert argv2 == argv
    received = RunPlan.from_json(argv2[4])  # what trainer.launch --plan-json does
    assert received == p and received.spec.image == spec.image


# ---------------------------------------------------------------------------------------------
# Cluster config: the ConfigMap shape


def test_cluster_config_round_trips_and_warns_on_unknown_keys():
    cfg = ClusterConfig(queue="h100", prices={"h100": 2.49}, env={"NCCL_IB_HCA": "mlx5"})
    back, warnings = ClusterConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert back == cfg and warnings == []
    data = cfg.to_dict() | {"futureKey": 1}
    data["workers"] = dict(data["workers"], futureWorkerKey=2)
    _, warnings = ClusterConfig.from_dict(data)
    assert sorted(warnings) == ["config: ignoring unknown key futureKey (newer chart than this llmctl?)",
                        "config: ignoring unknown key workers.futureWorkerKey (newer chart than this llmctl?)"]


@pytest.mark.parametrize("data, message", [
    ({"storageRoot": "bucket/prefix"}, "storageRoot: must match ^[a-z][a-z0-9+.-]*://.+, got 'bucket/prefix' (Shared storage root URL.)"),
    ({"workers": {"gpusPerNode": 0}}, "workers.gpusPerNode: must be >= 1, got 0"),
    ({"workers": {"gpusPerNode": "8"}}, "workers.gpusPerNode: must be of type integer, got '8'"),
    ({"head": {"memory": "lots"}}, "head.memory: must match"),
    ({"prices": {"h100": -1}}, "prices.h100: must be >= 0, got -1"),
    ({"queue": "H100 queue"}, "queue: must match"),
    ({"lifecycle": {"deadlineFactor": 0.5}}, "lifecycle.deadlineFactor: must be >= 1, got 0.5"),
    ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy: must be one of Always, IfNotPresent, Never"),
    ({"env": ["A=1"]}, "env: must be of type object"),
    ({"workers": {"tolerations": [{"key": "a", "effct": "NoSchedule"}]}}, "workers.tolerations.0: Additional properties are not allowed ('effct' was unexpected)"),
])
def test_cluster_config_names_the_bad_key(data, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        ClusterConfig.from_dict(data)


def test_configmap_without_config_key_is_an_actionable_error():
    from cli.main import CLIError

    with pytest.raises(CLIError, match="has no config.yaml key; reinstall the chart"):
        config_from_configmap({"data": {}})


# ---------------------------------------------------------------------------------------------
# Golden examples: `llmctl submit --dry-run` output, regenerated and compared


ANY_KUBERAY = "k8s/examples/any-kuberay/kuberay-1.3.cluster-config.yaml"
GOLDEN = {
    "d12-1xh100.yaml": ["--depth", "12", "--gpus", "1"],
    "d20-8xh100.yaml": ["--depth", "20", "--gpus", "8"],
    "d26-8xh100.yaml": ["--depth", "26", "--gpus", "8"],
    "d32-16xh100-kueue.yaml": ["--depth", "32", "--gpus", "16", "--queue", "h100"],
    # rendered for KubeRay 1.3: valid on every supported release (kubectl apply validates strictly)
    "any-kuberay/d26-8xh100.yaml": ["--depth", "26", "--gpus", "8", "--cluster-config", ANY_KUBERAY],
    "any-kuberay/d32-16xh100-kueue.yaml": ["--depth", "32", "--gpus", "16", "--queue", "h100",
                                           "--cluster-config", ANY_KUBERAY],
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_examples(name, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))  # no cluster, no kubeconfig
    monkeypatch.chdir(ROOT)  # --cluster-config paths are relative to the repository
    argv = ["submit", *GOLDEN[name], "--dry-run", "-o", "yaml", "-n", "llmctl"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    portable = "--cluster-config" in argv
    header = (f"# Generated by `llmctl {' '.join(argv)}`; tests/cli/kube/test_rayjob.py regenerates it and compares.\n"
              f"# Do not edit: after a deliberate change, LLMCTL_REGEN=1 pytest tests/cli/kube/test_rayjob.py -k golden\n")
    if portable:
        header += "# Rendered for KubeRay 1.3, so valid on every supported release (1.3 to 1.7).\n"
    else:
        header += ("# For KubeRay >= 1.6 (the newest supported release's fields); any-kuberay/ has examples for\n"
                   "# 1.3 to 1.7, and `llmctl submit` renders for the release it finds installed.\n")
    text = header + out
    path = EXAMPLES / name
    if os.environ.get("LLMCTL_REGEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: LLMCTL_REGEN=1 pytest tests/cli/kube/test_rayjob.py -k golden"
    assert path.read_text() == text, f"{path} drifted from `llmctl submit --dry-run`; review, then regenerate"
    (rj,) = schemas.load_yaml_stream(text)
    for release in schemas.KUBERAY_RELEASES:  # strictly, as `kubectl apply` (--validate=strict) judges
        if portable or tuple(map(int, release.split("."))) >= (1, 6, 0):
            schemas.validate(rj, {"kuberay": release})
        else:  # exactly the version-gated fields, which any-kuberay/ leaves out
            unknown = schemas.unknown_fields(rj, schemas.crd_schema("ray.io", "RayJob", "v1", release))
            gated = ("spec.deletionStrategy", "spec.preRunningDeadlineSeconds", "spec.rayClusterSpec.authOptions")
            assert all(u.startswith(gated) for u in unknown), unknown
    pods, per_pod = worker_layout(int(GOLDEN[name][3]))
    assert workers(rj)[0]["replicas"] == pods


def test_dry_run_renders_for_the_kuberay_version_given(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert main(["submit", "--depth", "20", "--gpus", "8", "--dry-run", "-o", "yaml", "--kuberay-version", "1.5"]) == 0
    (rj,) = schemas.load_yaml_stream(capsys.readouterr().out)
    assert "preRunningDeadlineSeconds" not in rj["spec"]
    schemas.validate(rj, {"kuberay": "1.5.2"})


# ---------------------------------------------------------------------------------------------
# Elastic runs, teardown, spot, pod security details


def _head_spec(rj):
    return rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def test_elastic_run_gives_only_the_autoscaler_the_api_token_under_a_restricted_context():
    """Defect 2: KubeRay's injected autoscaler container needs the API token and its own securityContext."""
    _, rj = rayjob(12, 16, min_gpus=8)
    cluster = rj["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    opts = cluster["autoscalerOptions"]
    assert opts["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                       "capabilities": {"drop": ["ALL"]}}
    token = next(m for m in opts["volumeMounts"] if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount")
    head = _head_spec(rj)
    assert head["automountServiceAccountToken"] is False  # the Ray head container (the driver) gets no token
    assert any(v["name"] == token["name"] and "projected" in v for v in head["volumes"])
    for release in schemas.KUBERAY_RELEASES:
        _, rj = rayjob(12, 16, ClusterConfig(kuberay_version=release), min_gpus=8)
        schemas.validate(rj, {"kuberay": release})
    _, fixed = rayjob(12, 16)
    assert "autoscalerOptions" not in fixed["spec"]["rayClusterSpec"]


def test_elastic_run_on_a_queue_needs_kueue_workload_slicing():
    """Defect 2: Kueue's RayJob webhook rejects autoscaling unless the job is a sliced (elastic) workload."""
    with pytest.raises(ValueError, match="ElasticJobsViaWorkloadSlices.*kueue.elasticJobs"):
        rayjob(12, 16, ClusterConfig(queue="lq"), min_gpus=8)
    _, rj = rayjob(12, 16, ClusterConfig(queue="lq", kueue_elastic_jobs=True), min_gpus=8)
    assert rj["metadata"]["annotations"]["kueue.x-k8s.io/elastic-job"] == "true"
    _, fixed = rayjob(12, 16, ClusterConfig(queue="lq", kueue_elastic_jobs=True))
    assert "kueue.x-k8s.io/elastic-job" not in fixed["metadata"]["annotations"]


@pytest.mark.parametrize("release, queue, min_gpus, expect", [
    ("1.3.2", None, None, "ttl"), ("1.5.2", None, None, "ttl"),  # deletionRules' gate is off before 1.6
    ("1.6.2", "lq", None, "ttl"),  # Kueue needs shutdownAfterJobFinishes, which excludes deletionRules
    ("1.6.2", None, None, "rules"), ("1.7.0", None, None, "rules"),
    ("1.7.0", None, 8, "rules-elastic"),  # KubeRay refuses DeleteWorkers with autoscaling
])
def test_finished_runs_release_their_gpus(release, queue, min_gpus, expect):
    """Defect 6: no ten idle GPU-minutes per run while Kueue already handed the quota on."""
    from cli.kube.rayjob import teardown_seconds

    cfg = ClusterConfig(kuberay_version=release, queue=queue, kueue_elastic_jobs=True)
    p, rj = rayjob(12, 16, cfg, min_gpus=min_gpus)
    schemas.validate(rj, {"kuberay": release})
    spec = rj["spec"]
    if expect == "ttl":
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 60
        assert "deletionStrategy" not in spec
        assert teardown_seconds(cfg, p) == 60
        return
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    rules = spec["deletionStrategy"]["deletionRules"]
    workers = [r for r in rules if r["policy"] == "DeleteWorkers"]
    clusters = {tuple(r["condition"].items())[0]: r["condition"]["ttlSeconds"] for r in rules
                if r["policy"] == "DeleteCluster"}
    assert set(clusters) == {("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")}
    if expect == "rules":
        assert len(workers) == 3 and all(r["condition"]["ttlSeconds"] == 0 for r in workers)
        assert set(clusters.values()) == {600} and teardown_seconds(cfg, p) == 0
    else:
        assert workers == [] and set(clusters.values()) == {60} and teardown_seconds(cfg, p) == 60


def test_spot_grace_is_the_providers_notice_and_the_head_stays_off_spot():
    """Defect 9: GKE gives a spot node's pods ~15 s, not the ~95 s an emergency save of a d26 needs."""
    from trainer.preempt import grace_seconds

    p, rj = rayjob(26, 8, spot=True)
    assert grace_seconds(p) > 15
    for g in [rj["spec"]["rayClusterSpec"]["headGroupSpec"], *workers(rj)]:
        pod = g["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 15
        assert "lifecycle" not in pod["containers"][0]  # no preStop save that cannot finish
    assert "15s" in rj["metadata"]["annotations"]["llmctl.dev/emergency-save"]
    # EKS gives ~110 s: the save fits, the preStop hook stays.
    _, eks = rayjob(26, 8, ClusterConfig(spot_provider="eks"), spot=True)
    assert workers(eks)[0]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]
    # On-demand: sized from the estimate as before.
    _, od = rayjob(26, 8)
    assert _head_spec(od)["terminationGracePeriodSeconds"] == grace_seconds(p)
    for r in (rj, eks, od):
        terms = _head_spec(r)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        avoided = {(e["key"], e["values"][0]) for t in terms for e in t["matchExpressions"] if e["operator"] == "NotIn"}
        assert {("cloud.google.com/gke-spot", "true"), ("eks.amazonaws.com/capacityType", "SPOT"),
                ("kubernetes.azure.com/scalesetpriority", "spot")} <= avoided
        assert "affinity" not in r["spec"]["submitterPodTemplate"]["spec"]


def test_pods_change_volume_ownership_only_on_mismatch():
    """Defect 10: fsGroupChangePolicy OnRootMismatch (no recursive chown of a large dataset PVC per start)."""
    _, rj = rayjob(12, 8)
    pods = [_head_spec(rj), *(g["template"]["spec"] for g in workers(rj)), rj["spec"]["submitterPodTemplate"]["spec"]]
    assert all(p["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch" for p in pods)


def test_tracking_credentials_by_secret_key_ref_strictly_valid_for_every_release():
    """`--track` on a cluster (cli/kube/pods.py tracking_env): the head and the workers get the tracker's URI and
    its credentials from the config's trackingSecret by reference (optional keys), the submitter nothing; the
    RayJob stays strictly valid for every supported KubeRay release."""
    cfg = ClusterConfig(tracking_secret="trackers", s3_secret="llmctl-s3")
    p, rj = rayjob(20, 16, cfg, track=("mlflow=https://mlflow.example:5000", "wandb"))
    for c in containers(rj):
        env = {e["name"]: e for e in c["env"]}
        if c["name"] == "ray-job-submitter":
            assert not set(env) & {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY"}
            continue
        assert env["MLFLOW_TRACKING_URI"] == {"name": "MLFLOW_TRACKING_URI", "value": "https://mlflow.example:5000"}
        refs = {k: v["valueFrom"]["secretKeyRef"] for k, v in env.items() if "secretKeyRef" in v.get("valueFrom", {})}
        assert refs == {k: {"name": "trackers", "key": k, "optional": True} for k in
                        ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                         "WANDB_API_KEY")}
    for release in schemas.KUBERAY_RELEASES:
        major_minor = ".".join(release.split(".")[:2])
        _, rendered = rayjob(20, 16, ClusterConfig(tracking_secret="trackers", kuberay_version=major_minor),
                             track=("mlflow=https://mlflow.example:5000", "wandb"))
        schemas.validate(rendered, {"kuberay": release})
    _, bare = rayjob(20, 16, ClusterConfig(tracking_secret="trackers"))  # no --track: nothing of it
    assert "MLFLOW" not in yaml.safe_dump(bare) and "WANDB" not in yaml.safe_dump(bare)

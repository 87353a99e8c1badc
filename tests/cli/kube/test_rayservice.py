"""cli/kube/rayservice.py and `llmctl serve` on a cluster: the RayService, valid under every KubeRay release's CRD.

The run lives in a real S3 endpoint (moto on loopback, tests/conftest.py): its plan.json and a whole
checkpoint, which the CLI reads before rendering anything. Create and delete go to the API stand-in
tests/kube_fake.py through the real kubernetes client.
Run: .venv/bin/pytest tests/cli/kube/test_rayservice.py
"""

from __future__ import annotations

import importlib
import json

import pytest
import yaml

from cli.kube.config import IMAGE, RAY_VERSION, ClusterConfig
from cli.main import main
from cli.kube.rayservice import build_rayservice
from tests import schemas
from tests.kube_fake import FakeKube
from trainer.plan import RunSpec, plan

SERVICES = "/apis/ray.io/v1/namespaces/team/rayservices"


@pytest.fixture(scope="module")
def s3_run(s3_server):
    """A run in S3 the way training leaves it: plan.json and one whole SFT checkpoint (step 30)."""
    from trainer.checkpoint import Meta, dir_name
    from trainer.launch import write_plan

    bucket = s3_server.bucket("serve")
    p = plan(RunSpec(depth=12, gpus=8, storage_root=bucket, name="chatbot"))
    opts = s3_server.storage_options
    write_plan(p, opts)
    fs = s3_server.fs()
    ckpt = f"{p.urls['run'][len('s3://'):]}/sft/{dir_name('sft', 30)}"
    fs.pipe_file(f"{ckpt}/model.pt", b"weights")
    fs.pipe_file(f"{ckpt}/meta.json", Meta(step=30, stage="sft", world_size=1, run=p.name, loop_state={},
                                           files=("model.pt",)).to_json().encode())
    return bucket, json.loads(p.to_json())


@pytest.fixture
def env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.delenv("KUBECONFIG", raising=False)


def containers(svc):
    cluster = svc["spec"]["rayClusterConfig"]
    yield cluster["headGroupSpec"]["template"]["spec"]
    for g in cluster["workerGroupSpecs"]:
        yield g["template"]["spec"]


CONFIGS = {
    "gpu": dict(),
    "gpu-2x2": dict(replicas=2, gpus_per_replica=2),
    "cpu": dict(gpus_per_replica=0, replicas=3),
    "locked-down-cluster": dict(cfg=ClusterConfig(s3_secret="llmctl-s3", s3_endpoint="http://minio:9000",
                                                  run_service_account="llmctl-run", priority_class="serve",
                                                  image_pull_secrets=("regcred",), labels={"team": "ml"})),
    # --engine vllm (tests/cli/kube/test_vllm.py): Ray Serve LLM on the run's Hugging Face export
    "vllm-gpu": dict(engine="vllm"),
    "vllm-2x2-h200": dict(engine="vllm", replicas=2, gpus_per_replica=2, gpu_type="h200"),
}


@pytest.mark.parametrize("version", schemas.KUBERAY_RELEASES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_config_is_valid_under_every_kuberay_version(s3_run, version, config):
    _, run = s3_run
    kw = dict(CONFIGS[config])
    cfg = kw.pop("cfg", ClusterConfig()).replace(kuberay_version=version)
    step = None if kw.get("engine") == "vllm" else 30  # an export is of one checkpoint: no --step
    svc = build_rayservice(run, cfg, namespace="team", step=step, **kw)
    schemas.validate(svc, {"kuberay": version})
    # Ray token authentication as for runs: where KubeRay serves authOptions (1.5.1+).
    auth = svc["spec"]["rayClusterConfig"].get("authOptions")
    assert auth == ({"mode": "token"} if version >= "1.5.2" else None)


def test_the_kuberay_versions_are_the_supported_range():
    assert schemas.KUBERAY_RELEASES[0] == "1.3.2" and schemas.KUBERAY_RELEASES[-1] == "1.7.0"
    assert len(schemas.KUBERAY_RELEASES) == 5
    assert all(schemas.crd_schema("ray.io", "RayService", "v1", r) for r in schemas.KUBERAY_RELEASES)


def test_the_validator_refuses_unknown_fields_and_long_names(s3_run):
    _, run = s3_run
    svc = build_rayservice(run, ClusterConfig(kuberay_version="1.3"), namespace="team")
    bad = json.loads(json.dumps(svc))
    bad["spec"]["serveConfig"] = "x"  # a typo of serveConfigV2: the API server would drop it silently
    with pytest.raises(AssertionError, match="serveConfig"):
        schemas.validate(bad, {"kuberay": "1.7.0"})
    bad = json.loads(json.dumps(svc))
    bad["metadata"]["name"] = "x" * 48
    with pytest.raises(AssertionError, match="47"):
        schemas.validate(bad, {"kuberay": "1.3.2"})


def test_gpu_replicas_take_whole_gpus_on_the_gpu_type_and_the_head_serves_nothing(s3_run):
    _, run = s3_run
    svc = build_rayservice(run, ClusterConfig(), namespace="team", replicas=2, gpus_per_replica=2, step=30)
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0", "num-gpus": "0"}
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["requests"] == res["limits"] == {"cpu": "24", "memory": "250Gi", "nvidia.com/gpu": "2"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports == {"serve": 8000, "llm-serve": 9500, "metrics": 8080}
    head_ports = {p["name"]: p["containerPort"] for p in
                  cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["serve"] == 8000 and head_ports["dashboard"] == 8265
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["route_prefix"] == "/" and serve["http_options"]["port"] == 8000
    assert app["args"] == {"run_url": run["urls"]["run"], "stage": "sft", "replicas": 2, "gpus_per_replica": 2,
                           "cpus_per_replica": 24, "max_batch": 16, "max_queue": 64, "metrics_port": 9500,
                           "step": 30}
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))  # the image's code has the builder


def test_cpu_replicas_have_no_gpu_and_no_gpu_scheduling(s3_run):
    _, run = s3_run
    svc = build_rayservice(run, ClusterConfig(), namespace="team", replicas=3, gpus_per_replica=0)
    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["gpus_per_replica"] == 0


def test_pods_meet_pod_security_restricted_and_share_the_rayjob_config(s3_run):
    _, run = s3_run
    cfg = CONFIGS["locked-down-cluster"]["cfg"]
    svc = build_rayservice(run, cfg, namespace="team")
    assert svc["spec"]["rayClusterConfig"]["rayVersion"] == RAY_VERSION
    for pod in containers(svc):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["serviceAccountName"] == "llmctl-run" and pod["automountServiceAccountToken"] is False
        assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["priorityClassName"] == "serve"
        (c,) = pod["containers"]
        assert c["image"] == IMAGE
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["readOnlyRootFilesystem"] is True and {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert c["envFrom"] == [{"secretRef": {"name": "llmctl-s3"}}]  # credentials by reference only
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["LLMCTL_RUN"] == "chatbot"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    labels = svc["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "llmctl" and labels["llmctl.dev/run"] == "chatbot"
    assert labels["team"] == "ml" and svc["metadata"]["annotations"]["llmctl.dev/storage"] == run["urls"]["run"]


def test_refusals_name_the_problem(s3_run):
    _, run = s3_run
    for kw, match in [(dict(replicas=0), "replicas"), (dict(gpus_per_replica=9), "0..8"),
                      (dict(gpu_type="tpu"), "gpu-type"), (dict(stage="rl"), "no rl stage")]:
        with pytest.raises(ValueError, match=match):
            build_rayservice(run, ClusterConfig(), namespace="team", **kw)
    local = dict(run, urls=dict(run["urls"], run="file:///tmp/runs/chatbot"))
    with pytest.raises(ValueError, match="shared storage"):
        build_rayservice(local, ClusterConfig(), namespace="team")


# ---------------------------------------------------------------------------------------------
# The CLI


def test_dry_run_prints_a_valid_rayservice_and_sends_nothing(s3_run, env, capsys):
    bucket, run = s3_run
    rc = main(["serve", "chatbot", "--storage", bucket, "--replicas", "2", "--gpus-per-replica", "1",
               "--step", "30", "--dry-run", "-o", "yaml", "-n", "team"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (svc,) = [d for d in yaml.safe_load_all(out) if d]
    for version in schemas.KUBERAY_RELEASES[2:]:  # rendered for the newest release: token auth (1.5.1+)
        schemas.validate(svc, {"kuberay": version})
    assert svc["metadata"]["namespace"] == "team" and "dry run" in err
    assert svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 2


@pytest.mark.parametrize("argv, message", [
    (["nope"], "run 'nope' not found"),
    (["chatbot", "--step", "7"], "no whole sft checkpoint at step 7"),
    (["chatbot", "--stage", "pretrain"], "no whole pretrain checkpoint"),
    (["chatbot", "--replicas", "0"], "--replicas must be >= 1"),
    (["chatbot", "--gpus-per-replica", "16"], "--gpus-per-replica must be in 0..8"),
])
def test_bad_input_is_one_line_and_exit_2(s3_run, env, capsys, argv, message):
    bucket, _ = s3_run
    rc = main(["serve", *argv, "--storage", bucket, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_local_storage_is_refused_for_the_cluster(tmp_path, env, capsys):
    from tests.serve_app import tiny_run

    tiny_run(tmp_path)
    rc = main(["serve", "tiny", "--storage", f"file://{tmp_path}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "shared storage" in err and "--local" in err


def test_create_then_delete_on_the_cluster(s3_run, env, capsys, tmp_path, monkeypatch):
    bucket, _ = s3_run
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"storageRoot": bucket, "s3": {"credentialsSecret": "llmctl-s3"}}))
    with FakeKube() as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kc")))
        rc = main(["serve", "chatbot", "--cluster-config", str(cfg), "--gpus-per-replica", "0", "--yes"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert out.strip() == "rayservice.ray.io/chatbot created in namespace team"
        assert "chatbot-serve-svc" in err
        (req,) = kube.requests
        assert req.line == f"POST {SERVICES}"
        schemas.validate(req.body, {"kuberay": "1.7.0"})

        # status and list show the service next to runs
        kube.requests.clear()
        assert main(["list"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["NAME", "STATE", "DEPTH", "GPUS", "AGE", "ESTIMATE"]
        assert out[1].split()[:4] == ["chatbot", "starting", "d12", "0xcpu"]
        assert main(["status", "chatbot"]) == 0
        out = capsys.readouterr().out
        assert "starting: creating the Ray cluster" in out and "1 x CPU" in out and "sft checkpoint" in out
        svc = kube.objects[("rayservices", "team", "chatbot")]
        svc["status"] = {"conditions": [{"type": "Ready", "status": "True"}],
                         "activeServiceStatus": {"applicationStatuses": {"llmctl": {"status": "RUNNING"}}}}
        assert main(["status", "chatbot", "-o", "json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert s["kind"] == "service" and s["state"] == "serving" and "chatbot-serve-svc port 8000" in s["detail"]
        svc["status"] = {"activeServiceStatus": {"applicationStatuses": {"llmctl": {
            "status": "DEPLOY_FAILED", "message": "no whole sft checkpoint"}}}}
        assert main(["status", "chatbot"]) == 0
        assert "failed: Serve application DEPLOY_FAILED: no whole sft checkpoint" in capsys.readouterr().out
        assert main(["status", "nothing"]) == 1
        assert "no rayjob 'nothing' in namespace team" in capsys.readouterr().err
        kube.requests.clear()

        rc = main(["serve", "chatbot", "--delete", "--yes"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert out.strip() == "rayservice.ray.io/chatbot deleted in namespace team"
        assert [r.line for r in kube.requests] == [f"GET {SERVICES}/chatbot", f"DELETE {SERVICES}/chatbot"]

        rc = main(["serve", "chatbot", "--delete", "--yes"])
        assert rc == 1 and "chatbot" in capsys.readouterr().err  # gone: one line, no traceback


def test_delete_off_a_terminal_needs_yes(capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc = main(["serve", "chatbot", "--delete"])
    assert rc == 2 and "--yes" in capsys.readouterr().err


def test_service_pods_get_placement_volumes_and_access_like_runs(s3_run, monkeypatch):
    """Affinity and extra volumes on every serve pod (shared pod building), the
    head kept off spot nodes, volume ownership changed only on mismatch, A3 Mega nodes matched, and the Serve
    app's Host and API-key checks passed through where configured."""
    _, run = s3_run
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"]}]}]}}}
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    cfg = ClusterConfig(affinity=affinity, gpu_labels="gke",
                        extra_volumes=({"name": "cache", "emptyDir": {}},),
                        extra_volume_mounts=({"name": "cache", "mountPath": "/cache"},),
                        serve_allowed_hosts=("chat.example.com",), serve_api_key_sha256=digest)
    svc = build_rayservice(run, cfg, namespace="team", step=30)
    head, worker = containers(svc)
    for pod in (head, worker):
        assert {"name": "cache", "emptyDir": {}} in pod["volumes"]
        assert {"name": "cache", "mountPath": "/cache"} in pod["containers"][0]["volumeMounts"]
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert term["matchExpressions"][0]["key"] == "topology.kubernetes.io/zone"
    head_keys = {e["key"] for e in head["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"]}
    assert {"cloud.google.com/gke-spot", "eks.amazonaws.com/capacityType",
            "kubernetes.azure.com/scalesetpriority"} <= head_keys
    exprs = worker["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "cloud.google.com/gke-accelerator", "operator": "In",
            "values": ["nvidia-h100-80gb", "nvidia-h100-mega-80gb"]} in exprs
    assert "cloud.google.com/gke-accelerator" not in worker.get("nodeSelector", {})
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["allowed_hosts"] == ["chat.example.com"] and args["api_key_sha256"] == digest
    # trainer.serve.app:build_app accepts exactly these keys
    from trainer.serve.app import build_app  # noqa: F401 - the keys it knows are listed in its docstring
    import inspect
    src = inspect.getsource(build_app)
    assert all(f'"{k}"' in src for k in args)
    # The key given at `llmctl serve` (LLMCTL_SERVE_API_KEY) replaces the config's digest; the key never leaves.
    svc = build_rayservice(run, cfg, namespace="team", step=30, api_key_sha256="a" * 64)
    assert yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["api_key_sha256"] == "a" * 64

"""`llmctl serve RUN --engine vllm`: a RayService that serves the run's Hugging Face export with Ray Serve LLM (vLLM).

The runs live in a real S3 endpoint (moto on loopback, tests/conftest.py): plan.json and, for one of them, an export
at trainer/plan/urls.py `hf_export_url` (a config.json and a weights file; what the CLI checks before rendering).
The RayService is validated strictly against every supported KubeRay release's CRD, and its serveConfigV2's
`llm_configs` by Ray Serve LLM's own pydantic `LLMConfig`. That model is imported from
ray.llm._internal.serve.core.configs.llm_config: the public `ray.serve.llm` refuses to import without vLLM or
SGLang ("Neither vLLM nor SGLang is installed"), neither of which is installed here (vLLM is CUDA-built on PyPI;
docs/serving.md, "Serving with vLLM", says what was tried).
Run: .venv/bin/pytest tests/cli/kube/test_vllm.py
"""

from __future__ import annotations

import json

import pytest
import yaml

from cli.kube.config import RAY_VERSION, ClusterConfig, load_config_file
from cli.kube.rayservice import build_rayservice, describe_service, service_status_lines, service_summary
from cli.main import main
from tests import schemas
from trainer.plan import RunSpec, plan
from trainer.plan.urls import hf_export_url

EXPORT_CONFIG = {"architectures": ["LlmctlForCausalLM"], "model_type": "llmctl",
                 "auto_map": {"AutoConfig": "modeling_llmctl.LlmctlConfig",
                              "AutoModelForCausalLM": "modeling_llmctl.LlmctlForCausalLM"}}


@pytest.fixture(scope="module")
def runs(s3_server):
    """Three runs in one bucket: `chatbot` with an SFT export, `bare` without one, `broken` whose export's
    config.json is not an object."""
    from trainer.launch import write_plan

    bucket = s3_server.bucket("vllm")
    fs, out = s3_server.fs(), {}
    for name in ("chatbot", "bare", "broken"):
        p = plan(RunSpec(depth=12, gpus=8, storage_root=bucket, name=name))
        write_plan(p, s3_server.storage_options)
        out[name] = json.loads(p.to_json())
    export = hf_export_url(out["chatbot"]["urls"]["run"], "sft")[len("s3://"):]
    fs.pipe_file(f"{export}/config.json", json.dumps(EXPORT_CONFIG).encode())
    fs.pipe_file(f"{export}/model.safetensors", b"weights")
    broken = hf_export_url(out["broken"]["urls"]["run"], "sft")[len("s3://"):]
    fs.pipe_file(f"{broken}/config.json", b"[1, 2]")
    return bucket, out


@pytest.fixture
def env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("LLMCTL_SERVE_API_KEY", raising=False)


def serve_app(svc: dict) -> dict:
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    return app


def pod_specs(svc):
    cluster = svc["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


LOCKED_DOWN = ClusterConfig(s3_secret="llmctl-s3", s3_endpoint="http://minio:9000", run_service_account="llmctl-run",
                            image_pull_secrets=("regcred",), labels={"team": "ml"})
# Validity under every KubeRay release: test_rayservice.py's CONFIGS hold vLLM services too ("vllm-..." ids).


def test_vllm_llm_config_is_accepted_by_ray_serve_llm_and_names_the_export(runs):
    from pydantic import ValidationError
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    _, run = runs
    chatbot = run["chatbot"]
    svc = build_rayservice(chatbot, ClusterConfig(), namespace="team", engine="vllm", replicas=3,
                           gpus_per_replica=2, max_batch=32, max_queue=8)
    app = serve_app(svc)
    assert app["name"] == "llmctl" and app["route_prefix"] == "/"  # describe_service reads the app by this name
    (raw,) = app["args"]["llm_configs"]
    llm = LLMConfig(**raw)
    export = f"{chatbot['urls']['run']}/export/hf-sft"
    assert llm.model_id == "chatbot"  # what /v1/models lists, as with our engine
    assert llm.model_loading_config.model_source.bucket_uri == export == hf_export_url(chatbot["urls"]["run"])
    assert llm.model_loading_config.model_source.storage_type == "s3"
    assert llm.engine_kwargs == {"trust_remote_code": True, "dtype": "bfloat16", "max_model_len": 2048,
                                 "tensor_parallel_size": 2, "max_num_seqs": 32}
    assert chatbot["arch"]["seq_len"] == 2048  # max_model_len is the run's own context
    assert llm.accelerator_type == "H100" and llm.accelerator_config.kind == "gpu"
    assert llm.deployment_config == {"autoscaling_config": {"min_replicas": 3, "max_replicas": 3},
                                     "max_ongoing_requests": 40}
    # the validation is real: a GPU name Ray does not know, or a model source it cannot download, is refused
    with pytest.raises(ValidationError, match="accelerator"):
        LLMConfig(**dict(raw, accelerator_type="h100"))
    with pytest.raises(ValidationError, match="model_loading_config"):
        LLMConfig(**dict(raw, model_loading_config={"model_id": "x", "model_source": {"bucket_uri": "hf://x"}}))
    assert svc["metadata"]["annotations"]["llmctl.dev/engine"] == "vllm"
    assert svc["metadata"]["annotations"]["llmctl.dev/model"] == export


def test_vllm_pods_are_non_root_take_gpus_and_get_s3_credentials_by_reference(runs):
    _, run = runs
    svc = build_rayservice(run["chatbot"], LOCKED_DOWN, namespace="team", engine="vllm", gpu_type="h200",
                           gpus_per_replica=4)
    assert svc["spec"]["rayClusterConfig"]["rayVersion"] == RAY_VERSION
    for pod in pod_specs(svc):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False and pod["imagePullSecrets"] == [{"name": "regcred"}]
        (c,) = pod["containers"]
        assert c["image"] == f"rayproject/ray-llm:{RAY_VERSION}-py312-cu130"  # vLLM is not in our trainer image
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["readOnlyRootFilesystem"] is True
        # Ray Serve LLM downloads the export with boto3 in the pod: the Secret's keys by reference, the endpoint
        # as a plain value, nothing secret inline (the model cache goes under HOME, the /tmp emptyDir).
        assert c["envFrom"] == [{"secretRef": {"name": "llmctl-s3"}}]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["HOME"] == "/tmp"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
        assert "secret" not in svc["spec"]["serveConfigV2"].lower()
    head, worker = pod_specs(svc)
    (c,) = worker["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"serve": 8000, "metrics": 8080}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in worker["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    (raw,) = serve_app(svc)["args"]["llm_configs"]
    assert raw["accelerator_type"] == "H200" and raw["engine_kwargs"]["tensor_parallel_size"] == 4


def test_vllm_image_follows_the_config(tmp_path):
    assert ClusterConfig(ray_version="2.61.0").vllm_image == "rayproject/ray-llm:2.61.0-py312-cu130"
    f = tmp_path / "cluster.yaml"
    f.write_text(yaml.safe_dump({"serve": {"vllmImage": "registry.example.com/ray-llm:2.60.0-py312-cu130"}}))
    cfg, warnings = load_config_file(str(f))
    assert warnings == [] and cfg.vllm_image == "registry.example.com/ray-llm:2.60.0-py312-cu130"
    assert cfg.image != cfg.vllm_image  # the llmctl engine keeps the trainer image
    f.write_text(yaml.safe_dump({"serve": {"vllmImage": "two words"}}))
    with pytest.raises(Exception, match="vllmImage"):
        load_config_file(str(f))


def test_vllm_refusals_name_the_problem(runs):
    _, run = runs
    chatbot = run["chatbot"]
    azure = dict(chatbot, urls=dict(chatbot["urls"], run="az://container/runs/chatbot"))
    for r, cfg, kw, match in [
        (chatbot, ClusterConfig(), dict(gpus_per_replica=0), "needs GPUs"),
        (chatbot, ClusterConfig(), dict(step=30), "--step"),
        (azure, ClusterConfig(), {}, "downloads models from s3://, gs://, abfss:// only"),
        (chatbot, ClusterConfig(serve_api_key_sha256="a" * 64), {}, "no Host or API-key check"),
        (chatbot, ClusterConfig(serve_allowed_hosts=("chat.example.com",)), {}, "no Host or API-key check"),
        (chatbot, ClusterConfig(), dict(api_key_sha256="b" * 64), "LLMCTL_SERVE_API_KEY"),
        (chatbot, ClusterConfig(), dict(engine="tgi"), "--engine must be one of llmctl, vllm"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_rayservice(r, cfg, namespace="team", **{"engine": "vllm", **kw})


def test_vllm_status_says_which_engine_serves_what(runs):
    _, run = runs
    svc = build_rayservice(run["chatbot"], ClusterConfig(), namespace="team", engine="vllm")
    svc["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    assert describe_service(svc) == ("serving", "OpenAI API (vLLM) on Service chatbot-serve-svc port 8000")
    s = service_summary(svc)
    assert s["engine"] == "vllm" and s["model"] == hf_export_url(run["chatbot"]["urls"]["run"])
    assert f"sft Hugging Face export of a d12 run, served by vLLM ({s['model']})" in service_status_lines(s)
    ours = build_rayservice(run["chatbot"], ClusterConfig(), namespace="team")
    ours["status"] = svc["status"]
    assert describe_service(ours)[1].startswith("OpenAI API and chat page")
    assert "sft checkpoint, newest of a d12 run" in service_status_lines(service_summary(ours))


# ---------------------------------------------------------------------------------------------
# The CLI


def test_vllm_dry_run_prints_a_valid_rayservice_of_the_export(runs, env, capsys):
    bucket, run = runs
    rc = main(["serve", "chatbot", "--engine", "vllm", "--storage", bucket, "--replicas", "2",
               "--dry-run", "-o", "yaml", "-n", "team"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (svc,) = [d for d in yaml.safe_load_all(out) if d]
    for version in schemas.KUBERAY_RELEASES[2:]:  # rendered for the newest release: token auth (1.5.1+)
        schemas.validate(svc, {"kuberay": version})
    (raw,) = serve_app(svc)["args"]["llm_configs"]
    assert raw["model_loading_config"] == {"model_id": "chatbot",
                                           "model_source": {"bucket_uri": f"{bucket}/runs/chatbot/export/hf-sft"}}
    assert raw["engine_kwargs"]["trust_remote_code"] is True and raw["engine_kwargs"]["max_model_len"] == 2048
    assert svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 2 and "dry run" in err
    # --image replaces the vLLM image here, not the trainer image
    rc = main(["serve", "chatbot", "--engine", "vllm", "--storage", bucket, "--dry-run", "-o", "json",
               "--image", "registry.example.com/ray-llm:custom"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert {c["image"] for p in pod_specs(json.loads(out)) for c in p["containers"]} == \
        {"registry.example.com/ray-llm:custom"}


@pytest.mark.parametrize("argv, message", [
    (["chatbot", "--engine", "tgi"], "--engine must be one of llmctl, vllm, got 'tgi'"),
    (["bare", "--engine", "vllm"], "has no Hugging Face export of its sft stage"),
    (["broken", "--engine", "vllm"], "config.json is not a JSON object"),
    (["chatbot", "--engine", "vllm", "--stage", "base"], "export of its pretrain stage at s3://"),
    (["chatbot", "--engine", "vllm", "--step", "30"], "--step"),
    (["chatbot", "--engine", "vllm", "--local"], "--engine vllm serves on the cluster"),
    (["chatbot", "--engine", "vllm", "--gpus-per-replica", "0"], "needs GPUs"),
])
def test_vllm_bad_input_is_one_line_and_exit_2(runs, env, capsys, argv, message):
    bucket, _ = runs
    rc = main(["serve", *argv, "--storage", bucket, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_vllm_missing_export_says_how_to_make_it(runs, env, capsys):
    bucket, _ = runs
    assert main(["serve", "bare", "--engine", "vllm", "--storage", bucket, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"llmctl export bare --stage sft --format hf {bucket}/runs/bare/export/hf-sft" in err

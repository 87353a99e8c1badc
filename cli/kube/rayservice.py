"""A finished run's model as a KubeRay `ray.io/v1` RayService: Ray Serve replicas behind a Kubernetes Service.

Built the way cli/kube/rayjob.py builds the RayJob, from the same cluster config and the same pod helpers (image,
pull secrets, storage credentials by Secret reference, Pod Security "restricted": non-root, no privilege
escalation, all capabilities dropped, seccomp RuntimeDefault, read-only root with /tmp as an emptyDir):

- head: CPU only (`num-cpus: 0`, so no replica lands there); it runs the Serve controller and a proxy.
- one worker group `serve` of `replicas` pods, one Serve replica each: `gpus_per_replica` whole GPUs on a node
  of the GPU type (node selector and tolerations from the cluster config), or CPU pods when it is 0.
- `serveConfigV2` (a YAML string, as KubeRay wants it) names one application, `llmctl`, built by
  `trainer.serve:build_app` with the run's URL, stage, checkpoint step and the replica sizing; the proxies
  listen on 8000, the port KubeRay's `<name>-serve-svc` Service targets.
- ports: `serve` 8000 on every pod, the replica's metrics (`llm-serve`, 9500, scraped by the chart's serve
  PodMonitor) and Ray's own metrics (`metrics`, 8080) on workers.

`engine="vllm"` serves the run's Hugging Face export (`llmctl export`, trainer/plan/urls.py `hf_export_url`) with
Ray Serve LLM instead (`ray.serve.llm:build_openai_app`, vLLM underneath), from the config's vLLM image
(`serve.vllmImage`, default the upstream ray-llm image of the cluster's Ray): the same pods, Service and port; one
`llm_configs` entry whose model Ray Serve LLM downloads from the run's storage with the pods' own S3 credentials
(the Secret by reference, AWS_ENDPOINT_URL), `trust_remote_code` for the export's modeling file, bfloat16, the
run's context as `max_model_len` and the replica's GPUs as the tensor-parallel size. vLLM's metrics go out on
Ray's metrics port; /dev/shm is a memory-backed emptyDir (NCCL and vLLM's shared-memory queues outgrow the
container runtime's 64 MiB).

The object carries the standard llmctl labels (so `llmctl list` finds it) and annotations naming the run's
storage, stage and step. KubeRay's limit on RayService names is 47 characters (53 for the RayCluster minus
the 6-character suffix it appends); run names already fit it.
"""

from __future__ import annotations

import json

import yaml

import dataclasses

from cli.kube.config import ClusterConfig
from cli.kube.pods import (API_VERSION, HEAD_PORTS, PART_OF, RAY_METRICS_PORT, ROLE_LABEL, RUN_LABEL, container,
                           container_env, gpu_placement, pod_spec)
from cli.kube.versions import RAY_TOKEN_AUTH_MIN, has, kuberay_release, parse_version
from trainer.plan.urls import hf_export_url

KIND, PLURAL = "RayService", "rayservices"
APP_NAME = "llmctl"  # trainer/serve/app.py APP_NAME
IMPORT_PATH = "trainer.serve.app:build_app"
SERVE_PORT = 8000  # trainer/serve/app.py SERVE_PORT
SERVE_METRICS_PORT = 9500  # trainer/serve/app.py METRICS_PORT
MAX_NAME = 47  # KubeRay MaxRayServiceNameLength = MaxRayClusterNameLength (53) - 6
WORKER_GROUP = "serve"
ENGINES = ("llmctl", "vllm")  # llmctl: trainer/serve (our engine, our checkpoints); vllm: Ray Serve LLM
VLLM_IMPORT_PATH = "ray.serve.llm:build_openai_app"
# Where Ray Serve LLM downloads a model from (ray/llm/_internal/common/utils/cloud_utils.py `is_remote_path`), within
# the storage llmctl runs on (trainer/plan/urls.py SHARED_PROTOCOLS): boto3 for s3, pyarrow for gs and abfss.
VLLM_SOURCE_PROTOCOLS = ("s3", "gs", "abfss")
# Ray's accelerator_type names (ray/util/accelerators/accelerators.py) of the GPU types the config selects nodes
# for: each GPU node advertises `accelerator_type:<name>`, and Ray Serve LLM places replicas on matching nodes.
RAY_ACCELERATORS = {"h100": "H100", "h100-pcie": "H100", "h200": "H200", "a100": "A100"}
VLLM_SHM = "16Gi"  # /dev/shm of a vLLM replica (memory-backed, so within its memory limit): NCCL and vLLM buffers
# CPU replicas (--gpus-per-replica 0): a small model's decode loop wants a few cores and the weights' memory.
CPU_REPLICA_CPUS = 4
CPU_REPLICA_MEMORY_GI = 16


def service_labels(run: dict, cfg: ClusterConfig, role: str | None = None) -> dict[str, str]:
    a = run.get("spec") or {}
    out = {"app.kubernetes.io/name": "llmctl", "app.kubernetes.io/managed-by": "llmctl", PART_OF: "llmctl",
           RUN_LABEL: run["name"], "llmctl.dev/kind": "service"}
    if a.get("depth") is not None:
        out["llmctl.dev/depth"] = str(a["depth"])
    if role:
        out["app.kubernetes.io/component"] = role
        out[ROLE_LABEL] = role
    return {**cfg.labels, **out}


def serve_config(run_url: str, *, stage: str, step: int | None, replicas: int, gpus_per_replica: int,
                 cpus_per_replica: int, max_batch: int, max_queue: int, allowed_hosts: tuple[str, ...] = (),
                 api_key_sha256: str | None = None) -> str:
    """serveConfigV2: one application on every node's proxy, built by trainer.serve:build_app; with the access
    checks (trainer/serve/access.py) where configured: the Host names it answers besides addresses and the
    SHA-256 of the API key its /v1/ routes need (the key itself never reaches the cluster)."""
    args = {"run_url": run_url, "stage": stage, "replicas": replicas, "gpus_per_replica": gpus_per_replica,
            "cpus_per_replica": cpus_per_replica, "max_batch": max_batch, "max_queue": max_queue,
            "metrics_port": SERVE_METRICS_PORT}
    if allowed_hosts:
        args["allowed_hosts"] = list(allowed_hosts)
    if api_key_sha256:
        args["api_key_sha256"] = api_key_sha256
    if step is not None:
        args["step"] = step
    cfg = {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
           "applications": [{"name": APP_NAME, "import_path": IMPORT_PATH, "route_prefix": "/", "args": args}]}
    return yaml.safe_dump(cfg, sort_keys=False, width=1 << 20)


def vllm_serve_config(model_id: str, model_source: str, *, max_model_len: int, replicas: int, gpus_per_replica: int,
                      accelerator: str | None, max_batch: int, max_queue: int) -> str:
    """serveConfigV2 for Ray Serve LLM: one OpenAI application (`build_openai_app`) of one model, `model_id` (the
    run's name, as /v1/models lists it), downloaded from `model_source` (a storage URL: a CloudMirrorConfig).
    `max_batch` is vLLM's max_num_seqs (sequences decoded together); a replica takes that plus `max_queue`
    requests before Serve queues them. The replica count is fixed, as the worker group's pods are."""
    llm_config: dict = {
        "model_loading_config": {"model_id": model_id, "model_source": {"bucket_uri": model_source}},
        "engine_kwargs": {"trust_remote_code": True, "dtype": "bfloat16", "max_model_len": max_model_len,
                          "tensor_parallel_size": gpus_per_replica, "max_num_seqs": max_batch},
        "deployment_config": {"autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas},
                              "max_ongoing_requests": max_batch + max_queue},
    }
    if accelerator:
        llm_config["accelerator_type"] = accelerator
    cfg = {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
           "applications": [{"name": APP_NAME, "import_path": VLLM_IMPORT_PATH, "route_prefix": "/",
                             "args": {"llm_configs": [llm_config]}}]}
    return yaml.safe_dump(cfg, sort_keys=False, width=1 << 20)


def _vllm_checks(run_url: str, gpus_per_replica: int, allowed_hosts, api_key_sha256) -> None:
    """What the vLLM engine cannot do (ValueError): CPU replicas, storage Ray Serve LLM does not read, the access
    checks of our Serve app (Ray Serve LLM's OpenAI app has neither, and serving without them would be weaker
    than the config asks)."""
    if gpus_per_replica < 1:
        raise ValueError("--engine vllm needs GPUs (--gpus-per-replica >= 1); CPU replicas: --engine llmctl")
    proto = run_url.partition("://")[0]
    if proto not in VLLM_SOURCE_PROTOCOLS:
        where = ", ".join(p + "://" for p in VLLM_SOURCE_PROTOCOLS)
        raise ValueError(f"storage: Ray Serve LLM downloads models from {where} only, and this run is at {run_url}; "
                         "serve it with --engine llmctl")
    if allowed_hosts or api_key_sha256:
        raise ValueError("--engine vllm has no Host or API-key check (Ray Serve LLM's OpenAI app), but this cluster "
                         "config asks for one (serve.allowedHosts, serve.apiKeySha256) or LLMCTL_SERVE_API_KEY is "
                         "set: serve with --engine llmctl, or clear them and put an authenticating gateway in front")


def build_rayservice(run: dict, cfg: ClusterConfig, *, namespace: str, stage: str = "sft", step: int | None = None,
                     replicas: int = 1, gpus_per_replica: int = 1, gpu_type: str = "h100",
                     cpus_per_replica: int | None = None, max_batch: int = 16, max_queue: int = 64,
                     extra_env: dict[str, str] | None = None, api_key_sha256: str | None = None,
                     engine: str = "llmctl") -> dict:
    """The RayService serving `run` (its stored plan.json as a dict). ValueError names a bad argument.
    `api_key_sha256` (from LLMCTL_SERVE_API_KEY at `llmctl serve`) replaces the config's serve.apiKeySha256.
    Ray token authentication as for runs (KubeRay >= 1.5.1 and Ray >= 2.52: authOptions on the cluster).
    `engine="vllm"`: the run's Hugging Face export of `stage` through Ray Serve LLM (no `step`: an export is of
    one checkpoint), on the config's vLLM image."""
    release = kuberay_release(cfg.kuberay_version)
    name, run_url = run["name"], run["urls"]["run"]
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if run_url.startswith("file:"):
        raise ValueError(f"storage: {run_url} is on this machine; serving pods need shared storage such as "
                         "s3://bucket/prefix (--storage, or storageRoot in the cluster config), or use --local")
    vllm = engine == "vllm"
    api_key_sha256 = api_key_sha256 or cfg.serve_api_key_sha256
    if vllm:
        _vllm_checks(run_url, gpus_per_replica, cfg.serve_allowed_hosts, api_key_sha256)
        if step is not None:
            raise ValueError("--step: --engine vllm serves the stage's Hugging Face export, made from one checkpoint "
                             "by llmctl export; --step applies to --engine llmctl")
        cfg = dataclasses.replace(cfg, image=cfg.vllm_image)
    if len(name) > MAX_NAME:
        raise ValueError(f"run name {name!r} is longer than KubeRay's {MAX_NAME}-character RayService limit")
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if not 0 <= gpus_per_replica <= cfg.gpus_per_node:
        raise ValueError(f"--gpus-per-replica must be in 0..{cfg.gpus_per_node} (one node), got {gpus_per_replica}")
    if stage not in [s["name"] for s in run["stages"]]:
        raise ValueError(f"run {name} has no {stage} stage (it has {', '.join(s['name'] for s in run['stages'])})")
    gpu = gpus_per_replica > 0
    if gpu and gpu_type not in cfg.gpu_node_selectors:
        raise ValueError(f"--gpu-type {gpu_type!r}: the cluster config has node selectors for "
                         f"{', '.join(sorted(cfg.gpu_node_selectors))}")
    cpus = cpus_per_replica or (cfg.cpu_per_gpu * gpus_per_replica if gpu else CPU_REPLICA_CPUS)
    memory = f"{cfg.memory_per_gpu_gi * gpus_per_replica if gpu else CPU_REPLICA_MEMORY_GI}Gi"
    env = container_env(name, cfg, dict(extra_env or {}))

    serve_port = {"name": "serve", "containerPort": SERVE_PORT, "protocol": "TCP"}
    head_ports = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in HEAD_PORTS] + [serve_port]
    head_c = container("ray-head", cfg, env, {"cpu": cfg.head_cpu, "memory": cfg.head_memory}, head_ports, "head")
    head = {"metadata": {"labels": service_labels(run, cfg, "serve-head")},
            "spec": pod_spec(name, cfg, head_c, node_selector=cfg.head_node_selector,
                              tolerations=cfg.head_tolerations, service_account=cfg.run_service_account,
                              role="head")}

    resources = {"cpu": str(cpus), "memory": memory}
    if gpu:
        resources["nvidia.com/gpu"] = str(gpus_per_replica)
    worker_ports = [serve_port, {"name": "metrics", "containerPort": RAY_METRICS_PORT, "protocol": "TCP"}]
    if not vllm:  # our replicas' own metrics server; vLLM's metrics go out on Ray's metrics port
        worker_ports.insert(1, {"name": "llm-serve", "containerPort": SERVE_METRICS_PORT, "protocol": "TCP"})
    worker_c = container("ray-worker", cfg, env, resources, worker_ports, "serve")  # extra mounts, no /scratch
    selector, expressions = gpu_placement(cfg, cfg.gpu_node_selectors[gpu_type]) if gpu else ({}, [])
    worker = {"metadata": {"labels": service_labels(run, cfg, "serve")},
              "spec": pod_spec(name, cfg, worker_c, node_selector=selector,
                                tolerations=cfg.gpu_tolerations if gpu else (),
                                service_account=cfg.run_service_account, role="serve",
                                node_expressions=expressions)}
    if vllm:
        worker["spec"]["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": VLLM_SHM}})
        worker_c["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        model = hf_export_url(run_url, stage)
        serve = vllm_serve_config(name, model, max_model_len=int(run["spec"]["seq_len"]), replicas=replicas,
                                  gpus_per_replica=gpus_per_replica, accelerator=RAY_ACCELERATORS.get(gpu_type),
                                  max_batch=max_batch, max_queue=max_queue)
    else:
        serve = serve_config(run_url, stage=stage, step=step, replicas=replicas, gpus_per_replica=gpus_per_replica,
                             cpus_per_replica=cpus, max_batch=max_batch, max_queue=max_queue,
                             allowed_hosts=cfg.serve_allowed_hosts, api_key_sha256=api_key_sha256)

    spec = {
        "serveConfigV2": serve,
        "rayClusterConfig": {
            "rayVersion": cfg.ray_version,
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "num-gpus": "0"}, "template": head},
            "workerGroupSpecs": [{
                "groupName": WORKER_GROUP,
                "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
                "numOfHosts": 1,
                "rayStartParams": {},  # KubeRay sets --num-cpus/--num-gpus from the container limits
                "template": worker,
            }],
        },
    }
    if (cfg.ray_auth == "token" and has(release, "spec.rayClusterSpec.authOptions")
            and parse_version(cfg.ray_version) >= RAY_TOKEN_AUTH_MIN):
        spec["rayClusterConfig"]["authOptions"] = {"mode": "token"}
    annotations = {"llmctl.dev/storage": run_url, "llmctl.dev/stage": stage,
                   "llmctl.dev/replicas": str(replicas), "llmctl.dev/gpus-per-replica": str(gpus_per_replica),
                   "llmctl.dev/gpu-type": gpu_type if gpu else "cpu"}
    if step is not None:
        annotations["llmctl.dev/step"] = str(step)
    if vllm:
        annotations.update({"llmctl.dev/engine": engine, "llmctl.dev/model": model})
    obj = {"apiVersion": API_VERSION, "kind": KIND,
           "metadata": {"name": name, "namespace": namespace, "labels": service_labels(run, cfg),
                        "annotations": annotations},
           "spec": spec}
    return json.loads(json.dumps(obj))  # a plain tree, exactly what the API receives


# ---------------------------------------------------------------------------------------------
# status and list (cli/jobs.py shows services next to runs)


def describe_service(svc: dict) -> tuple[str, str]:
    """(state, detail) of a RayService: serving, starting or failed, in words (status fields of KubeRay 1.3+)."""
    st = svc.get("status") or {}
    name = (svc.get("metadata") or {}).get("name", "?")
    apps = ((st.get("activeServiceStatus") or {}).get("applicationStatuses") or {})
    app = apps.get(APP_NAME) or {}
    if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
        return "failed", f"Serve application {app['status']}" + (f": {app['message']}" if app.get("message") else "")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
    vllm = ((svc.get("metadata") or {}).get("annotations") or {}).get("llmctl.dev/engine") == "vllm"
    if ready or st.get("serviceStatus") == "Running":
        what = "OpenAI API (vLLM)" if vllm else "OpenAI API and chat page"
        return "serving", f"{what} on Service {name}-serve-svc port {SERVE_PORT}"
    if app.get("status") == "DEPLOYING":
        return "starting", "Serve replicas loading the model"
    return "starting", "creating the Ray cluster and the Serve application (pods scheduling, image pulling)"


def service_summary(svc: dict) -> dict:
    """A RayService as a row of `llmctl list` / the fields of `llmctl status` (same keys as a run's summary)."""
    meta = svc.get("metadata") or {}
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    state, detail = describe_service(svc)
    replicas = int(ann.get("llmctl.dev/replicas", "0") or 0)
    per = int(ann.get("llmctl.dev/gpus-per-replica", "0") or 0)
    return {"kind": "service", "name": meta.get("name"), "namespace": meta.get("namespace"), "state": state,
            "detail": detail, "depth": int(labels["llmctl.dev/depth"]) if "llmctl.dev/depth" in labels else None,
            "gpus": replicas * per, "gpu_type": ann.get("llmctl.dev/gpu-type", "?"),
            "replicas": replicas, "stage": ann.get("llmctl.dev/stage"), "step": ann.get("llmctl.dev/step"),
            "created": meta.get("creationTimestamp"), "estimate_dollars": None,
            "storage": ann.get("llmctl.dev/storage"), "engine": ann.get("llmctl.dev/engine", "llmctl"), "model": ann.get("llmctl.dev/model")}


def get_service(kube, name: str) -> dict | None:
    """The RayService `name` in the namespace, or None when there is none (or KubeRay serves no RayServices)."""
    from kubernetes.client.rest import ApiException

    try:
        return kube.custom.get_namespaced_custom_object("ray.io", "v1", kube.namespace, PLURAL, name,
                                                        _request_timeout=(10, 60))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def list_services(kube, all_namespaces: bool, selector: str) -> list[dict]:
    """llmctl's RayServices; none when the cluster does not serve the RayService API."""
    from cli.errors import CLIError

    try:
        if all_namespaces:
            res = kube.call(kube.custom.list_cluster_custom_object, "ray.io", "v1", PLURAL, label_selector=selector,
                            what="list services in all namespaces", verb="list", resource=PLURAL, group="ray.io")
        else:
            res = kube.call(kube.custom.list_namespaced_custom_object, "ray.io", "v1", kube.namespace, PLURAL,
                            label_selector=selector, what=f"list services in namespace {kube.namespace}",
                            verb="list", resource=PLURAL, group="ray.io")
    except CLIError as e:
        if "is not served" in str(e):
            return []
        raise
    return res.get("items", [])


def service_status_lines(s: dict) -> str:
    of_run = f" of a d{s['depth']} run" if s["depth"] is not None else ""
    if s.get("engine") == "vllm":
        model = (f"{s['stage'] or 'sft'} Hugging Face export{of_run}, served by vLLM"
                 + (f" ({s['model']})" if s["model"] else ""))
    else:
        model = f"{s['stage'] or 'sft'} checkpoint" + (f" step {s['step']}" if s["step"] else ", newest") + of_run
    rows = [("service", f"{s['name']} (namespace {s['namespace']})"), ("state", f"{s['state']}: {s['detail']}"),
            ("model", model),
            ("replicas", f"{s['replicas']} x " + (f"{s['gpus'] // max(1, s['replicas'])} GPU" if s["gpus"] else "CPU"))]
    if s["storage"]:
        rows.append(("storage", s["storage"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

"""The cluster config: defaults, the `llmctl-config` ConfigMap's `config.yaml` shape, and its validation.

Three layers, later ones win:
  1. `ClusterConfig()` defaults (below), enough for `submit --dry-run` on a machine with no cluster;
  2. the `config.yaml` key of the `llmctl-config` ConfigMap that the Helm chart installs in the namespace
     (or a local file of the same shape, `--cluster-config FILE`, which replaces the ConfigMap lookup);
  3. flags (`--image`, `--queue`, `--storage`, `--price`, `--env`).

Every key names itself in errors (`cluster config workers.gpusPerNode: must be ...`); keys this llmctl does
not know are warnings (a newer chart), keys it removed on purpose are errors that say what replaced them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.errors import CLIError, UsageError
from trainer.plan.credentials import HOW, find_credential, secret_name

CONFIGMAP = "llmctl-config"  # installed by charts/llmctl; one per namespace
CONFIG_KEY = "config.yaml"
# The trainer image built from images/trainer/Dockerfile; its Ray must equal RAY_VERSION (tests check both).
IMAGE = "ghcr.io/llmctl/trainer:0.1.0"
RAY_VERSION = "2.60.0"
# The image of `llmctl serve --engine vllm` (Ray Serve LLM + vLLM), when the config names none: the upstream
# ray-llm image of the cluster's Ray. Its tags are <ray>-py312-cu130 only: ray-project/ray docker/ray-llm/Dockerfile
# refuses any Python but 3.12 and pairs it with CUDA 13.0 (python/deplocks/llm/rayllm_py312_cu130.lock).
VLLM_IMAGE = "rayproject/ray-llm:{ray_version}-py312-cu130"

# GPU node labels: one choice per cluster, used by the RayJob's worker nodeSelector, the chart's warm cluster
# and the chart's Kueue ResourceFlavors. "gpu-operator": NVIDIA GPU Feature Discovery's product label
# (installed by the GPU Operator; values are the product names GFD reports,
# https://github.com/NVIDIA/k8s-device-plugin/tree/main/docs/gpu-feature-discovery). "gke": the label GKE puts
# on every GPU node itself (https://cloud.google.com/kubernetes-engine/docs/how-to/gpus#multiple_gpus; GFD is
# not installed there by default). The values are assumptions per SKU; the ConfigMap can override each.
GPU_LABELS = {"gpu-operator": "nvidia.com/gpu.product", "gke": "cloud.google.com/gke-accelerator"}
GPU_PRODUCT_LABEL = GPU_LABELS["gpu-operator"]
_GPU_LABEL_VALUES = {
    "gpu-operator": {"h100": "NVIDIA-H100-80GB-HBM3", "h100-pcie": "NVIDIA-H100-PCIe", "h200": "NVIDIA-H200",
                     "a100": "NVIDIA-A100-SXM4-80GB"},
    "gke": {"h100": "nvidia-h100-80gb", "h100-pcie": "nvidia-h100-80gb", "h200": "nvidia-h200-141gb",
            "a100": "nvidia-a100-80gb"},
}
# Further label values that are the same GPU type: GKE's A3 Mega (a3-megagpu-8g) nodes carry
# nvidia-h100-mega-80gb (https://cloud.google.com/kubernetes-engine/docs/how-to/gpus). Pods select these with a
# node affinity `In` every value (cli/kube/pods.py gpu_affinity) where the selectors are the defaults.
GPU_LABEL_ALTERNATIVES = {("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"): ("nvidia-h100-mega-80gb",)}


def default_gpu_node_selectors(gpu_labels: str = "gpu-operator") -> dict[str, dict[str, str]]:
    label = GPU_LABELS[gpu_labels]
    return {gpu: {label: value} for gpu, value in _GPU_LABEL_VALUES[gpu_labels].items()}


DEFAULT_GPU_NODE_SELECTORS = default_gpu_node_selectors()
# Kueue WorkloadPriorityClasses the chart (kueue.priorityClasses) and k8s/kueue/priority-classes.yaml create:
# production runs at the pod PriorityClass llmctl-training's value (k8s/priority-class.yaml), sweep cells below 0,
# so below every run that carries no priority at all (Kueue's default is 0).
PRODUCTION_PRIORITY_CLASS = "llmctl-production"
SWEEP_PRIORITY_CLASS = "llmctl-sweep"

# The NVIDIA device plugin's conventional taint on GPU nodes.
DEFAULT_GPU_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)

# Environment llmctl sets itself, or that changes what code runs: `--env`/`env` may not replace it (a submitter
# could otherwise report progress as another run, send storage traffic elsewhere, or preload a library).
# NCCL_DEBUG is llmctl's default log level and the one variable it sets that `--env` may change.
RESERVED_ENV = ("HOME", "TMPDIR", "RAY_TMPDIR", "PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                "LD_PRELOAD", "LD_LIBRARY_PATH")
RESERVED_ENV_PREFIXES = ("LLMCTL_", "AWS_", "RAY_AUTH_", "KUBERNETES_")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


# ---------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class ClusterConfig:
    """Everything about the target cluster that the plan does not decide. Validates itself, naming the key."""

    image: str = IMAGE
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    ray_version: str = RAY_VERSION
    storage_root: str = "s3://llmctl"  # shared storage every pod reaches; file:// cannot work across pods
    s3_endpoint: str | None = None  # AWS_ENDPOINT_URL for MinIO/Ceph; None = AWS
    s3_region: str | None = None
    s3_secret: str | None = None  # Secret whose keys become env (AWS_ACCESS_KEY_ID, ...); None = ambient (IRSA)
    prices: dict[str, float] = field(default_factory=dict)  # $/GPU-hour by GPU type, over the plan's catalog
    spot_prices: dict[str, float] = field(default_factory=dict)  # $/GPU-hour on spot by GPU type (trainer/plan/spot.py)
    spot_provider: str = "gke"  # gke | eks | label: which node label and taint mark spot nodes (cli/kube/rayjob.py)
    spot_node_selector: dict[str, str] = field(default_factory=dict)  # provider "label": the spot nodes' label
    spot_tolerations: tuple[dict, ...] = ()  # extra tolerations for spot taints (provider defaults are added)
    queue: str | None = None  # Kueue LocalQueue; the RayJob is created suspended and Kueue admits it
    priority_class: str | None = None
    run_service_account: str | None = None  # head pod's account, allowed to annotate its RayJob with progress
    labels: dict[str, str] = field(default_factory=dict)  # extra labels on the RayJob and its pods (cost centre)
    env: dict[str, str] = field(default_factory=dict)  # extra env on Ray containers (NCCL_SOCKET_IFNAME, ...)
    read_only_root_filesystem: bool = True  # /tmp is an emptyDir, HOME=/tmp
    head_cpu: str = "8"
    head_memory: str = "32Gi"
    head_node_selector: dict[str, str] = field(default_factory=dict)
    head_tolerations: tuple[dict, ...] = ()
    gpus_per_node: int = 8  # one worker pod takes a whole node (KubeRay's sizing advice)
    cpu_per_gpu: int = 12  # 8 GPUs -> 96 CPUs, 1000 GiB: fits H100 nodes' allocatable (H100 node sizes: docs/kubernetes.md)
    memory_per_gpu_gi: int = 125
    gpu_node_selectors: dict[str, dict[str, str]] | None = None  # None: the defaults of gpu_labels
    gpu_tolerations: tuple[dict, ...] = DEFAULT_GPU_TOLERATIONS
    gpu_labels: str = "gpu-operator"  # which node labels pick GPU nodes (GPU_LABELS); sets the default selectors
    worker_extra_resources: dict[str, str] = field(default_factory=dict)  # per pod, e.g. RDMA devices
    # Checkpoints are staged on local disk before upload (TMPDIR); a sized emptyDir at /scratch with a matching
    # ephemeral-storage request keeps a node with a small root disk from DiskPressure eviction.
    scratch_size: str = "200Gi"
    tmp_size: str = "20Gi"  # /tmp (Ray's logs and sockets, HOME) on every Ray pod
    # Placement and extras for every Ray pod (head, workers, submitter): Kubernetes shapes, passed through.
    affinity: dict = field(default_factory=dict)
    topology_spread: tuple[dict, ...] = ()  # topologySpreadConstraints of worker pods
    pod_annotations: dict[str, str] = field(default_factory=dict)
    # Kueue topology-aware scheduling (cli/kube/topology.py): the cluster's topology levels, widest first, each
    # {name, nodeLabel, nodes (nodes per domain, optional), oversubscription (bandwidth lost crossing it)}.
    topology: tuple[dict, ...] = ()
    extra_volumes: tuple[dict, ...] = ()  # pod volumes on head and workers (e.g. a dataset cache PVC)
    extra_volume_mounts: tuple[dict, ...] = ()  # their mounts in the Ray containers
    kuberay_version: str | None = None  # installed KubeRay "X.Y[.Z]" where CRDs cannot be read; None: discover
    ray_auth: str = "token"  # Ray token authentication (KubeRay >= 1.5.1, Ray >= 2.52); "disabled" to turn off
    backoff_limit: int = 2  # RayJob retries; each is a new RayCluster that resumes from the last checkpoint
    # After a run ends: KubeRay >= 1.6 without Kueue deletes the GPU workers at once and the head (CPU: logs,
    # dashboard) after ttl_seconds_after_finished (deletionRules); elsewhere the whole cluster goes after
    # min(ttl_seconds_after_finished, gpu_ttl_seconds_after_finished), since the workers hold their GPUs until
    # then while Kueue has already released the quota (cli/kube/rayjob.py, teardown_seconds).
    ttl_seconds_after_finished: int = 600
    gpu_ttl_seconds_after_finished: int = 60
    # Kueue admits an autoscaling (elastic, --min-gpus) RayJob only as a sliced workload: its
    # ElasticJobsViaWorkloadSlices feature gate on (alpha, Kueue >= 0.14 patch releases) and the job annotated
    # kueue.x-k8s.io/elastic-job. True: this cluster's Kueue has the gate on.
    kueue_elastic_jobs: bool = False
    # Kueue WorkloadPriorityClasses (label kueue.x-k8s.io/priority-class on the RayJob, Kueue's order and
    # preemption within a ClusterQueue): `submit` runs on a queue carry kueue_priority_class (None: Kueue takes the
    # pods' PriorityClass value, else 0); `sweep` cells carry kueue_sweep_priority_class, whose value the chart and
    # k8s/kueue/priority-classes.yaml set below every production run's (cli/kube/sweep.py).
    kueue_priority_class: str | None = None
    kueue_sweep_priority_class: str = SWEEP_PRIORITY_CLASS
    # The Serve app's access checks (trainer/serve/access.py) on `llmctl serve` RayServices: Host names the
    # proxy answers besides addresses (empty: no Host check) and the SHA-256 of the API key /v1/ needs.
    serve_allowed_hosts: tuple[str, ...] = ()
    serve_api_key_sha256: str | None = None
    serve_vllm_image: str | None = None  # image of --engine vllm RayServices; None: VLLM_IMAGE of ray_version
    pre_running_deadline_seconds: int = 1800  # fail a run whose pods are not running 30 min after admission
    deadline_factor: float = 1.5  # activeDeadlineSeconds = estimate x factor + slack
    deadline_slack_seconds: int = 1800
    # The longest termination notice this cluster's nodes give (spot: GCE ~30 s, AWS 120 s); the RayJob's pods
    # get a grace period sized for an emergency checkpoint (trainer/preempt.py) and a plan that cannot save in
    # time is refused. None: no limit (the grace period is still sized from the estimate).
    max_grace_seconds: int | None = None
    # The interconnect's all-reduce bus bandwidth as `llmctl doctor --network` measured it (GB/s), when, and over
    # how many GPUs: the planner's figure for this cluster instead of trainer/plan/interconnect.py's default. Stored by
    # the check in the ConfigMap's own key `interconnect.yaml` (INTERCONNECT_KEY), beside the chart's config.yaml;
    # a --cluster-config file may carry the same mapping under `interconnect:`.
    interconnect_busbw_gbs: float | None = None
    interconnect_measured_at: str | None = None
    interconnect_gpus: int | None = None

    def __post_init__(self) -> None:
        """What the chart's schema cannot say (types, ranges, patterns and enums are the schema's, checked where a
        config is read: `from_dict`, `replace`): credentials by name or value, llmctl's reserved env names,
        mounts naming their volumes, the measured interconnect (not a chart value), a spot label's selector."""

        def bad(key: str, why: str) -> None:
            raise UsageError(f"cluster config {key}: {why}")

        if not self.image or any(c.isspace() for c in self.image):
            bad("image", f"must be an image reference, got {self.image!r}")
        for key, value in (("storageRoot", self.storage_root), ("s3.endpoint", self.s3_endpoint),
                           ("s3.region", self.s3_region), ("image", self.image),
                           ("serve.vllmImage", self.serve_vllm_image)):
            if isinstance(value, str) and (what := find_credential(value)):
                bad(key, f"holds {what}; {HOW}")
        if self.spot_provider == "label" and not self.spot_node_selector:
            bad("spotNodeSelector", "must name the spot nodes' label when spotProvider is label, e.g. {pool: spot}")
        for k, v in self.env.items():
            if not _ENV_NAME.fullmatch(k):
                bad(f"env.{k}", "is not a valid environment variable name")
            if secret_name(k):
                bad(f"env.{k}", f"looks like a credential by its name; {HOW}")
            if k in RESERVED_ENV or k.startswith(RESERVED_ENV_PREFIXES):
                bad(f"env.{k}", "llmctl sets it (or it decides what code runs), so it cannot be replaced; reserved: "
                                f"{', '.join(RESERVED_ENV)}, {', '.join(p + '*' for p in RESERVED_ENV_PREFIXES)}")
            if not isinstance(v, str):
                bad(f"env.{k}", f"must be a string, got {v!r}")
            if what := find_credential(v):
                bad(f"env.{k}", f"its value looks like a credential ({what}); {HOW}")
        if self.gpu_labels not in GPU_LABELS:
            bad("workers.gpuLabels", f"must be one of {', '.join(GPU_LABELS)}, got {self.gpu_labels!r}")
        if self.gpu_node_selectors is None:
            object.__setattr__(self, "gpu_node_selectors", default_gpu_node_selectors(self.gpu_labels))
        from cli.kube.topology import check_levels  # what the schema cannot say: the levels' order and sizes

        if (why := check_levels(self.topology)) is not None:
            bad("placement.topology", why)
        names = {v.get("name") for v in self.extra_volumes if isinstance(v, dict)}
        for m in self.extra_volume_mounts:
            if isinstance(m, dict) and m.get("name") not in names:
                bad("extraVolumeMounts", f"{m.get('name')!r} is not in extraVolumes")
        b = self.interconnect_busbw_gbs
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1e6):
            bad("interconnect.busbwGBs", f"must be a number of GB/s > 0, got {b!r}")
        when = self.interconnect_measured_at
        if when is not None and not (isinstance(when, str) and re.fullmatch(r"\d{4}-\d\d-\d\d(T[0-9:]+Z)?", when)):
            bad("interconnect.measuredAt", f"must be a UTC date such as 2026-11-30T20:40:00Z, got {when!r}")
        n = self.interconnect_gpus
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
            bad("interconnect.gpus", f"must be an integer >= 2, got {n!r}")

    @property
    def vllm_image(self) -> str:
        """The image of `llmctl serve --engine vllm`: serve.vllmImage, else the upstream ray-llm image of rayVersion."""
        return self.serve_vllm_image or VLLM_IMAGE.format(ray_version=self.ray_version)

    def interconnect_note(self) -> str | None:
        """How the plan's interconnect figure was obtained, for its table; None when not measured."""
        if self.interconnect_busbw_gbs is None:
            return None
        when = (self.interconnect_measured_at or "")[:10] or "on an unknown date"
        over = f" over {self.interconnect_gpus} GPUs" if self.interconnect_gpus else ""
        return f"measured {when} by llmctl doctor --network{over}"

    # -- the ConfigMap's YAML shape (nested, camelCase) <-> this flat dataclass ----------------------------

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> tuple[ClusterConfig, list[str]]:
        """Build from the nested YAML shape; returns the config and warnings for keys this llmctl ignores."""
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a YAML mapping, got {type(data).__name__}")
        flat = _flatten(data)
        kwargs: dict[str, Any] = {}
        warnings = []
        known = {p: v for p, v in flat.items() if p in _KEY_TO_FIELD}
        check_schema(_nest(known), source)
        for path, value in flat.items():
            fname = _KEY_TO_FIELD.get(path)
            if path == "interconnect":
                kwargs.update(_interconnect_fields(value, f"{source} interconnect"))
                continue
            if path in _REMOVED_KEYS:
                if value in ("", None, []):
                    continue  # an older chart's empty default
                raise UsageError(f"{source} {path}: {_REMOVED_KEYS[path]}")
            if fname is None:
                warnings.append(f"{source}: ignoring unknown key {path} (newer chart than this llmctl?)")
                continue
            if value in ("", None) or (fname == "gpu_node_selectors" and value == {}):
                continue  # an empty value in the chart means "not set" (selectors: gpuLabels' defaults)
            kwargs[fname] = _coerce(fname, value)
        return cls(**kwargs), warnings

    def to_dict(self) -> dict:
        """The nested YAML shape, as the chart renders it (round-trips through from_dict)."""
        out: dict = {}
        for path, fname in _KEY_TO_FIELD.items():
            value = getattr(self, fname)
            if isinstance(value, tuple):
                value = list(value)
            node = out
            *parents, leaf = path.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value if value is not None or fname == "max_grace_seconds" else ""  # the chart's null
        return out

    def replace(self, **changes) -> ClusterConfig:
        """A copy with flags applied (`--image`, `--queue`, ...), checked against the schema like a read config."""
        cfg = dataclasses.replace(self, **changes)
        check_schema(cfg.to_dict(), "cluster config")
        return cfg


# Dotted key in config.yaml -> dataclass field. Keys whose values are free-form maps (prices, env, labels,
# selectors, extraResources) stop here; their contents are not flattened further.
_KEY_TO_FIELD = {
    "image": "image", "imagePullPolicy": "image_pull_policy", "imagePullSecrets": "image_pull_secrets",
    "rayVersion": "ray_version", "storageRoot": "storage_root",
    "s3.endpoint": "s3_endpoint", "s3.region": "s3_region", "s3.credentialsSecret": "s3_secret",
    "prices": "prices", "spotPrices": "spot_prices", "spotProvider": "spot_provider",
    "spotNodeSelector": "spot_node_selector", "spotTolerations": "spot_tolerations", "queue": "queue", "priorityClass": "priority_class",
    "runServiceAccount": "run_service_account", "labels": "labels", "env": "env",
    "readOnlyRootFilesystem": "read_only_root_filesystem",
    "head.cpu": "head_cpu", "head.memory": "head_memory", "head.nodeSelector": "head_node_selector",
    "head.tolerations": "head_tolerations",
    "workers.gpusPerNode": "gpus_per_node", "workers.cpuPerGpu": "cpu_per_gpu",
    "workers.memoryPerGpuGi": "memory_per_gpu_gi", "workers.nodeSelectors": "gpu_node_selectors",
    "workers.tolerations": "gpu_tolerations", "workers.extraResources": "worker_extra_resources",
    "workers.gpuLabels": "gpu_labels", "workers.scratchSize": "scratch_size", "tmpSize": "tmp_size",
    "placement.affinity": "affinity", "placement.topologySpreadConstraints": "topology_spread",
    "placement.podAnnotations": "pod_annotations", "placement.topology": "topology", "extraVolumes": "extra_volumes",
    "extraVolumeMounts": "extra_volume_mounts", "kuberay.version": "kuberay_version", "rayAuth": "ray_auth",
    "lifecycle.backoffLimit": "backoff_limit", "lifecycle.ttlSecondsAfterFinished": "ttl_seconds_after_finished",
    "lifecycle.preRunningDeadlineSeconds": "pre_running_deadline_seconds",
    "lifecycle.deadlineFactor": "deadline_factor", "lifecycle.deadlineSlackSeconds": "deadline_slack_seconds",
    "lifecycle.maxGraceSeconds": "max_grace_seconds",
    "lifecycle.gpuTtlSecondsAfterFinished": "gpu_ttl_seconds_after_finished",
    "kueue.elasticJobs": "kueue_elastic_jobs", "kueue.priorityClass": "kueue_priority_class",
    "kueue.sweepPriorityClass": "kueue_sweep_priority_class",
    "serve.allowedHosts": "serve_allowed_hosts", "serve.apiKeySha256": "serve_api_key_sha256",
    "serve.vllmImage": "serve_vllm_image",
}
_SECTIONS = {k.split(".")[0] for k in _KEY_TO_FIELD if "." in k}  # s3, head, workers, lifecycle


def _flatten(d: dict) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in _SECTIONS and isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
        else:
            out[k] = v
    return out


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


SCHEMA_FILE = Path(__file__).with_name("values.schema.json")  # the chart's values.schema.json (a test checks they match)


def config_schema() -> dict:
    """The schema of the ConfigMap's config.yaml, from the chart's own schema: its `config` values plus the keys the
    chart's template sets from other values (image, imagePullPolicy, imagePullSecrets, queue, runServiceAccount)."""
    import copy
    import json

    chart = json.loads(SCHEMA_FILE.read_text())
    schema = copy.deepcopy(chart["properties"]["config"])
    top = chart["properties"]
    schema["properties"].update({
        "image": {"type": "string", "minLength": 1},
        "imagePullPolicy": top["image"]["properties"]["pullPolicy"],
        # the template writes the chart's [{name: ...}]; a --cluster-config file may list names
        "imagePullSecrets": {"type": "array", "items": {"anyOf": [top["imagePullSecrets"]["items"],
                                                                  {"type": "string", "minLength": 1}]}},
        "runServiceAccount": top["runServiceAccount"]["properties"]["name"],
    })
    schema["$schema"] = chart["$schema"]
    return schema


def _defaults() -> dict:
    """ClusterConfig()'s values in the YAML shape, unset ones left out (the chart's values.yaml has the same)."""
    def keep(d):
        return {k: keep(v) if isinstance(v, dict) and k in _SECTIONS else v for k, v in d.items()
                if v not in ("", None)}
    return keep(ClusterConfig().to_dict())


def check_schema(data: dict, source: str) -> None:
    """`data` (the YAML shape; unknown keys already set aside), merged over the defaults, against the chart's schema:
    the verdict `helm lint` gives the same values. One error, naming the key (`source` is where the data came
    from; errors say "cluster config KEY", like every other check of it)."""
    import jsonschema  # here, not at start-up: only where a config is read

    merged = _defaults()
    for k, v in data.items():
        merged[k] = dict(merged.get(k, {}), **v) if k in _SECTIONS and isinstance(v, dict) else v
    validator = jsonschema.Draft7Validator(config_schema())
    errors = sorted(validator.iter_errors(merged), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        e = jsonschema.exceptions.best_match(errors)
        key = ".".join(map(str, e.absolute_path)) or "config"
        hint = e.schema.get("description", "") if isinstance(e.schema, dict) else ""
        why = {"pattern": lambda: f"must match {e.validator_value}",
               "enum": lambda: f"must be one of {', '.join(map(str, e.validator_value))}",
               "minimum": lambda: f"must be >= {e.validator_value}",
               "type": lambda: f"must be of type {' or '.join(e.validator_value) if isinstance(e.validator_value, list) else e.validator_value}",
               "not": lambda: "is not allowed"}.get(e.validator)
        text = f"{why()}, got {e.instance!r}" if why else e.message
        raise UsageError(f"cluster config {key}: {text}" + (f" ({hint})" if hint else ""))


_LIST_FIELDS = {"topology", "serve_allowed_hosts", "image_pull_secrets", "head_tolerations", "gpu_tolerations", "spot_tolerations", "topology_spread", "extra_volumes",
                "extra_volume_mounts"}
_MAP_FIELDS = {"prices", "spot_prices", "spot_node_selector", "labels", "env", "head_node_selector", "gpu_node_selectors", "worker_extra_resources",
               "affinity", "pod_annotations"}
# Keys this llmctl refused on purpose (not merely unknown): the reason names the replacement.
_REMOVED_KEYS = {
    "workers.capabilities": "removed: an added capability such as IPC_LOCK does nothing for a non-root "
                            "container (uid 1000 gets no effective capabilities) and Pod Security baseline and "
                            "restricted reject it; RDMA needs an unlimited memlock limit from the container "
                            "runtime instead (docs/kubernetes.md, EFA and InfiniBand)",
}
_INT_FIELDS = {"gpus_per_node", "cpu_per_gpu", "memory_per_gpu_gi", "backoff_limit", "ttl_seconds_after_finished",
               "gpu_ttl_seconds_after_finished",
               "pre_running_deadline_seconds", "deadline_slack_seconds"}


def _coerce(fname: str, value: Any) -> Any:
    """YAML value -> field value; wrong shapes name the key (numbers for quantities become strings)."""
    key = f"cluster config {_field_key(fname)}"
    if fname in _LIST_FIELDS:
        if not isinstance(value, list):
            raise UsageError(f"{key}: must be a list, got {value!r}")
        if fname == "image_pull_secrets":  # accept both [name] and [{name: ...}] (the Kubernetes shape)
            value = [v.get("name") if isinstance(v, dict) else v for v in value]
        return tuple(value)
    if fname in _MAP_FIELDS:
        if not isinstance(value, dict):
            raise UsageError(f"{key}: must be a mapping, got {value!r}")
        if fname in ("prices", "spot_prices"):
            return {str(k): v for k, v in value.items() if v not in ("", None)}
        if fname == "gpu_node_selectors":
            if not all(isinstance(v, dict) for v in value.values()):
                raise UsageError(f"{key}: must map GPU type -> {{label: value}}, got {value!r}")
            return {str(k): {str(a): str(b) for a, b in v.items()} for k, v in value.items()}
        if fname == "affinity":
            return value
        if fname == "env":  # the chart allows numbers and booleans (--set env.X=1); a container's env is text
            return {str(k): ("true" if v else "false") if isinstance(v, bool) else _scalar_str(v)
                    for k, v in value.items()}
        return {str(k): _scalar_str(v) for k, v in value.items()}
    if fname in ("head_cpu", "head_memory", "scratch_size", "tmp_size"):
        return _scalar_str(value)
    if fname == "kuberay_version" and not isinstance(value, str):
        raise UsageError(f"{key}: must be a quoted string such as \"1.6\" (YAML reads 1.10 as 1.1), "
                         f"got {value!r}")
    if fname in _INT_FIELDS and not (isinstance(value, int) and not isinstance(value, bool)):
        raise UsageError(f"{key}: must be an integer, got {value!r}")
    if fname in ("read_only_root_filesystem", "kueue_elastic_jobs") and not isinstance(value, bool):
        raise UsageError(f"{key}: must be true or false, got {value!r}")
    if fname in ("image", "image_pull_policy", "ray_version", "storage_root", "s3_endpoint", "s3_region",
                 "s3_secret", "queue", "priority_class", "kueue_priority_class", "kueue_sweep_priority_class",
                 "run_service_account", "gpu_labels", "ray_auth",
                 "spot_provider", "serve_api_key_sha256", "serve_vllm_image") \
            and not isinstance(value, str):
        raise UsageError(f"{key}: must be a string, got {value!r}")
    return value


INTERCONNECT_KEY = "interconnect.yaml"  # the ConfigMap key `llmctl doctor --network` writes (cli/netcheck.py)
_INTERCONNECT_FIELDS = {"busbwGBs": "interconnect_busbw_gbs", "measuredAt": "interconnect_measured_at",
                        "gpus": "interconnect_gpus"}


def _interconnect_fields(value: Any, source: str) -> dict:
    """The `interconnect` mapping (busbwGBs, measuredAt, gpus; latencyUs and rayjob are kept for people) as
    config fields; their checks are ClusterConfig's."""
    if not isinstance(value, dict):
        raise UsageError(f"{source}: must be a mapping with busbwGBs, measuredAt, gpus, got {value!r}")
    return {f: value[k] for k, f in _INTERCONNECT_FIELDS.items() if value.get(k) not in ("", None)}


def _scalar_str(v: Any) -> Any:
    """YAML turns `cpu: 8` into an int; Kubernetes quantities and label values are strings."""
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _field_key(fname: str) -> str:
    return next(k for k, f in _KEY_TO_FIELD.items() if f == fname)


def load_config_file(path: str) -> tuple[ClusterConfig, list[str]]:
    """A local file in the ConfigMap's `config.yaml` shape (`--cluster-config`)."""
    import yaml

    from trainer import safe_yaml

    try:
        text = Path(path).expanduser().read_text()
    except OSError as e:
        raise UsageError(f"--cluster-config: cannot read {path}: {e.strerror}") from None
    try:
        data = safe_yaml.load(text) or {}  # no aliases, bounded depth and size (trainer/safe_yaml.py)
    except yaml.YAMLError as e:
        raise UsageError(f"--cluster-config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return ClusterConfig.from_dict(data, source=path)


def config_from_configmap(cm: dict) -> tuple[ClusterConfig, list[str]]:
    import yaml

    from trainer import safe_yaml

    text = (cm.get("data") or {}).get(CONFIG_KEY)
    source = f"ConfigMap {CONFIGMAP}"
    if text is None:
        raise CLIError(f"{source} has no {CONFIG_KEY} key; reinstall the chart (helm upgrade llmctl charts/llmctl)")
    try:
        data = safe_yaml.load(text) or {}
    except yaml.YAMLError as e:
        raise CLIError(f"{source}: {CONFIG_KEY} is not valid YAML ({str(e).splitlines()[0]})") from None
    measured = (cm.get("data") or {}).get(INTERCONNECT_KEY)
    if measured is not None and isinstance(data, dict):  # the check's figure wins over config.yaml's
        try:
            data = dict(data, interconnect=safe_yaml.load(measured))
        except yaml.YAMLError as e:
            raise CLIError(f"{source}: {INTERCONNECT_KEY} is not valid YAML ({str(e).splitlines()[0]}); run "
                           f"llmctl doctor --network again to rewrite it") from None
    return ClusterConfig.from_dict(data, source=source)


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """`--env KEY=VALUE` flags (`submit`, `serve`) as a mapping, checked by the same rules as the ConfigMap's
    env: names, llmctl's own variables, no credentials by name or by value."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env: expected KEY=VALUE, got {pair!r}")
        out[key] = value
    try:
        ClusterConfig(env=out)
    except UsageError as e:
        raise UsageError(str(e).replace("cluster config env.", "--env ", 1)) from None
    return out

"""Where runs go: the cluster config (defaults, the `llmctl-config` ConfigMap, flags) and the Kubernetes client.

Three layers, later ones win:
  1. `ClusterConfig()` defaults (below), enough for `submit --dry-run` on a machine with no cluster;
  2. the `config.yaml` key of the `llmctl-config` ConfigMap that the Helm chart installs in the namespace
     (or a local file of the same shape, `--cluster-config FILE`, which replaces the ConfigMap lookup);
  3. flags (`--image`, `--queue`, `--storage`, `--price`, `--env`).

The kubernetes package is imported only inside the functions that talk to the API server (it takes ~0.5 s to
import); namespace resolution reads kubeconfig files with PyYAML so `--dry-run` never imports it. API failures
become one actionable line (`CLIError`): 401/403 say who lacks which verb, 404 tells a missing run from a
missing KubeRay CRD, connection errors name the server and the context.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.errors import CLIError, UsageError
from trainer.progress import IN_CLUSTER_NAMESPACE

CONFIGMAP = "llmctl-config"  # installed by charts/llmctl; one per namespace
CONFIG_KEY = "config.yaml"
# The trainer image built from images/trainer/Dockerfile; its Ray must equal RAY_VERSION (tests check both).
IMAGE = "ghcr.io/llmctl/trainer:0.1.0"
RAY_VERSION = "2.60.0"

# GPU Feature Discovery's product label on NVIDIA nodes (installed by the GPU Operator). The values are the
# marketing names GFD reports on common SKUs; an assumption per cluster, so the ConfigMap can override them.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_GPU_NODE_SELECTORS = {
    "h100": {GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3"},
    "h100-pcie": {GPU_PRODUCT_LABEL: "NVIDIA-H100-PCIe"},
    "h200": {GPU_PRODUCT_LABEL: "NVIDIA-H200"},
    "a100": {GPU_PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB"},
}
# The NVIDIA device plugin's conventional taint on GPU nodes.
DEFAULT_GPU_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)

# Environment variable names that would put a credential into a manifest: refused, use a Secret.
_SECRETISH = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY)", re.I)
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
    cpu_per_gpu: int = 12  # 8 GPUs -> 96 CPUs, 1000 GiB: fits H100 nodes' allocatable (k8s-anchors §I)
    memory_per_gpu_gi: int = 125
    gpu_node_selectors: dict[str, dict[str, str]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_GPU_NODE_SELECTORS.items()})
    gpu_tolerations: tuple[dict, ...] = DEFAULT_GPU_TOLERATIONS
    worker_extra_resources: dict[str, str] = field(default_factory=dict)  # per pod, e.g. RDMA devices
    worker_capabilities: tuple[str, ...] = ()  # e.g. IPC_LOCK for RDMA memory registration
    backoff_limit: int = 2  # RayJob retries; each is a new RayCluster that resumes from the last checkpoint
    ttl_seconds_after_finished: int = 600  # keep the finished cluster this long (logs, dashboard)
    pre_running_deadline_seconds: int = 1800  # fail a run whose pods are not running 30 min after admission
    deadline_factor: float = 1.5  # activeDeadlineSeconds = estimate x factor + slack
    deadline_slack_seconds: int = 1800

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> None:
            raise UsageError(f"cluster config {key}: {why}")

        if not self.image or any(c.isspace() for c in self.image):
            bad("image", f"must be an image reference, got {self.image!r}")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            bad("imagePullPolicy", f"must be Always, IfNotPresent or Never, got {self.image_pull_policy!r}")
        if not re.fullmatch(r"\d+\.\d+\.\d+", self.ray_version):
            bad("rayVersion", f"must be X.Y.Z, got {self.ray_version!r}")
        if "://" not in self.storage_root:
            bad("storageRoot", f"must be a URL such as s3://bucket/prefix, got {self.storage_root!r}")
        for key, name in (("s3.credentialsSecret", self.s3_secret), ("priorityClass", self.priority_class),
                          ("runServiceAccount", self.run_service_account), ("queue", self.queue)):
            if name is not None and not (_DNS1123.fullmatch(name) and len(name) <= 253):
                bad(key, f"must be a Kubernetes object name (lower-case DNS-1123), got {name!r}")
        for gpu, price in self.prices.items():
            if not isinstance(price, (int, float)) or isinstance(price, bool) or price < 0:
                bad(f"prices.{gpu}", f"must be a number of dollars >= 0, got {price!r}")
        for k, v in self.env.items():
            if not _ENV_NAME.fullmatch(k):
                bad(f"env.{k}", "is not a valid environment variable name")
            if _SECRETISH.search(k):
                bad(f"env.{k}", "looks like a credential; put it in a Secret and name it in s3.credentialsSecret")
            if not isinstance(v, str):
                bad(f"env.{k}", f"must be a string, got {v!r}")
        for key, q in (("head.cpu", self.head_cpu), ("head.memory", self.head_memory),
                       *((f"workers.extraResources.{k}", v) for k, v in self.worker_extra_resources.items())):
            if not isinstance(q, str) or not _QUANTITY.fullmatch(q):
                bad(key, f"must be a Kubernetes quantity string such as '8' or '32Gi', got {q!r}")
        for key, n, lo in (("workers.gpusPerNode", self.gpus_per_node, 1), ("workers.cpuPerGpu", self.cpu_per_gpu, 1),
                           ("workers.memoryPerGpuGi", self.memory_per_gpu_gi, 1),
                           ("lifecycle.backoffLimit", self.backoff_limit, 0),
                           ("lifecycle.ttlSecondsAfterFinished", self.ttl_seconds_after_finished, 0),
                           ("lifecycle.preRunningDeadlineSeconds", self.pre_running_deadline_seconds, 1),
                           ("lifecycle.deadlineSlackSeconds", self.deadline_slack_seconds, 0)):
            if not isinstance(n, int) or isinstance(n, bool) or n < lo:
                bad(key, f"must be an integer >= {lo}, got {n!r}")
        if not isinstance(self.deadline_factor, (int, float)) or self.deadline_factor < 1:
            bad("lifecycle.deadlineFactor", f"must be a number >= 1, got {self.deadline_factor!r}")
        for key, tols in (("head.tolerations", self.head_tolerations), ("workers.tolerations", self.gpu_tolerations)):
            for t in tols:
                if not isinstance(t, dict) or set(t) - {"key", "operator", "value", "effect", "tolerationSeconds"}:
                    bad(key, f"each entry must be a toleration (key, operator, value, effect), got {t!r}")
        for cap in self.worker_capabilities:
            if not re.fullmatch(r"[A-Z_]+", cap):
                bad("workers.capabilities", f"must be Linux capability names such as IPC_LOCK, got {cap!r}")

    # -- the ConfigMap's YAML shape (nested, camelCase) <-> this flat dataclass ----------------------------

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> tuple[ClusterConfig, list[str]]:
        """Build from the nested YAML shape; returns the config and warnings for keys this llmctl ignores."""
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a YAML mapping, got {type(data).__name__}")
        flat = _flatten(data)
        kwargs: dict[str, Any] = {}
        warnings = []
        for path, value in flat.items():
            fname = _KEY_TO_FIELD.get(path)
            if fname is None:
                warnings.append(f"{source}: ignoring unknown key {path} (newer chart than this llmctl?)")
                continue
            if value in ("", None):  # an empty value in the chart means "not set"
                continue
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
            node[leaf] = "" if value is None else value
        return out

    def replace(self, **changes) -> ClusterConfig:
        return dataclasses.replace(self, **changes)


# Dotted key in config.yaml -> dataclass field. Keys whose values are free-form maps (prices, env, labels,
# selectors, extraResources) stop here; their contents are not flattened further.
_KEY_TO_FIELD = {
    "image": "image", "imagePullPolicy": "image_pull_policy", "imagePullSecrets": "image_pull_secrets",
    "rayVersion": "ray_version", "storageRoot": "storage_root",
    "s3.endpoint": "s3_endpoint", "s3.region": "s3_region", "s3.credentialsSecret": "s3_secret",
    "prices": "prices", "queue": "queue", "priorityClass": "priority_class",
    "runServiceAccount": "run_service_account", "labels": "labels", "env": "env",
    "readOnlyRootFilesystem": "read_only_root_filesystem",
    "head.cpu": "head_cpu", "head.memory": "head_memory", "head.nodeSelector": "head_node_selector",
    "head.tolerations": "head_tolerations",
    "workers.gpusPerNode": "gpus_per_node", "workers.cpuPerGpu": "cpu_per_gpu",
    "workers.memoryPerGpuGi": "memory_per_gpu_gi", "workers.nodeSelectors": "gpu_node_selectors",
    "workers.tolerations": "gpu_tolerations", "workers.extraResources": "worker_extra_resources",
    "workers.capabilities": "worker_capabilities",
    "lifecycle.backoffLimit": "backoff_limit", "lifecycle.ttlSecondsAfterFinished": "ttl_seconds_after_finished",
    "lifecycle.preRunningDeadlineSeconds": "pre_running_deadline_seconds",
    "lifecycle.deadlineFactor": "deadline_factor", "lifecycle.deadlineSlackSeconds": "deadline_slack_seconds",
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


_LIST_FIELDS = {"image_pull_secrets", "head_tolerations", "gpu_tolerations", "worker_capabilities"}
_MAP_FIELDS = {"prices", "labels", "env", "head_node_selector", "gpu_node_selectors", "worker_extra_resources"}
_INT_FIELDS = {"gpus_per_node", "cpu_per_gpu", "memory_per_gpu_gi", "backoff_limit", "ttl_seconds_after_finished",
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
        if fname == "prices":
            return {str(k): v for k, v in value.items() if v not in ("", None)}
        if fname == "gpu_node_selectors":
            if not all(isinstance(v, dict) for v in value.values()):
                raise UsageError(f"{key}: must map GPU type -> {{label: value}}, got {value!r}")
            return {str(k): {str(a): str(b) for a, b in v.items()} for k, v in value.items()}
        return {str(k): _scalar_str(v) for k, v in value.items()}
    if fname in ("head_cpu", "head_memory"):
        return _scalar_str(value)
    if fname in _INT_FIELDS and not (isinstance(value, int) and not isinstance(value, bool)):
        raise UsageError(f"{key}: must be an integer, got {value!r}")
    if fname == "read_only_root_filesystem" and not isinstance(value, bool):
        raise UsageError(f"{key}: must be true or false, got {value!r}")
    if fname in ("image", "image_pull_policy", "ray_version", "storage_root", "s3_endpoint", "s3_region",
                 "s3_secret", "queue", "priority_class", "run_service_account") and not isinstance(value, str):
        raise UsageError(f"{key}: must be a string, got {value!r}")
    return value


def _scalar_str(v: Any) -> Any:
    """YAML turns `cpu: 8` into an int; Kubernetes quantities and label values are strings."""
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _field_key(fname: str) -> str:
    return next(k for k, f in _KEY_TO_FIELD.items() if f == fname)


def load_config_file(path: str) -> tuple[ClusterConfig, list[str]]:
    """A local file in the ConfigMap's `config.yaml` shape (`--cluster-config`)."""
    import yaml

    try:
        text = Path(path).expanduser().read_text()
    except OSError as e:
        raise UsageError(f"--cluster-config: cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--cluster-config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return ClusterConfig.from_dict(data, source=path)


def config_from_configmap(cm: dict) -> tuple[ClusterConfig, list[str]]:
    import yaml

    text = (cm.get("data") or {}).get(CONFIG_KEY)
    source = f"ConfigMap {CONFIGMAP}"
    if text is None:
        raise CLIError(f"{source} has no {CONFIG_KEY} key; reinstall the chart (helm upgrade llmctl charts/llmctl)")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CLIError(f"{source}: {CONFIG_KEY} is not valid YAML ({str(e).splitlines()[0]})") from None
    return ClusterConfig.from_dict(data, source=source)


# ---------------------------------------------------------------------------------------------
# Flags shared by every command that talks to a cluster


def add_cluster_args(p) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else 'default')")
    g.add_argument("--context", help="kubeconfig context (default: the current context)")
    g.add_argument("--kubeconfig", help="kubeconfig file(s), ':'-separated (default: $KUBECONFIG or ~/.kube/config)")


def _kubeconfig_paths(args) -> list[Path]:
    raw = getattr(args, "kubeconfig", None) or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def resolve_namespace(args) -> str:
    """--namespace, else the context's namespace in the kubeconfig, else the pod's own namespace, else default.

    Reads the kubeconfig with PyYAML (no kubernetes import), so `--dry-run` can call it.
    """
    if getattr(args, "namespace", None):
        return args.namespace
    import yaml

    docs = []
    for path in _kubeconfig_paths(args):
        try:
            docs.append(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError):
            continue
    if docs:
        current = getattr(args, "context", None) or next(
            (d.get("current-context") for d in docs if d.get("current-context")), None)
        for d in docs:
            for c in d.get("contexts") or []:
                if c.get("name") == current:
                    return (c.get("context") or {}).get("namespace") or "default"
    try:
        return IN_CLUSTER_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


# ---------------------------------------------------------------------------------------------
# The API client


class Kube:
    """A connected client: the kubernetes ApiClient, the namespace, and error mapping for each call."""

    def __init__(self, api_client, namespace: str, where: str):
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.where = where  # "context fake (http://127.0.0.1:5000)", for error lines
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def call(self, fn, *a, what: str, verb: str, resource: str, name: str | None = None,
             group: str = "", **kw):
        """Run one API call; known failures become a CLIError naming what to do next."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        kw.setdefault("_request_timeout", (10, 60))
        try:
            return fn(*a, **kw)
        except ApiException as e:
            raise api_error(e, what=what, verb=verb, resource=resource, name=name, group=group,
                            namespace=self.namespace) from None
        except (Urllib3Error, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise CLIError(f"cannot reach the Kubernetes API ({self.where}) to {what}: {reason}; check --context "
                           f"and KUBECONFIG, or that the cluster is up") from None


def _current_context(paths: list[Path]) -> str:
    import yaml

    for path in paths:
        try:
            ctx = (yaml.safe_load(path.read_text()) or {}).get("current-context")
        except (OSError, yaml.YAMLError):
            continue
        if ctx:
            return ctx
    return "(none)"


def connect(args) -> Kube:
    """Load kubeconfig (or the in-cluster service account) into a fresh client for this command."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    namespace = resolve_namespace(args)
    conf = client.Configuration()
    paths = [p for p in _kubeconfig_paths(args) if p.exists()]
    if paths:
        try:
            config.load_kube_config(config_file=os.pathsep.join(map(str, paths)), context=args.context,
                                    client_configuration=conf, persist_config=False)
        except (ConfigException, ValueError, KeyError, TypeError) as e:
            raise CLIError(f"kubeconfig {os.pathsep.join(map(str, paths))}: {e}; check --context "
                           f"(kubectl config get-contexts)") from None
        where = f"context {args.context or _current_context(paths)} at {conf.host}"
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=conf)
        except ConfigException as e:
            raise CLIError(f"in-cluster config: {e}") from None
        where = f"in-cluster at {conf.host}"
    else:
        tried = ", ".join(map(str, _kubeconfig_paths(args)))
        raise CLIError(f"no Kubernetes config found (looked at {tried}); set KUBECONFIG or --kubeconfig, "
                       f"or use --dry-run to print the objects without a cluster")
    conf.retries = 1
    return Kube(client.ApiClient(conf), namespace, where)


def api_error(e, *, what: str, verb: str, resource: str, name: str | None, group: str, namespace: str) -> CLIError:
    """Map an ApiException to one line that says what went wrong and what to do about it."""
    try:
        body = json.loads(e.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or (e.reason or "").strip() or f"HTTP {e.status}"
    details = body.get("details") or {}
    full = f"{resource}.{group}" if group else resource
    if e.status == 401:
        return CLIError(f"cannot {what}: the API server rejected your credentials (401); log in again or refresh "
                        f"the kubeconfig token")
    if e.status == 403:
        return CLIError(f"cannot {what}: forbidden ({message}); ask a cluster admin to bind the llmctl Role in "
                        f"namespace {namespace} (helm install llmctl charts/llmctl -n {namespace} "
                        f"--set rbac.subjects[0].kind=User,rbac.subjects[0].name=<you>)")
    if e.status == 404:
        if group == "ray.io" and not details.get("name"):
            return CLIError(f"cannot {what}: the {full} API is not served by this cluster; KubeRay is not "
                            f"installed (install the kuberay-operator chart, version >= 1.6)")
        if name:
            return CLIError(f"cannot {what}: no {resource[:-1]} {name!r} in namespace {namespace}; "
                            f"see `llmctl list -n {namespace}`")
        return CLIError(f"cannot {what}: {message}")
    if e.status == 409:
        return CLIError(f"cannot {what}: {resource[:-1]} {name!r} already exists in namespace {namespace}; "
                        f"`llmctl status {name}` shows it, or pass --name for a new run")
    if e.status == 422:
        return CLIError(f"cannot {what}: the API server rejected the {resource[:-1]}: {message}")
    return CLIError(f"cannot {what}: {message} (HTTP {e.status})")


def read_config(kube: Kube) -> tuple[ClusterConfig, list[str]]:
    """The namespace's `llmctl-config`; built-in defaults (with a warning) when the chart is not installed."""
    from kubernetes.client.rest import ApiException

    try:
        cm = kube.core.read_namespaced_config_map(CONFIGMAP, kube.namespace, _request_timeout=(10, 60))
    except ApiException as e:
        if e.status == 404:
            return ClusterConfig(), [f"no ConfigMap {CONFIGMAP} in namespace {kube.namespace}: using built-in "
                                     f"defaults (install the chart: helm install llmctl charts/llmctl "
                                     f"-n {kube.namespace})"]
        raise api_error(e, what=f"read ConfigMap {CONFIGMAP}", verb="get", resource="configmaps",
                        name=CONFIGMAP, group="", namespace=kube.namespace) from None
    except Exception as e:  # connection errors: same wording as Kube.call
        from urllib3.exceptions import HTTPError as Urllib3Error

        if isinstance(e, (Urllib3Error, OSError)):
            raise CLIError(f"cannot reach the Kubernetes API ({kube.where}) to read ConfigMap {CONFIGMAP}: "
                           f"{getattr(e, 'reason', None) or e}; check --context and KUBECONFIG") from None
        raise
    return config_from_configmap(kube.api_client.sanitize_for_serialization(cm))

"""Pod building shared by the RayJob (cli/kube/rayjob.py) and the RayService (cli/kube/rayservice.py): the
labels and ports both use, the container (image, env, resources, restricted security context, volume mounts),
the pod spec (service account, token mounting, placement, volumes) and byte quantities.

Invariants: every pod runs as uid 1000, non-root, no privilege escalation, all capabilities dropped, seccomp
RuntimeDefault (Pod Security "restricted"); requests equal limits; credentials reach a container only by
reference (`envFrom` a Secret, `secretKeyRef`), never by value; only pods given `api_token=True` mount an API token.
"""

from __future__ import annotations

import json

from cli.kube.config import ClusterConfig

# KubeRay's API: the RayJob and RayService built here, and the runs read back (cli/kube/runs.py).
GROUP, VERSION = "ray.io", "v1"
API_VERSION = f"{GROUP}/{VERSION}"
RAY_METRICS_PORT = 8080  # KubeRay's default --metrics-export-port
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("metrics", RAY_METRICS_PORT),
              ("as-metrics", 44217), ("dash-metrics", 44227))  # autoscaler and dashboard metrics (kuberay#1493)

# Labels: the standard set plus ours; PodMonitors and `llmctl logs` select on these.
PART_OF = "app.kubernetes.io/part-of"
RUN_LABEL = "llmctl.dev/run"
ROLE_LABEL = "llmctl.dev/role"
SUBMITTER_CONTAINER = "ray-job-submitter"
CONTAINERS = {"head": "ray-head", "worker": "ray-worker", "submitter": SUBMITTER_CONTAINER}
SCRATCH = "/scratch"  # workers' sized emptyDir for staged checkpoints (TMPDIR)


def security_context(cfg: ClusterConfig) -> dict:
    """Pod Security "restricted": nothing added (an added capability is not effective for uid 1000 anyway)."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": cfg.read_only_root_filesystem,
            "capabilities": {"drop": ["ALL"]}}


# fsGroupChangePolicy OnRootMismatch: the kubelet chowns a volume (a dataset cache PVC of extraVolumes) only when
# its root is not already group 1000, instead of walking every file at each pod start.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}

# Labels that mark spot/preemptible nodes, by provider: GKE (Spot VMs and the older preemptible VMs), EKS managed
# node groups and Karpenter, AKS spot pools. A head pod must outlive a preemption (it holds the job), so it gets
# a required node affinity NotIn each of them (NotIn also matches nodes without the label).
SPOT_NODE_LABELS = (("cloud.google.com/gke-spot", "true"), ("cloud.google.com/gke-preemptible", "true"),
                    ("eks.amazonaws.com/capacityType", "SPOT"), ("karpenter.sh/capacity-type", "spot"),
                    ("kubernetes.azure.com/scalesetpriority", "spot"))


def with_node_expressions(affinity: dict, expressions: list[dict]) -> dict:
    """`affinity` (copied) with every required node-selector term also holding `expressions` (ANDed)."""
    affinity = json.loads(json.dumps(affinity or {}))
    if not expressions:
        return affinity
    required = affinity.setdefault("nodeAffinity", {}).setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for t in terms:
        t["matchExpressions"] = list(t.get("matchExpressions") or []) + list(expressions)
    required["nodeSelectorTerms"] = terms
    return affinity


def off_spot_expressions(cfg: ClusterConfig) -> list[dict]:
    """Node-selector expressions that exclude every known spot label (and the configured spot label)."""
    labels = list(SPOT_NODE_LABELS) + [(k, v) for k, v in cfg.spot_node_selector.items()]
    return [{"key": k, "operator": "NotIn", "values": [v]} for k, v in labels]


def gpu_placement(cfg: ClusterConfig, selector: dict[str, str]) -> tuple[dict, list[dict]]:
    """(nodeSelector, node-affinity expressions) for a GPU type's selector: a label whose value has known
    equivalents (GPU_LABEL_ALTERNATIVES, e.g. GKE's A3 Mega) becomes an `In` expression over all of them."""
    from cli.kube.config import GPU_LABEL_ALTERNATIVES

    plain, exprs = {}, []
    for k, v in selector.items():
        alts = GPU_LABEL_ALTERNATIVES.get((k, v))
        if alts:
            exprs.append({"key": k, "operator": "In", "values": [v, *alts]})
        else:
            plain[k] = v
    return plain, exprs


# The service-account token's standard place and content (what the kubelet's automount projects), mounted
# into KubeRay's autoscaler sidecar only: Ray's autoscaler reads it there to scale the worker group.
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_VOLUME = {"name": "autoscaler-api-token", "projected": {"sources": [
    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}


def autoscaler_options(cfg: ClusterConfig) -> dict:
    """rayClusterSpec.autoscalerOptions for in-tree autoscaling: KubeRay's injected autoscaler container gets no
    securityContext of its own (Pod Security "restricted" would reject the head pod), HOME on the writable
    /tmp, and the API token the head pod does not mount for its other containers (add TOKEN_VOLUME to the
    head pod's volumes)."""
    return {"securityContext": security_context(cfg),
            "env": [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                             {"name": TOKEN_VOLUME["name"], "mountPath": TOKEN_DIR, "readOnly": True}]}


# `--track` credentials, by tracker: the variables each client reads (MLflow: a bearer token, or basic auth;
# W&B: its API key), each taken from the config's trackingSecret by `secretKeyRef`, optional, so one Secret may
# hold only the keys its trackers need.
TRACKING_KEYS = {"mlflow": ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                 "wandb": ("WANDB_API_KEY",)}


def tracking_env(track: tuple[str, ...], cfg: ClusterConfig) -> list[dict]:
    """What `--track` adds to the Ray containers: where to (MLFLOW_TRACKING_URI, the first MLflow target;
    WANDB_PROJECT) and the trackers' credentials from `cfg.tracking_secret` by reference, never by value."""
    from trainer.plan.spec import parse_track

    env, kinds = [], []
    for kind, target in (parse_track(t) for t in track):
        if kind == "mlflow" and "mlflow" not in kinds:
            env.append({"name": "MLFLOW_TRACKING_URI", "value": target})
        if kind == "wandb" and target and "wandb" not in kinds:
            env.append({"name": "WANDB_PROJECT", "value": target})
        kinds.append(kind)
    if cfg.tracking_secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": cfg.tracking_secret, "key": key,
                                                             "optional": True}}}
                for kind in dict.fromkeys(kinds) for key in TRACKING_KEYS[kind]]
    return env


def container_env(run: str, cfg: ClusterConfig, extra: dict[str, str], track: tuple[str, ...] = ()) -> list[dict]:
    """The Ray containers' environment: llmctl's own variables, the S3 endpoint, the trackers of `track` (the
    plan's `--track`), then the config's and `extra` (which replace a same-named entry; the names were checked
    by ClusterConfig)."""
    env = [
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only; /tmp is an emptyDir
        {"name": "LLMCTL_RUN", "value": run},
        {"name": "LLMCTL_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # the node, so a rank that fails with a GPU error can name it in the run's storage (trainer/gpu_health.py)
        {"name": "LLMCTL_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "NCCL_DEBUG", "value": "WARN"},
    ]
    if cfg.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": cfg.s3_endpoint})
    if cfg.s3_region:
        env.append({"name": "AWS_REGION", "value": cfg.s3_region})
    env += tracking_env(track, cfg)
    names = {e["name"] for e in env}
    for k, v in {**cfg.env, **extra}.items():
        if k in names:
            env = [e for e in env if e["name"] != k]
        env.append({"name": k, "value": v})
    return env


def pod_spec(run: str | None, cfg: ClusterConfig, container: dict, *, node_selector: dict, tolerations,
              service_account: str | None = None, api_token: bool = False, role: str = "submitter",
              node_expressions: list[dict] = ()) -> dict:
    """`role`: head (kept off spot nodes), worker or submitter (no affinity, no extra volumes);
    `node_expressions`: required node-affinity expressions ANDed into cfg.affinity.
    `service_account` gives cloud identity (IRSA, workload identity: S3 from every Ray pod);
    `api_token` mounts its Kubernetes API token, which no pod of a run needs: progress and spend go to the
    run's storage (trainer/progress.py, trainer/spend.py)."""
    spec: dict = {}
    if service_account:
        spec["serviceAccountName"] = service_account
    spec["automountServiceAccountToken"] = bool(service_account and api_token)
    if cfg.priority_class:
        spec["priorityClassName"] = cfg.priority_class
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if role != "submitter":
        exprs = list(node_expressions) + (off_spot_expressions(cfg) if role == "head" else [])
        affinity = with_node_expressions(cfg.affinity, exprs)
        if affinity:
            spec["affinity"] = affinity
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    if cfg.topology_spread and role == "worker":
        spec["topologySpreadConstraints"] = [
            {"labelSelector": {"matchLabels": {RUN_LABEL: run, ROLE_LABEL: "worker"}}, **t}
            for t in cfg.topology_spread]
    if cfg.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in cfg.image_pull_secrets]
    spec["securityContext"] = dict(POD_SECURITY)
    spec["containers"] = [container]
    spec["volumes"] = [{"name": "tmp", "emptyDir": {"sizeLimit": cfg.tmp_size}}]
    if role == "worker":
        spec["volumes"].append({"name": "scratch", "emptyDir": {"sizeLimit": cfg.scratch_size}})
    if role != "submitter":
        spec["volumes"] += [dict(v) for v in cfg.extra_volumes]
    return spec


def container(name: str, cfg: ClusterConfig, env: list[dict], resources: dict, ports: list[dict],
               role: str = "submitter") -> dict:
    c: dict = {"name": name, "image": cfg.image, "imagePullPolicy": cfg.image_pull_policy}
    if ports:
        c["ports"] = ports
    c["env"] = env
    if cfg.s3_secret:
        c["envFrom"] = [{"secretRef": {"name": cfg.s3_secret}}]  # credentials by reference, never by value
    c["resources"] = {"requests": dict(resources), "limits": dict(resources)}
    c["securityContext"] = security_context(cfg)
    c["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    if role == "worker":
        c["volumeMounts"].append({"name": "scratch", "mountPath": SCRATCH})
    if role != "submitter":
        c["volumeMounts"] += [dict(m) for m in cfg.extra_volume_mounts]
    return c


_BYTES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40, "Pi": 2**50}


def add_quantities(*qs: str) -> str:
    """Sum of byte quantities ("200Gi" + "20Gi" = "220Gi"), written in Gi/Mi when whole, else bytes."""
    import re

    total = 0
    for q in qs:
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kMGTP]i?|)", q)
        if not m:
            raise ValueError(f"not a byte quantity: {q!r}")
        total += int(float(m[1]) * _BYTES[m[2]])
    for unit in ("Gi", "Mi"):
        if total % _BYTES[unit] == 0:
            return f"{total // _BYTES[unit]}{unit}"
    return str(total)

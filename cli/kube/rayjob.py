"""RunPlan + cluster config -> a KubeRay `ray.io/v1` RayJob, built as plain data (dicts), never as text.

Shape (docs/kubernetes.md; KubeRay RayJob API reference): a CPU-only head (`num-gpus: 0`) and one worker group of ceil(gpus/8) pods
holding min(gpus, 8) GPUs each, requests = limits, so one pod takes one whole 8-GPU node. The cluster is
created for this run and deleted when it ends (`shutdownAfterJobFinishes` + TTL); retries (`backoffLimit`)
build a fresh cluster and resume from the last checkpoint, because the run name (and so the storage path)
is the same. `activeDeadlineSeconds` is the plan's estimate with a margin; `preRunningDeadlineSeconds` fails
runs whose pods never start. With a Kueue queue the RayJob is created suspended and Kueue admits it.

Versions: the RayJob holds only fields the installed KubeRay serves (cli/kube/versions.py): from 1.6
`preRunningDeadlineSeconds`, from 1.5.1 `authOptions` (Ray token authentication: KubeRay makes a Secret and
gives every Ray container and the submitter RAY_AUTH_MODE/RAY_AUTH_TOKEN, so port 8265 answers only callers
holding the token). `cfg.kuberay_version` says which release (discovered by `submit`, or configured); None
renders for the newest supported release.

Disk: Ray pods write /tmp (Ray's logs and sockets) to a sized emptyDir; workers also get /scratch, a sized
emptyDir where checkpoints are staged before upload (TMPDIR), and request the sum as ephemeral-storage, so
the scheduler places them only where the disk fits and the kubelet never evicts them for DiskPressure.

How the plan reaches the pod: inline, in the entrypoint, `python -m trainer.launch --plan-json '<RunPlan JSON>'`.
Nothing is written to storage before the run starts, and `--dry-run` shows the complete truth. The string
passes three shells unchanged: KubeRay runs `ray job submit ... -- <entrypoint>` under bash in the submitter
pod (single quotes: every byte literal), `ray job submit` re-quotes the argv with shlex.join, and Ray's job
supervisor runs it with `sh -c`. The JSON is ASCII with any `'` written as the JSON escape \u0027, so the
single-quoted word never ends early (tests/cli/kube/test_rayjob.py pushes a plan through real bash, shlex and sh).

Metrics: each training process serves Prometheus on 9400 + local_rank, declared as ports llm-m0..llm-m7 on
worker pods; Ray's own metrics are on 8080 (every node) and 44217/44227 (head). The chart's PodMonitors
select pods by the labels set here.
"""

from __future__ import annotations

import json
import math

import yaml

from cli.kube.config import ClusterConfig
from cli.kube.layout import LayoutError, worker_layout
from cli.kube.pods import (API_VERSION, CONTAINERS, HEAD_PORTS, PART_OF, RAY_METRICS_PORT, ROLE_LABEL, RUN_LABEL, SCRATCH,
                           SUBMITTER_CONTAINER, TOKEN_VOLUME, add_quantities, autoscaler_options, container,
                           container_env, gpu_placement, pod_spec)
from cli.kube.versions import RAY_TOKEN_AUTH_MIN, has, kuberay_release, parse_version
from trainer.metrics import METRICS_PORT_BASE  # light: stdlib and trainer.plan at import time
from trainer.plan.catalog import GPUS
from trainer.plan import RunPlan
from trainer.preempt import set_preemption  # stdlib only: grace period and preStop hook
from cli.kube.guards import guard_cluster_spec  # head off spot, do-not-disrupt annotations
from trainer.plan.urls import require_shared

LAUNCH = "python -m trainer.launch"
# Ray Train V2 waits this long for the worker group to start (default 60 s, ray PR #60376); multi-GB image
# pulls on fresh GPU nodes take longer, so give it ten minutes before it gives up and retries.
WORKER_GROUP_START_TIMEOUT_S = 600

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # a Kueue WorkloadPriorityClass: order and preemption in the queue
ELASTIC_ANNOTATION = "kueue.x-k8s.io/elastic-job"  # Kueue's workload slicing (ElasticJobsViaWorkloadSlices)
DELETION_RULES_MIN = (1, 6, 0)  # KubeRay: deletionStrategy.deletionRules served from 1.5, its gate on from 1.6
ANNOTATION_PREFIX = "llmctl.dev/"


# activeDeadlineSeconds is an int64 in the Kubernetes API; a plan whose deadline does not fit is refused.
INT64_MAX = 2**63 - 1


def active_deadline_seconds(plan: RunPlan, cfg: ClusterConfig) -> int:
    """The whole estimate (training + overheads) x deadline_factor + slack, in whole seconds."""
    seconds = plan.estimate.total_hours * 3600 * cfg.deadline_factor
    if not math.isfinite(seconds) or seconds + cfg.deadline_slack_seconds > INT64_MAX:
        raise ValueError(f"activeDeadlineSeconds: the plan's {plan.estimate.total_hours:.3g} hours do not fit "
                         f"Kubernetes' int64 deadline; lower --num-iterations or --ratio")
    return math.ceil(seconds) + cfg.deadline_slack_seconds


def plan_argument(plan: RunPlan) -> str:
    """The plan as one single-quoted shell word: compact ASCII JSON, `'` escaped as \\u0027."""
    text = json.dumps(plan.to_dict(), separators=(",", ":"), ensure_ascii=True)
    return "'" + text.replace("'", "\\u0027") + "'"


def entrypoint(plan: RunPlan) -> str:
    return f"{LAUNCH} --plan-json {plan_argument(plan)}"


def labels_for(plan: RunPlan, cfg: ClusterConfig, role: str | None = None) -> dict[str, str]:
    s = plan.spec
    out = {
        "app.kubernetes.io/name": "llmctl",
        "app.kubernetes.io/managed-by": "llmctl",
        PART_OF: "llmctl",
        RUN_LABEL: plan.name,
        "llmctl.dev/depth": str(s.depth),
        "llmctl.dev/gpus": str(s.gpus),
        "llmctl.dev/gpu-type": s.gpu_type,
    }
    if role:
        out["app.kubernetes.io/component"] = role
        out[ROLE_LABEL] = role
    return {**cfg.labels, **out}


def annotations_for(plan: RunPlan) -> dict[str, str]:
    e, s = plan.estimate, plan.spec
    out = {
        "llmctl.dev/estimate-dollars": f"{e.total_dollars:.2f}",
        "llmctl.dev/estimate-hours": f"{e.total_hours:.3f}",
        "llmctl.dev/price-per-gpu-hour": f"{e.price_per_gpu_hour:.2f}",
        "llmctl.dev/stages": ",".join(s.stages),
        "llmctl.dev/steps": ",".join(f"{st.name}={st.steps}" for st in plan.stages),
        "llmctl.dev/storage": plan.urls["run"],
        "llmctl.dev/plan-schema": plan.schema,
    }
    if s.budget_cap is not None:
        out["llmctl.dev/budget-cap-dollars"] = f"{s.budget_cap:.2f}"
    return out


# ---------------------------------------------------------------------------------------------
# Pod templates


def template_metadata(plan: RunPlan, cfg: ClusterConfig, role: str) -> dict:
    meta: dict = {"labels": labels_for(plan, cfg, role)}
    if cfg.pod_annotations:
        meta["annotations"] = dict(cfg.pod_annotations)
    return meta


def head_template(plan: RunPlan, cfg: ClusterConfig, extra_env: dict[str, str]) -> dict:
    resources = {"cpu": cfg.head_cpu, "memory": cfg.head_memory}
    ports = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in HEAD_PORTS]
    c = container(CONTAINERS["head"], cfg, container_env(plan.name, cfg, extra_env), resources, ports, "head")
    return {"metadata": template_metadata(plan, cfg, "head"),
            "spec": pod_spec(plan.name, cfg, c, node_selector=cfg.head_node_selector, tolerations=cfg.head_tolerations,
                              service_account=cfg.run_service_account, role="head")}


def worker_template(plan: RunPlan, cfg: ClusterConfig, gpus_per_pod: int, extra_env: dict[str, str]) -> dict:
    resources = {"cpu": str(cfg.cpu_per_gpu * gpus_per_pod), "memory": f"{cfg.memory_per_gpu_gi * gpus_per_pod}Gi",
                 "nvidia.com/gpu": str(gpus_per_pod), "ephemeral-storage": add_quantities(cfg.scratch_size, cfg.tmp_size),
                 **cfg.worker_extra_resources}
    ports = [{"name": f"llm-m{i}", "containerPort": METRICS_PORT_BASE + i, "protocol": "TCP"}
             for i in range(gpus_per_pod)]
    ports.append({"name": "metrics", "containerPort": RAY_METRICS_PORT, "protocol": "TCP"})
    # Checkpoints are staged under tempfile's directory (TMPDIR); Ray's own session files stay in /tmp, because
    # Ray also follows TMPDIR unless RAY_TMPDIR is set (ray._common.utils.get_user_temp_dir).
    env = container_env(plan.name, cfg, {"TMPDIR": SCRATCH, "RAY_TMPDIR": "/tmp", **extra_env})
    c = container(CONTAINERS["worker"], cfg, env, resources, ports, "worker")
    selector, expressions = gpu_placement(cfg, cfg.gpu_node_selectors.get(plan.spec.gpu_type, {}))
    tolerations = tuple(cfg.gpu_tolerations)
    if plan.spec.spot:  # workers only: the head (CPU, on-demand) must outlive a preemption
        spot_selector, spot_tolerations = spot_placement(cfg)
        selector, tolerations = {**selector, **spot_selector}, tolerations + spot_tolerations
    return {"metadata": template_metadata(plan, cfg, "worker"),
            "spec": pod_spec(plan.name, cfg, c, node_selector=selector, tolerations=tolerations,
                              service_account=cfg.run_service_account, role="worker", node_expressions=expressions)}


# Spot node labels and taints by provider: GKE labels spot nodes cloud.google.com/gke-spot=true (and node pools
# created with --spot may be tainted with the same key); EKS managed node groups label capacity type SPOT.
SPOT_LABELS = {"gke": {"cloud.google.com/gke-spot": "true"}, "eks": {"eks.amazonaws.com/capacityType": "SPOT"}}
SPOT_TOLERATIONS = {"gke": ({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                             "effect": "NoSchedule"},), "eks": ()}


# The termination notice a spot node's pods get, by provider: GKE gives non-system pods about 15 s of its
# 30 s graceful node shutdown (https://cloud.google.com/kubernetes-engine/docs/concepts/spot-vms); AWS's
# interruption notice is 2 minutes, of which a drain (aws-node-termination-handler / Karpenter) leaves the
# pods about 110 s. Provider "label": unknown, only lifecycle.maxGraceSeconds.
SPOT_NOTICE_SECONDS = {"gke": 15, "eks": 110}


def grace_limit(plan: RunPlan, cfg: ClusterConfig) -> tuple[int | None, bool]:
    """(the longest grace period the run's pods can count on, whether it is the spot notice): the cluster's
    maxGraceSeconds, and on spot also the provider's notice."""
    limit = cfg.max_grace_seconds
    notice = SPOT_NOTICE_SECONDS.get(cfg.spot_provider) if plan.spec.spot else None
    if notice is not None and (limit is None or notice < limit):
        return notice, True
    return limit, False


def set_grace(cluster_spec: dict, plan: RunPlan, cfg: ClusterConfig, annotations: dict) -> None:
    """The pods' grace period and preStop emergency save (trainer/preempt.py). On spot, where the notice is
    shorter than a save (GKE: ~15 s), the pods get the notice as their grace period and no preStop save:
    the run resumes from its last periodic checkpoint, as the spot estimate already assumes."""
    from trainer.preempt import grace_seconds

    limit, spot = grace_limit(plan, cfg)
    need = grace_seconds(plan)
    if spot and need > limit:
        for group in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
            group["template"]["spec"]["terminationGracePeriodSeconds"] = limit
        annotations[ANNOTATION_PREFIX + "emergency-save"] = (
            f"off: {cfg.spot_provider} spot nodes give ~{limit}s notice, a save needs ~{need}s; "
            f"resumes from the last periodic checkpoint")
        return
    set_preemption(cluster_spec, plan, limit)  # grace period + preStop save; refuses what cannot fit


def spot_placement(cfg: ClusterConfig) -> tuple[dict, tuple]:
    """(node selector, tolerations) that put workers on the configured provider's spot nodes."""
    selector = cfg.spot_node_selector if cfg.spot_provider == "label" else SPOT_LABELS[cfg.spot_provider]
    return dict(selector), SPOT_TOLERATIONS.get(cfg.spot_provider, ()) + tuple(cfg.spot_tolerations)


def elastic_replicas(plan: RunPlan, pods: int, per_pod: int) -> tuple[int, int]:
    """(minReplicas, maxReplicas) of the worker group: the pods `--min-gpus` needs, up to the plan's."""
    low = plan.spec.min_gpus or plan.spec.gpus
    return min(pods, max(1, math.ceil(low / per_pod))), pods


def teardown(cfg: ClusterConfig, release: tuple[int, int, int], *, queued: bool, elastic: bool) -> dict:
    """How the finished cluster goes away: deletionRules on KubeRay >= 1.6 (its RayJobDeletionPolicy gate is on
    by default there, alpha and off in 1.5) for a run Kueue does not manage (Kueue requires
    shutdownAfterJobFinishes, which KubeRay forbids beside deletionRules): GPU workers at once, the head after
    ttlSecondsAfterFinished. Otherwise the whole cluster after the GPU TTL. KubeRay refuses DeleteWorkers with
    autoscaling, so an elastic run deletes its cluster at the GPU TTL. Returns the RayJob spec fields."""
    keep = cfg.ttl_seconds_after_finished
    gpu_keep = min(keep, cfg.gpu_ttl_seconds_after_finished)
    if queued or release < DELETION_RULES_MIN:
        return {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": gpu_keep}
    rules = []
    for status in ("SUCCEEDED", "FAILED"):
        if not elastic:
            rules.append({"policy": "DeleteWorkers", "condition": {"jobStatus": status, "ttlSeconds": 0}})
        rules.append({"policy": "DeleteCluster",
                      "condition": {"jobStatus": status, "ttlSeconds": gpu_keep if elastic else keep}})
    # A deployment that failed without a terminal job status (deadline exceeded, submission failed).
    if not elastic:
        rules.append({"policy": "DeleteWorkers", "condition": {"jobDeploymentStatus": "Failed", "ttlSeconds": 0}})
    rules.append({"policy": "DeleteCluster",
                  "condition": {"jobDeploymentStatus": "Failed", "ttlSeconds": gpu_keep if elastic else keep}})
    return {"deletionStrategy": {"deletionRules": rules}}


def teardown_seconds(cfg: ClusterConfig, plan: RunPlan) -> int:
    """Seconds a finished run's GPU workers stay (what `teardown` renders for this config)."""
    release = kuberay_release(cfg.kuberay_version)
    elastic = bool(plan.spec.min_gpus and plan.spec.min_gpus < plan.spec.gpus)
    fields = teardown(cfg, release, queued=bool(cfg.queue), elastic=elastic)
    if "ttlSecondsAfterFinished" in fields:
        return fields["ttlSecondsAfterFinished"]
    return max(r["condition"]["ttlSeconds"] for r in fields["deletionStrategy"]["deletionRules"]
               if r["policy"] == ("DeleteCluster" if elastic else "DeleteWorkers"))


def submitter_template(plan: RunPlan, cfg: ClusterConfig) -> dict:
    """The K8s Job pod that runs `ray job submit` (KubeRay fills in the command) and then follows the logs:
    its log is the run's log (`llmctl logs`), and it outlives the Ray cluster."""
    resources_req = {"cpu": "500m", "memory": "256Mi"}
    resources_lim = {"cpu": "1", "memory": "1Gi"}  # KubeRay's default submitter limits
    c = container(SUBMITTER_CONTAINER, cfg, [{"name": "HOME", "value": "/tmp"}], resources_req, [])
    c["resources"] = {"requests": resources_req, "limits": resources_lim}
    c.pop("envFrom", None)  # the submitter talks to the Ray dashboard only: no storage credentials
    spec = pod_spec(plan.name, cfg, c, node_selector=cfg.head_node_selector, tolerations=cfg.head_tolerations)
    spec["restartPolicy"] = "Never"
    spec.pop("priorityClassName", None)
    return {"metadata": {"labels": labels_for(plan, cfg, "submitter")}, "spec": spec}


# ---------------------------------------------------------------------------------------------
# The RayJob


def build_rayjob(plan: RunPlan, cfg: ClusterConfig, *, namespace: str, extra_env: dict[str, str] | None = None,
                 ray_cluster: str | None = None) -> dict:
    """The RayJob for `plan`. `ray_cluster` runs it on an existing (warm) RayCluster instead of a new one.

    Raises LayoutError for GPU counts that leave GPUs idle, ValueError for a local-only GPU type or a queue
    combined with a warm cluster (KubeRay forbids suspend with clusterSelector).
    """
    s = plan.spec
    # Every pod reads and writes the run's storage: only protocols every node reaches (trainer/storage.py).
    require_shared(s.storage_root, "storage (--storage, or storageRoot in the cluster config)")
    require_shared(plan.urls["eval_bundle"], "core bundle (--core-bundle)")
    if GPUS[s.gpu_type].local:
        raise ValueError(f"gpu_type: {s.gpu_type} runs on this machine, not on Kubernetes (use --local)")
    pods, per_pod = worker_layout(s.gpus, cfg.gpus_per_node)
    extra_env = dict(extra_env or {})
    release = kuberay_release(cfg.kuberay_version)

    labels = labels_for(plan, cfg)
    annotations = annotations_for(plan)
    runtime_env = {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(WORKER_GROUP_START_TIMEOUT_S)}}
    spec: dict = {
        "entrypoint": entrypoint(plan),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True, width=1 << 20),
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_template(plan, cfg),
        "activeDeadlineSeconds": active_deadline_seconds(plan, cfg),
    }
    if ray_cluster:
        if cfg.queue:
            raise ValueError("queue: a run on an existing RayCluster cannot be queued by Kueue "
                             "(KubeRay forbids suspend with clusterSelector); drop --queue or --ray-cluster")
        spec["clusterSelector"] = {"ray.io/cluster": ray_cluster}
    else:
        if cfg.queue:
            labels[QUEUE_LABEL] = cfg.queue
            if cfg.kueue_priority_class:
                labels[PRIORITY_LABEL] = cfg.kueue_priority_class
            spec["suspend"] = True  # Kueue un-suspends on admission; shutdownAfterJobFinishes is required
        low, high = elastic_replicas(plan, pods, per_pod)
        elastic = low < high  # the autoscaler re-adds lost pods
        if elastic and cfg.queue and not cfg.kueue_elastic_jobs:
            raise ValueError(
                "--min-gpus on a Kueue queue: Kueue admits an autoscaling RayJob only as a sliced workload, which "
                "needs its ElasticJobsViaWorkloadSlices feature gate (alpha, Kueue >= 0.14.x); once the gate is on, "
                "set kueue.elasticJobs: true in the cluster config, or drop --min-gpus (or --queue)")
        head = head_template(plan, cfg, extra_env)
        cluster = {
            "rayVersion": cfg.ray_version,
            "enableInTreeAutoscaling": elastic,
            "headGroupSpec": {"rayStartParams": {"num-gpus": "0"}, "template": head},
            "workerGroupSpecs": [{
                "groupName": s.gpu_type.replace(".", "-"),
                "replicas": pods, "minReplicas": low, "maxReplicas": high,
                "numOfHosts": 1,
                "rayStartParams": {},  # KubeRay sets --num-gpus from the nvidia.com/gpu limit
                "template": worker_template(plan, cfg, per_pod, extra_env),
            }],
        }
        if elastic:
            # KubeRay injects its autoscaler container into the head pod: restricted security context, and the
            # API token mounted into that container only (the head pod keeps automountServiceAccountToken off).
            cluster["autoscalerOptions"] = autoscaler_options(cfg)
            head["spec"]["volumes"].append(json.loads(json.dumps(TOKEN_VOLUME)))
            if cfg.queue:
                annotations[ELASTIC_ANNOTATION] = "true"
        spec.update(teardown(cfg, release, queued=bool(cfg.queue), elastic=elastic))
        spec["rayClusterSpec"] = cluster
        set_grace(cluster, plan, cfg, annotations)
        guard_cluster_spec(cluster, cfg)  # disruption guards (cli/kube/guards.py)
        if cfg.topology:  # Kueue topology-aware placement of the workers (cli/kube/topology.py)
            from cli.kube import topology

            topology.apply(cluster["workerGroupSpecs"][0]["template"], topology.choose(pods, cfg.topology))
        if cfg.backoff_limit:
            spec["backoffLimit"] = cfg.backoff_limit
        if has(release, "spec.preRunningDeadlineSeconds"):
            spec["preRunningDeadlineSeconds"] = cfg.pre_running_deadline_seconds
        if (cfg.ray_auth == "token" and has(release, "spec.rayClusterSpec.authOptions")
                and parse_version(cfg.ray_version) >= RAY_TOKEN_AUTH_MIN):
            spec["rayClusterSpec"]["authOptions"] = {"mode": "token"}
    rayjob = {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": plan.name, "namespace": namespace, "labels": labels,
                     "annotations": annotations},
        "spec": spec,
    }
    return json.loads(json.dumps(rayjob))  # a plain tree: no shared sub-dicts, exactly what the API receives

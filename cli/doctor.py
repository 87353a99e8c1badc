"""`llmctl doctor`: a preflight a platform engineer runs once per cluster (and a user when a submit fails).

One line per check, ✓ (fine), ! (works, with a caveat) or ✗ (a submit would fail), each ✗ and ! with the fix:

  api          the API server answers, and who you are (SelfSubjectReview)
  namespace    the target namespace exists, and enforces Pod Security "restricted" (its label; a caveat if not)
  config       the chart's llmctl-config ConfigMap is present and valid (or --cluster-config)
  kuberay      KubeRay serves RayJobs, its release (read off the RayJob CRD, else kuberay.version), supported?
  kueue        when the config names a queue: Kueue serves its API, which versions, and the LocalQueue exists
  permissions  every verb `llmctl submit/status/list/logs/cancel` needs, asked with SelfSubjectAccessReview;
               the run account's progress verb with SubjectAccessReview where you may ask about others
  gpu nodes    nodes carrying each configured GPU selector, their allocatable nvidia.com/gpu and extra resources
  image        the trainer image reference is pinned

Exit 0 only when a submit would work (no ✗); 1 otherwise; 2 for bad flags. `-o json` prints
{"ok": bool, "checks": [{"name", "status": ok|warn|fail, "detail", "fix"}]} for scripts.
The checks read only; nothing is created (SelfSubject reviews are not stored by the API server).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass

from cli.flags import add_cluster_args
from cli.errors import CLIError

MARK = {"ok": "✓", "warn": "!", "fail": "✗"}
KUBERAY_INSTALL = ("helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0 -n kuberay-system "
                   "--create-namespace (https://ray-project.github.io/kuberay-helm/)")
# What `llmctl submit/status/list/logs/cancel` call in the namespace: (verb, group, resource, subresource, name).
CLI_VERBS = (
    ("create", "ray.io", "rayjobs", None, None), ("get", "ray.io", "rayjobs", None, None),
    ("list", "ray.io", "rayjobs", None, None), ("delete", "ray.io", "rayjobs", None, None),
    ("list", "", "pods", None, None), ("get", "", "pods", "log", None), ("get", "", "configmaps", None, "llmctl-config"),
)
_IMAGE = re.compile(r"(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9._/-]+(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
                    r"(?:@sha256:[0-9a-f]{64})?")


PSA_ENFORCE = "pod-security.kubernetes.io/enforce"  # Pod Security Admission's namespace label


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


class Doctor:
    def __init__(self, args):
        self.args = args
        self.checks: list[Check] = []
        self.kube = None
        self.cfg = None

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        c = Check(name, status, detail, fix)
        self.checks.append(c)
        return c

    # -- the checks, in order; a failed API check stops the rest ---------------------------------------------
    def run(self) -> list[Check]:
        if not self.check_api():
            return self.checks
        self.check_namespace()
        self.check_config()
        self.check_kuberay()
        self.check_kueue()
        self.check_topology()
        self.check_permissions()
        self.check_nodes()
        self.check_image()
        return self.checks

    def _api_exc(self):
        from kubernetes.client.rest import ApiException

        return ApiException

    def check_api(self) -> bool:
        from kubernetes import client

        from cli.kube.client import connect

        try:
            self.kube = connect(self.args)
            who = client.AuthenticationV1Api(self.kube.api_client).create_self_subject_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}, _request_timeout=(10, 30))
        except CLIError as e:
            self.add("api", "fail", str(e), "check KUBECONFIG / --context, or that the cluster is up")
            return False
        except self._api_exc() as e:
            if e.status == 401:
                self.add("api", "fail", f"the API server at {self.kube.where} rejected your credentials (401)",
                         "log in again or refresh the kubeconfig token")
                return False
            self.add("api", "warn", f"reachable ({self.kube.where}); who you are is unknown (SelfSubjectReview: "
                     f"HTTP {e.status})", "Kubernetes >= 1.28 answers SelfSubjectReview")
            return True
        except Exception as e:  # connection errors
            self.add("api", "fail", f"cannot reach the Kubernetes API: {getattr(e, 'reason', None) or e}",
                     "check KUBECONFIG / --context, or that the cluster is up")
            return False
        info = who.status.user_info if who.status else None
        user = info.username if info else "?"
        groups = [g for g in (info.groups or []) if g != "system:authenticated"] if info else []
        self.add("api", "ok", f"reachable ({self.kube.where}) as {user}"
                 + (f" (groups: {', '.join(groups)})" if groups else ""))
        return True

    def check_namespace(self) -> None:
        ns = self.kube.namespace
        try:
            obj = self.kube.core.read_namespace(ns, _request_timeout=(10, 30))
        except self._api_exc() as e:
            if e.status == 404:
                self.add("namespace", "fail", f"namespace {ns} does not exist",
                         f"kubectl create namespace {ns}, or pick one with -n")
                return
            self.add("namespace", "ok", f"{ns} (cannot read namespaces to confirm it exists; HTTP {e.status})")
            return
        # Pod Security Admission: a RayJob can ask KubeRay for any pod; "restricted" makes the API server refuse
        # privileged and root pods in the namespace (docs/security.md, the chart's podSecurity values).
        level = ((obj.metadata and obj.metadata.labels) or {}).get(PSA_ENFORCE)
        if level == "restricted":
            self.add("namespace", "ok", f"{ns} (Pod Security: restricted enforced)")
        else:
            self.add("namespace", "warn", f"{ns} does not enforce Pod Security restricted ("
                     + (f"{PSA_ENFORCE}={level}" if level else "no label") + "): a RayJob can ask for any pod",
                     f"kubectl label namespace {ns} {PSA_ENFORCE}=restricted")

    def check_config(self) -> None:
        from cli.kube.client import read_configmap
        from cli.kube.config import ClusterConfig, load_config_file
        from cli.errors import UsageError

        try:
            if self.args.cluster_config:
                self.cfg, warnings = load_config_file(self.args.cluster_config)
                source = self.args.cluster_config
            else:
                self.cfg, warnings = read_configmap(self.kube)
                source = f"ConfigMap llmctl-config in {self.kube.namespace}"
        except (CLIError, UsageError) as e:
            self.cfg = ClusterConfig()
            self.add("config", "fail", str(e), "fix the value named, then helm upgrade llmctl charts/llmctl")
            return
        missing = [w for w in warnings if "no ConfigMap" in w]
        if missing:
            self.add("config", "fail", f"no ConfigMap llmctl-config in namespace {self.kube.namespace} (runs would "
                     f"use built-in defaults)", f"helm install llmctl charts/llmctl -n {self.kube.namespace}")
        elif warnings:
            self.add("config", "warn", f"{source}: " + "; ".join(warnings), "upgrade llmctl to the chart's version")
        else:
            self.add("config", "ok", f"{source} is valid (storage {self.cfg.storage_root}"
                     + (f", queue {self.cfg.queue}" if self.cfg.queue else "") + ")")

    def check_kuberay(self) -> None:
        from cli.kube.client import permission, served_kuberay_release
        from cli.kube.versions import fmt, parse_version, supported, supported_range

        try:
            found, source = served_kuberay_release(self.kube)
        except self._api_exc() as e:
            self.add("kuberay", "fail", f"cannot read the RayJob schema (HTTP {e.status})", KUBERAY_INSTALL)
            return
        if source == "absent":
            self.add("kuberay", "fail", "KubeRay is not installed (no rayjobs.ray.io CRD)", KUBERAY_INSTALL)
            return
        if found is not None or source == "old":
            if found is None or not supported(found):
                self.add("kuberay", "fail", f"the RayJob CRD is from KubeRay {fmt(found) if found else '< 1.3'}, "
                         f"outside the supported {supported_range()}", KUBERAY_INSTALL)
            else:
                self.add("kuberay", "ok", f"KubeRay {fmt(found[:2])}{' or newer' if found[:2] == (1, 7) else ''} "
                         f"(read off {source}; supported: {supported_range()})")
            return
        # neither the CRD nor the OpenAPI document is readable
        need = permission("get", "customresourcedefinitions", "apiextensions.k8s.io", None)
        if self.cfg and self.cfg.kuberay_version:
            ok = supported(parse_version(self.cfg.kuberay_version))
            self.add("kuberay", "ok" if ok else "fail", f"KubeRay {self.cfg.kuberay_version} per kuberay.version "
                     f"(the RayJob schema is not readable: {need})",
                     "" if ok else f"KubeRay {supported_range()} is supported: {KUBERAY_INSTALL}")
            return
        self.add("kuberay", "warn", f"release unknown (the RayJob schema is not readable: {need}, nor /openapi/v3): "
                 f"submit renders for KubeRay 1.3, without preRunningDeadlineSeconds",
                 "set kuberay.version in the chart values (config.kuberay.version), or rbac.clusterScope=true")

    def check_kueue(self) -> None:
        from kubernetes import client

        from cli.kube.versions import kueue_release_from_api

        queue = self.cfg.queue if self.cfg else None
        if not queue:
            self.add("kueue", "ok", "no queue configured: runs start without Kueue")
            return
        custom = client.CustomObjectsApi(self.kube.api_client)
        served = []
        for v in ("v1beta1", "v1beta2"):
            try:
                custom.get_api_resources("kueue.x-k8s.io", v, _request_timeout=(10, 30))
                served.append(v)
            except self._api_exc():
                pass
        if not served:
            self.add("kueue", "fail", f"the config names queue {queue}, but Kueue is not installed "
                     f"(kueue.x-k8s.io is not served)", "install Kueue 0.13 to 0.19, or set config.queue to ''")
            return
        version = served[-1]
        storage = None
        try:  # the storage version tells 0.15 (v1beta1) from 0.16+ (v1beta2), where the CRD is readable
            from cli.kube.client import read_crd

            crd = read_crd(self.kube, "localqueues.kueue.x-k8s.io") or {}
            storage = next((v["name"] for v in crd.get("spec", {}).get("versions", []) if v.get("storage")), None)
        except self._api_exc():
            pass
        release = kueue_release_from_api(served, storage)
        try:
            custom.get_namespaced_custom_object("kueue.x-k8s.io", version, self.kube.namespace, "localqueues", queue,
                                                _request_timeout=(10, 30))
        except self._api_exc() as e:
            if e.status == 404:
                self.add("kueue", "fail", f"Kueue {release} serves {', '.join(served)}, but "
                         f"LocalQueue {queue} does not exist in {self.kube.namespace}: runs would wait forever",
                         "helm upgrade llmctl charts/llmctl --set kueue.localQueue.create=true")
                return
            self.add("kueue", "warn", f"Kueue {release} ({', '.join(served)}); cannot read "
                     f"LocalQueue {queue} (HTTP {e.status})", "")
            return
        self.add("kueue", "ok", f"Kueue {release} serves {', '.join(served)}; "
                 f"LocalQueue {queue} exists")

    def check_topology(self) -> None:
        """Kueue topology-aware scheduling: a Topology with the configured levels and a flavor naming it."""
        from cli.kube.topology import doctor_lines

        if self.cfg is None or not (self.cfg.queue or self.cfg.topology):
            return  # no Kueue in play: nothing to place
        if (line := doctor_lines(self.kube, self.cfg)) is not None:
            self.add("topology", *line)

    def check_permissions(self) -> None:
        from kubernetes import client

        from cli.kube.client import permission

        authz = client.AuthorizationV1Api(self.kube.api_client)
        ns = self.kube.namespace
        missing = []
        for verb, group, resource, sub, name in CLI_VERBS:
            attrs = {"namespace": ns, "verb": verb, "group": group, "resource": resource}
            if sub:
                attrs["subresource"] = sub
            if name:
                attrs["name"] = name
            review = authz.create_self_subject_access_review(
                {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                 "spec": {"resourceAttributes": attrs}}, _request_timeout=(10, 30))
            if not review.status.allowed:
                missing.append(permission(verb, f"{resource}/{sub}" if sub else resource, group, ns))
        if missing:
            self.add("permissions", "fail", "missing: " + "; ".join(missing),
                     f"bind the chart's Role: helm upgrade llmctl charts/llmctl -n {ns} "
                     f"--set rbac.subjects[0].kind=User,rbac.subjects[0].name=<you>")
        else:
            self.add("permissions", "ok", f"submit, status, list, logs, cancel allowed in {ns}")
        account = self.cfg.run_service_account if self.cfg else None
        if account:
            self._check_run_account(authz, ns, account)

    def _check_run_account(self, authz, ns: str, account: str) -> None:
        from cli.kube.client import permission

        user = f"system:serviceaccount:{ns}:{account}"
        try:
            review = authz.create_subject_access_review(
                {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                 "spec": {"user": user, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
                          "resourceAttributes": {"namespace": ns, "verb": "patch", "group": "ray.io",
                                                 "resource": "rayjobs"}}}, _request_timeout=(10, 30))
        except self._api_exc():
            self.add("run account", "warn", f"{account}: cannot check its permissions (asking about another subject "
                     f"needs {permission('create', 'subjectaccessreviews', 'authorization.k8s.io', None)})", "")
            return
        if review.status.allowed:  # runs report to their storage; an old chart's Role is a needless grant
            self.add("run account", "warn", f"{account} may patch rayjobs, which no run needs any more (progress "
                     f"and spend go to the run's storage)", f"helm upgrade llmctl charts/llmctl -n {ns} (this chart "
                     f"version ships no Role for the run account)")
        else:
            self.add("run account", "ok", f"{account} holds no RayJob permissions (runs need none)")

    def worker_pod(self, gpu: str) -> dict | None:
        """The pod spec of one worker of a run on `gpu` as `llmctl submit` renders it for this config (a whole node's
        GPUs); None when this config cannot render one (an unknown GPU type)."""
        from cli.kube.rayjob import build_rayjob
        from trainer.plan import RunSpec, plan

        try:
            p = plan(RunSpec(depth=2, gpus=self.cfg.gpus_per_node, gpu_type=gpu, stages=("pretrain",),
                             num_iterations=1, storage_root=self.cfg.storage_root, name="doctor-fit",
                             namespace=self.kube.namespace))
            rj = build_rayjob(p, self.cfg, namespace=self.kube.namespace)
            return rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        except Exception:  # noqa: BLE001 - a type this config cannot plan is reported by the label check
            return None

    def check_nodes(self) -> None:
        from cli.kube.client import permission

        cfg = self.cfg
        try:
            nodes = self.kube.core.list_node(_request_timeout=(10, 60))
        except self._api_exc() as e:
            self.add("gpu nodes", "warn", f"cannot list nodes (HTTP {e.status}; needs "
                     f"{permission('list', 'nodes', '', None)}): whether a worker pod fits a node is not checked",
                     "rbac.clusterScope=true in the chart, or run doctor as a cluster admin")
            return
        from kubernetes.utils import parse_quantity  # Kubernetes' own quantity parser: "10" > "9", "1k" is 1000

        def amount(node: dict, res: str):
            qty = ((node.get("status") or {}).get("allocatable") or {}).get(res)
            try:
                return parse_quantity(qty) if qty not in (None, "") else 0
            except ValueError:
                return 0  # a node advertising nonsense advertises nothing usable

        items = self.kube.api_client.sanitize_for_serialization(nodes).get("items", [])
        found, problems = [], []
        for gpu, selector in sorted((cfg.gpu_node_selectors or {}).items()):
            matching = [n for n in items if all((n["metadata"].get("labels") or {}).get(k) == v
                                                for k, v in selector.items())]
            if not matching:
                continue
            most = max(amount(n, "nvidia.com/gpu") for n in matching)
            if most == 0:
                problems.append(f"{gpu}: {len(matching)} node(s) labelled but none has allocatable nvidia.com/gpu "
                                f"(is the NVIDIA device plugin running?)")
                continue
            sel = ",".join(f"{k}={v}" for k, v in selector.items())
            line = f"{gpu}: {len(matching)} node(s) {sel}, {most} GPUs allocatable"
            if most < cfg.gpus_per_node:
                problems.append(f"{gpu}: nodes have {most} GPUs but workers.gpusPerNode is {cfg.gpus_per_node}")
            for res, qty in sorted(cfg.worker_extra_resources.items()):
                have = max(amount(n, res) for n in matching)
                if not have:
                    problems.append(f"{gpu}: runs request {res} {qty} but no {gpu} node advertises it (install its "
                                    f"device plugin, e.g. the EFA or RDMA shared device plugin)")
                elif have < parse_quantity(qty):
                    problems.append(f"{gpu}: runs request {res} {qty} per worker pod but {gpu} nodes advertise at "
                                    f"most {have}")
                else:
                    line += f", {res} {have}"
            pod = self.worker_pod(gpu)
            if pod is not None and most >= cfg.gpus_per_node:
                want = pod_requests(pod)
                fits, short = [], []
                for n in matching:
                    why = misfit(n, pod, want)
                    (short if why else fits).append(f"{n['metadata']['name']} ({why})" if why else n["metadata"]["name"])
                asked = ", ".join(f"{r} {fmt_quantity(r, q)}" for r, q in want.items())
                if fits:
                    line += f"; a worker pod ({asked}) fits {', '.join(fits)}"
                else:
                    problems.append(f"{gpu}: a worker pod requests {asked}, which no {gpu} node holds: "
                                    + "; ".join(short))
            found.append(line)
        if problems:
            fix = ("size workers to the nodes' allocatable: config.workers.cpuPerGpu, memoryPerGpuGi, scratchSize "
                   "and tmpSize (kubectl describe node shows Allocatable); docs/kubernetes.md (GPU nodes)")
            self.add("gpu nodes", "fail", "; ".join(problems + found), fix)
        elif not found:
            labels = sorted({k for s in (cfg.gpu_node_selectors or {}).values() for k in s})
            self.add("gpu nodes", "fail", f"no node carries a configured GPU selector (labels {', '.join(labels)})",
                     "set config.workers.gpuLabels (gke or gpu-operator) or config.workers.nodeSelectors to what "
                     "`kubectl get nodes --show-labels` shows")
        else:
            self.add("gpu nodes", "ok", "; ".join(found))

    def check_image(self) -> None:
        image = self.cfg.image
        if not _IMAGE.fullmatch(image):
            self.add("image", "fail", f"{image!r} is not an image reference", "set image.repository / image.tag")
        elif "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            self.add("image", "warn", f"{image} is not pinned (no tag, or :latest): pods of one run may differ",
                     "pin a tag or digest (image.tag)")
        else:
            self.add("image", "ok", f"{image} (its Ray must be {self.cfg.ray_version}, config.rayVersion)")


def pod_requests(pod: dict) -> dict:
    """What the scheduler counts for a pod, resource -> Decimal: the sum of its containers' requests (a limit
    without a request is the request too, as the API server defaults it), or the largest init container's
    when that is more (kubernetes pkg/api/v1/resource PodRequests)."""
    from decimal import Decimal

    from kubernetes.utils import parse_quantity

    def one(c: dict) -> dict:
        res = c.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        return {k: parse_quantity(v) for k, v in merged.items()}

    total: dict = {}
    for c in pod.get("containers") or []:
        for k, v in one(c).items():
            total[k] = total.get(k, Decimal(0)) + v
    for c in pod.get("initContainers") or []:
        for k, v in one(c).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    return dict(sorted(total.items(), key=lambda kv: (kv[0] != "cpu", kv[0] != "memory", kv[0])))


def _tolerated(taint: dict, tolerations: list[dict]) -> bool:
    if taint.get("effect") not in ("NoSchedule", "NoExecute"):
        return True  # PreferNoSchedule does not keep a pod off
    for t in tolerations or []:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def misfit(node: dict, pod: dict, want: dict) -> str:
    """Why `pod` (requests `want`) cannot go on `node` by its labels, taints and allocatable; '' when it fits."""
    from kubernetes.utils import parse_quantity

    labels = node["metadata"].get("labels") or {}
    for k, v in (pod.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return f"no label {k}={v}"
    for taint in (node.get("spec") or {}).get("taints") or []:
        if not _tolerated(taint, pod.get("tolerations")):
            return f"taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')} not tolerated"
    alloc = (node.get("status") or {}).get("allocatable") or {}
    short = [f"{r} {fmt_quantity(r, parse_quantity(alloc.get(r, '0')))} < {fmt_quantity(r, q)}"
             for r, q in want.items() if parse_quantity(alloc.get(r, "0")) < q]
    return "allocatable " + ", ".join(short) if short else ""


def fmt_quantity(resource: str, q) -> str:
    """A Decimal quantity for people: CPUs as a number, bytes in Gi."""
    if resource == "memory" or resource == "ephemeral-storage" or resource.endswith("storage"):
        gi = q / (1024 ** 3)
        return f"{gi:.0f}Gi" if gi == gi.to_integral_value() else f"{gi:.1f}Gi"
    return f"{q.normalize():f}" if q == q.to_integral_value() else f"{q:.1f}"


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        line = f"{MARK[c.status]} {c.name:<{width}}  {c.detail}"
        if c.fix and c.status != "ok":
            line += f" — fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines)


def cmd_doctor(args) -> int:
    if getattr(args, "gpu_health", False):  # GPU nodes with problems (cli/gpuhealth.py)
        from cli.gpuhealth import cmd_gpu_health

        return cmd_gpu_health(args)
    if args.network:  # the interconnect check runs as a RayJob (cli/netcheck.py)
        from cli.netcheck import cmd_network

        return cmd_network(args)
    checks = Doctor(args).run()
    ok = not any(c.status == "fail" for c in checks)
    if args.output == "json":
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2, ensure_ascii=False))
    else:
        print(render(checks))
        print("a submit would work" if ok else "a submit would fail: fix the ✗ lines above",
              file=sys.stderr)
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check a cluster is ready for llmctl runs (API, KubeRay, Kueue, RBAC, GPUs)",
                       description="Check, one line each, what `llmctl submit` needs from this cluster and "
                       "namespace: the API and who you are, KubeRay and its release, Kueue when a queue is "
                       "configured, your permissions, GPU nodes, the chart's ConfigMap and the trainer image. "
                       "Exit 0 only when a submit would work.",
                       epilog="Examples:\n  llmctl doctor -n team\n  llmctl doctor -o json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--cluster-config", metavar="FILE",
                   help="check this cluster config file (the ConfigMap's config.yaml shape) instead of the ConfigMap")
    p.add_argument("--gpu-health", action="store_true", help="list GPU nodes with problems: GPUs withdrawn by "
                   "the device plugin, remediation conditions and taints, Xid events (exit 1 if any)")
    g = p.add_argument_group("interconnect check (a short RayJob across the worker pods)")
    g.add_argument("--network", action="store_true", help="measure all-reduce bus bandwidth and latency over --gpus")
    g.add_argument("--gpus", type=int, help="GPUs in the check (8 per worker pod; > 8 crosses nodes)")
    g.add_argument("--expect-gbs", type=float, help="expected bus bandwidth in GB/s (default: NVLink on one "
                   "node, the default fabric across nodes; trainer/plan/interconnect.py)")
    g.add_argument("--dry-run", action="store_true", help="print the check's RayJob instead of creating it")
    g.add_argument("--timeout", type=float, metavar="SECONDS", help="how long to wait for the check's result "
                   "(default: its RayJob's deadline + 60 s)")
    g.add_argument("--no-wait", action="store_true", help="create the check's RayJob and return (its log has the result)")
    add_cluster_args(p)
    p.set_defaults(func=cmd_doctor)

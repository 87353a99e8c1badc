"""The Kubernetes client: namespace resolution, one connected client per command, API errors in words, the
cluster config as the namespace holds it, and the KubeRay release the cluster serves.

The cluster config's shape (defaults, the `llmctl-config` ConfigMap, validation) is cli/kube/config.py; the
version matrix is cli/kube/versions.py. The kubernetes package is imported only inside the functions that talk to the
API server (it takes ~0.5 s to import); namespace resolution reads kubeconfig files with PyYAML so `--dry-run`
never imports it. API failures become one actionable line (`CLIError`): 401/403 say who lacks which verb and
the exact RBAC rule, 404 tells a missing run from a missing namespace or a missing KubeRay CRD, connection
errors name the server and the context. Writes of custom resources go with `fieldValidation=Strict`, so a
field the installed KubeRay does not know is a loud 400 instead of a silent prune.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cli.errors import CLIError
from cli.kube.config import CONFIGMAP, ClusterConfig, config_from_configmap

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")  # a pod's own namespace


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
             group: str = "", exists_hint: str | None = None, **kw):
        """Run one API call; known failures become a CLIError naming what to do next."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        kw.setdefault("_request_timeout", (10, 60))
        fname = getattr(fn, "__name__", "")
        if fname.startswith(("create_", "patch_", "replace_")) and "custom_object" in fname:
            # a field the installed KubeRay does not serve is a 400 naming it, not a silent prune (the default
            # Warn; AS endpoints/handlers/create.go, https://kubernetes.io/docs/reference/using-api/api-concepts/
            # #field-validation)
            kw.setdefault("field_validation", "Strict")
        try:
            return fn(*a, **kw)
        except ApiException as e:
            raise api_error(e, what=what, verb=verb, resource=resource, name=name, group=group,
                            namespace=None if "_cluster_" in fname else self.namespace,
                            exists_hint=exists_hint) from None
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


# What the chart's objects grant, for 403 hints: (verb, group, resource) -> where it comes from. The same rules as
# charts/llmctl/templates/role.yaml and clusterrole.yaml (tests/cli/test_real_cluster.py checks each against the
# API server's own answer for a user bound only by them).
_CHART_ROLE = {
    *((v, "ray.io", r) for r in ("rayjobs", "rayservices") for v in ("create", "get", "list", "watch", "delete")),
    ("list", "ray.io", "rayclusters"),
    ("get", "", "pods"), ("list", "", "pods"), ("watch", "", "pods"), ("get", "", "pods/log"),
    ("get", "", "configmaps"), ("patch", "", "configmaps"),  # llmctl-config only; patch: doctor --network
    ("get", "", "events"), ("list", "", "events"),  # status: why pods and Ray clusters do not start
    ("get", "kueue.x-k8s.io", "localqueues"), ("list", "kueue.x-k8s.io", "localqueues"),
    ("get", "kueue.x-k8s.io", "workloads"), ("list", "kueue.x-k8s.io", "workloads"),  # status: why Kueue waits
}
_CHART_CLUSTER_ROLE = {
    *((v, "ray.io", r) for r in ("rayjobs", "rayservices", "rayclusters") for v in ("list", "watch")),
    ("list", "", "nodes"), ("get", "apiextensions.k8s.io", "customresourcedefinitions"),
}


def permission(verb: str, resource: str, group: str, namespace: str | None) -> str:
    """The exact RBAC rule a request needs, in words: 'list on rayjobs.ray.io at cluster scope'."""
    full = f"{resource}.{group}" if group else resource
    return f"{verb} on {full} " + (f"in namespace {namespace}" if namespace else "at cluster scope")


def forbidden_hint(verb: str, resource: str, group: str, namespace: str | None) -> str:
    """Which of the chart's objects grants the permission, and how to bind it (or that none does)."""
    need = permission(verb, resource, group, namespace)
    if namespace is None:
        if (verb, group, resource) in _CHART_CLUSTER_ROLE:
            return (f"it needs {need}, which only a ClusterRole bound by a ClusterRoleBinding grants; ask a cluster "
                    f"admin to install the chart with --set rbac.clusterScope=true (and your user in rbac.subjects)")
        return f"it needs {need} (a ClusterRole + ClusterRoleBinding); the llmctl chart does not grant it"
    if (verb, group, resource) in _CHART_ROLE:
        return (f"it needs {need}, which the llmctl chart's Role grants; ask an admin of namespace {namespace} "
                f"to bind you: helm upgrade --install llmctl charts/llmctl -n {namespace} "
                f"--set rbac.subjects[0].kind=User,rbac.subjects[0].name=<you>")
    return f"it needs {need}; the llmctl chart's Role does not grant it"


def api_error(e, *, what: str, verb: str, resource: str, name: str | None, group: str,
              namespace: str | None, exists_hint: str | None = None) -> CLIError:
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
    if e.status == 403 and message.startswith("admission webhook"):
        # A webhook (Kueue's vrayjob.kb.io, ...) refused the object itself: no permission would help.
        who = "Kueue" if "kb.io" in message or "kueue" in message.lower() else "an admission webhook"
        return CLIError(f"cannot {what}: {who} refused it ({message}); this is not a permission problem: change "
                        f"what is sent (see docs/kubernetes.md, Kueue)")
    if e.status == 403 and "violates PodSecurity" in message:
        return CLIError(f"cannot {what}: Pod Security admission refused it ({message}); the namespace's "
                        f"pod-security.kubernetes.io/enforce level forbids what the pod asks for")
    if e.status == 403:
        return CLIError(f"cannot {what}: forbidden ({message}); {forbidden_hint(verb, resource, group, namespace)}")
    if e.status == 404:
        if details.get("kind") == "namespaces":  # create in a missing namespace (namespace lifecycle admission)
            return CLIError(f"cannot {what}: namespace {details.get('name') or namespace} does not exist; check -n "
                            f"and the kubeconfig context's namespace (kubectl get namespaces)")
        if group == "ray.io" and not details.get("name"):
            return CLIError(f"cannot {what}: the {full} API is not served by this cluster; KubeRay is not "
                            f"installed (install the kuberay-operator chart, a release from 1.3 to 1.7)")
        if name:
            return CLIError(f"cannot {what}: no {resource[:-1]} {name!r} in namespace {namespace}; "
                            f"see `llmctl list -n {namespace}`")
        return CLIError(f"cannot {what}: {message}")
    if e.status == 400 and "strict decoding error" in message:
        return CLIError(f"cannot {what}: the installed KubeRay does not serve a field llmctl sent ({message}); set "
                        f"kuberay.version in the cluster config to the operator's release, or upgrade KubeRay")
    if e.status == 409:
        if message.startswith("object is being deleted"):
            return CLIError(f"cannot {what}: {resource[:-1]} {name!r} in namespace {namespace} is still being "
                            f"deleted (KubeRay stops its Ray job first); try again in a minute")
        return CLIError(f"cannot {what}: {resource[:-1]} {name!r} already exists in namespace {namespace}; "
                        + (exists_hint or f"`llmctl status {name}` shows it, or pass --name for a new run"))
    if e.status == 422:
        return CLIError(f"cannot {what}: the API server rejected the {resource[:-1]}: {message}")
    if resource == "pods/log" and e.status >= 500 and ("dial tcp" in message or "/containerLogs/" in message):
        # the API server proxies logs from the node's kubelet (port 10250); it could not reach it
        return CLIError(f"cannot {what}: the API server could not reach the node's kubelet for it ({message}); "
                        f"the node may be down or unreachable from the control plane (kubectl get nodes)")
    return CLIError(f"cannot {what}: {message} (HTTP {e.status})")


def read_config(kube: Kube) -> tuple[ClusterConfig, list[str]]:
    """The namespace's `llmctl-config` (built-in defaults, with a warning, when the chart is not installed), with
    the KubeRay release the cluster serves filled in (discover_kuberay)."""
    cfg, warnings = read_configmap(kube)
    cfg, more = discover_kuberay(kube, cfg)
    return cfg, warnings + more


def read_configmap(kube: Kube) -> tuple[ClusterConfig, list[str]]:
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
    cfg, warnings = config_from_configmap(kube.api_client.sanitize_for_serialization(cm))
    return cfg, warnings


def read_crd(kube: Kube, name: str) -> dict | None:
    """GET one CustomResourceDefinition; None when absent. 403 propagates as ApiException."""
    from kubernetes.client.rest import ApiException

    from kubernetes import client

    try:
        crd = client.ApiextensionsV1Api(kube.api_client).read_custom_resource_definition(
            name, _request_timeout=(10, 60))
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return kube.api_client.sanitize_for_serialization(crd)


def read_rayjob_openapi(kube) -> dict | None:
    """The served ray.io/v1 RayJob schema from the API server's OpenAPI v3 document (GET /openapi/v3/apis/ray.io/v1),
    as a CRD-shaped dict for kuberay_release_from_crd; None when ray.io/v1 is not published.

    Every authenticated user may read /openapi/* (the system:discovery ClusterRole, bound to
    system:authenticated), so a user bound only by the chart's Role learns the installed KubeRay release here
    when the CRD itself is not readable. The document holds each CRD's structural schema as served."""
    from kubernetes.client.rest import ApiException

    api = kube.api_client
    method, url, headers, body, post = api.param_serialize("GET", "/openapi/v3/apis/ray.io/v1",
                                                           header_params={"Accept": "application/json"},
                                                           auth_settings=["BearerToken"])
    try:
        raw = api.call_api(method, url, header_params=headers, _request_timeout=(10, 60))
        raw.read()
        resp = api.response_deserialize(raw, {"200": "object"}).data
    except ApiException as e:
        if e.status in (401, 403, 404):
            return None
        raise
    schemas = ((resp or {}).get("components") or {}).get("schemas") or {}
    for schema in schemas.values():
        gvk = (schema.get("x-kubernetes-group-version-kind") or [{}]) if isinstance(schema, dict) else [{}]
        if any(g.get("group") == "ray.io" and g.get("version") == "v1" and g.get("kind") == "RayJob" for g in gvk):
            return {"spec": {"versions": [{"name": "v1", "served": True, "schema": {"openAPIV3Schema": schema}}]}}
    return None


def served_kuberay_release(kube) -> tuple[tuple[int, int, int] | None, str]:
    """(the lowest KubeRay release consistent with the served RayJob schema, where it was read). Read off the
    RayJob CRD where the user may, else off the published OpenAPI v3 schema (open to every authenticated
    user). (None, "absent") when ray.io/v1 RayJobs are not served; (None, "old") for a CRD older than 1.3.
    Errors other than 401/403/404 raise ApiException."""
    from kubernetes.client.rest import ApiException

    from cli.kube.versions import kuberay_release_from_crd

    source = "the RayJob CRD"
    try:
        crd = read_crd(kube, "rayjobs.ray.io")
    except ApiException as e:
        if e.status not in (401, 403):
            raise
        crd, source = read_rayjob_openapi(kube), "the API server's OpenAPI schema"
        if crd is None:
            return None, "unreadable"
    if crd is None:
        return None, "absent"
    found = kuberay_release_from_crd(crd)
    return (found, source) if found else (None, "old")


def discover_kuberay(kube: Kube, cfg: ClusterConfig) -> tuple[ClusterConfig, list[str]]:
    """The config with `kuberay_version` set to the release the cluster serves (read off the RayJob CRD, or where
    that is not readable off the published OpenAPI schema), falling back to the configured `kuberay.version`,
    else to the oldest supported release, with a warning."""
    from kubernetes.client.rest import ApiException

    from cli.kube.versions import KUBERAY_OLDEST, fmt, parse_version

    try:
        found, source = served_kuberay_release(kube)
    except ApiException as e:
        raise api_error(e, what="read the RayJob CRD", verb="get", resource="customresourcedefinitions",
                        name="rayjobs.ray.io", group="apiextensions.k8s.io", namespace=None) from None
    if source == "absent":
        return cfg, []  # KubeRay is not installed: the create says so
    if source == "unreadable":
        if cfg.kuberay_version:
            return cfg, []
        need = permission("get", "customresourcedefinitions", "apiextensions.k8s.io", None)
        return cfg.replace(kuberay_version=fmt(KUBERAY_OLDEST)), [
            f"cannot read the RayJob schema to learn the KubeRay release ({need} is not granted and /openapi/v3 "
            f"is not readable): rendering for KubeRay {fmt(KUBERAY_OLDEST)}, without newer fields such as "
            f"preRunningDeadlineSeconds; set kuberay.version in the cluster config (or rbac.clusterScope=true)"]
    if found is None:
        return cfg.replace(kuberay_version=fmt(KUBERAY_OLDEST)), [
            "the RayJob CRD predates KubeRay 1.3, which llmctl does not support; upgrade the operator"]
    warnings = []
    if cfg.kuberay_version and parse_version(cfg.kuberay_version)[:2] != found[:2]:
        warnings.append(f"kuberay.version is {cfg.kuberay_version} in the cluster config, but the cluster serves the "
                        f"RayJob schema of KubeRay {fmt(found)}: using {fmt(found)}")
    return cfg.replace(kuberay_version=".".join(map(str, found))), warnings

"""Where runs go: the Kubernetes client, namespace resolution, API errors, and what the cluster runs.

The cluster config itself (defaults, the `llmctl-config` ConfigMap's shape, validation) is cli/clusterconfig.py;
its names are re-exported here. The kubernetes package is imported only inside the functions that talk to the
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

from cli.clusterconfig import (CONFIG_KEY, CONFIGMAP, DEFAULT_GPU_NODE_SELECTORS, DEFAULT_GPU_TOLERATIONS,  # noqa: F401
                               GPU_LABELS, GPU_PRODUCT_LABEL, IMAGE, RAY_VERSION, ClusterConfig,
                               config_from_configmap, default_gpu_node_selectors, load_config_file)
from cli.main import CLIError, UsageError

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


# ---------------------------------------------------------------------------------------------
# Flags shared by every command that talks to a cluster


def add_cluster_args(p) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else 'default')")
    g.add_argument("--context", help="kubeconfig context (default: the current context)")
    g.add_argument("--kubeconfig", help="kubeconfig file(s), ':'-separated (default: $KUBECONFIG or ~/.kube/config)")


def add_version_args(g) -> None:
    """`submit --kuberay-version X.Y`: render for that KubeRay release without asking the cluster (wired by
    cli/jobs.py's submit parser; `version_flags` turns it into a config change)."""
    g.add_argument("--kuberay-version", metavar="X.Y", help="render for this KubeRay release (default: read "
                   "from the cluster's CRDs, else kuberay.version in the cluster config, else the newest supported)")


def version_flags(args) -> dict:
    """Config changes from add_version_args' flags, checked: a bad or unsupported version is a UsageError."""
    from cli.kubeversions import kuberay_release

    value = getattr(args, "kuberay_version", None)
    if value is None:
        return {}
    try:
        kuberay_release(value)
    except ValueError as e:
        raise UsageError(f"--kuberay-version: {e}") from None
    return {"kuberay_version": value}


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


# ---------------------------------------------------------------------------------------------
# Progress reports from inside a run


PROGRESS_ANNOTATION = "llmctl.dev/progress"


def report_progress(progress: dict, *, name: str | None = None, namespace: str | None = None,
                    kubeconfig: str | None = None) -> None:
    """Called by the run (rank 0, every few minutes): merge-patch its RayJob's progress annotation.

    `progress` keys read by `llmctl status`: stage, step, steps, tokens, cost_dollars, eta_seconds (all
    optional). Needs the head pod's service account (the chart's `llmctl-run`, set as `runServiceAccount`)
    and the env the RayJob sets: LLMCTL_RUN, LLMCTL_NAMESPACE. Errors propagate: the caller decides whether
    a failed report matters (it should not stop training).
    """
    import datetime

    from kubernetes import client, config

    name = name or os.environ["LLMCTL_RUN"]
    namespace = namespace or os.environ.get("LLMCTL_NAMESPACE") or IN_CLUSTER_NAMESPACE.read_text().strip()
    conf = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        config.load_incluster_config(client_configuration=conf)
    else:  # outside a cluster (tests, a laptop): the kubeconfig
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"), client_configuration=conf,
                                persist_config=False)
    body = dict(progress, updated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    patch = {"metadata": {"annotations": {PROGRESS_ANNOTATION: json.dumps(body, sort_keys=True)}}}
    api = client.CustomObjectsApi(client.ApiClient(conf))
    api.patch_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name, patch,
                                       _content_type="application/merge-patch+json", _request_timeout=(10, 30))

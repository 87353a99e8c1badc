"""A strict stand-in for the Kubernetes API server on loopback, for llmctl's commands; the real kubernetes client
talks to it.

What it is kept for, now that tests/controlplane/ runs a real control plane (`real_cluster`; llmctl's commands
against it: tests/cli/test_real_cluster.py): only what that cluster cannot express.
  - Every supported KubeRay release's server-side behaviour: the CRDs of 1.3, 1.4, 1.5 and 1.7 (strict-field 400s,
    pruning, schema 422s per release); the real cluster serves KubeRay 1.6 only.
  - Every supported Kueue release's API versions (0.13/0.14 v1beta1 only, 0.15 conversion, 0.16+ v1beta2); the
    real cluster runs 0.17.
  - Job states that a Ray dashboard drives (RUNNING, SUCCEEDED, retries, deadlines; `status_script`): the real
    operator polls a dashboard that does not exist there, so its K8sJobMode runs fail ~30 s after the submitter.
  - Pod logs and containers waiting to start (kwok neither serves logs nor shows ContainerCreating), a finalizer
    held while the operator stops a job (`finalize_after`), and a cluster that hides /openapi/v3.
  - Exact request records (`requests`): that refusals send nothing, and what each command sends.
Retired to the real cluster: RBAC of the chart's Role and opt-in ClusterRole for `list -A`, Kueue admission and
quota, Pod Security, scheduling on node sizes, the operator's pods and services.
 Each behaviour follows the server's documented or coded behaviour, cited next to the code
(AS = kubernetes/apiserver, AM = kubernetes/apimachinery, AX = kubernetes/apiextensions-apiserver, all at
v0.36.3; CON = https://kubernetes.io/docs/reference/using-api/api-concepts/; RBAC =
https://kubernetes.io/docs/reference/access-authn-authz/rbac/):

- REST paths and wire format for ConfigMaps, Pods (pods/log, `follow` streams), Nodes, Namespaces, RayJobs
  (the KubeRay release under test), Kueue LocalQueue/ClusterQueue/ResourceFlavor (the Kueue release under test,
  each served API version), CRDs (`apiextensions.k8s.io/v1`, rebuilt from tests/crds), API discovery of a group,
  SelfSubjectReview and SelfSubjectAccessReview.
- Field validation of custom resources against the release's CRD schema: `fieldValidation=Strict` -> 400 naming
  each unknown field, Warn (the default) -> pruned + a `Warning: 299` header per field, Ignore -> pruned.
  Schema violations -> 422 Invalid.
- RBAC from Role/ClusterRole/RoleBinding/ClusterRoleBinding objects (e.g. the chart's own, `load_rbac`) for each
  token's user: the CLI user or a pod's service account. Without `rbac` everything is allowed (plus `forbid`).
- Deletion keeps objects with finalizers (deletionTimestamp set) until the finalizers go; the simulated KubeRay
  operator adds `ray.io/rayjob-finalizer` to every RayJob it sees, and `reconcile()` lets it finish deletions.
- 404 `namespaces "x" not found` on create in a missing namespace; 409 AlreadyExists (prefixed "object is being
  deleted: " while the old one terminates); 409 Conflict on a stale resourceVersion; 422 for a finalizer added
  during deletion; Foreground/Orphan deletion add their garbage-collector finalizer; 400 for logs of a container
  waiting to start; `dryRun=All` runs everything but persistence.
- Custom resources have a status subresource: writes to the main resource keep the old status, `/status` writes
  change only it, and a spec change bumps `metadata.generation`.
- With Kueue installed, its RayJob webhooks: a RayJob naming a queue is created suspended, and one that keeps
  its cluster after finishing is denied (403 from `vrayjob.kb.io`).

Every request is recorded (`server.requests`: method, path, query, body, headers) so tests assert exactly what was
sent, and that refusals send nothing.

    with FakeKube(kuberay="1.5.2") as kube:
        kube.add(configmap)                       # seed objects
        cfg = kube.kubeconfig(tmp_path / "kc")    # a kubeconfig pointing at it (token auth, namespace "team")
        ...                                       # run llmctl --kubeconfig cfg ...
        assert [r.line for r in kube.requests] == ["POST /apis/ray.io/v1/namespaces/team/rayjobs"]
"""

from __future__ import annotations

import copy
import datetime
import http.server
import itertools
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

TOKEN = "llmctl-test-token"
USER = "tester"
RAYJOB_FINALIZER = "ray.io/rayjob-finalizer"  # KubeRay utils/constant.go, every supported tag
_uids = itertools.count(1)
_rvs = itertools.count(2)

# plural -> (group, kind, namespaced) for the built-in kinds; custom resources come from the releases under test
BUILTIN = {
    "configmaps": ("", "ConfigMap", True),
    "pods": ("", "Pod", True),
    "nodes": ("", "Node", False),
    "poddisruptionbudgets": ("policy", "PodDisruptionBudget", True),  # submit: the head's budget
    "namespaces": ("", "Namespace", False),
    "customresourcedefinitions": ("apiextensions.k8s.io", "CustomResourceDefinition", False),
}
CUSTOM = {"rayjobs": ("ray.io", "RayJob", True), "rayservices": ("ray.io", "RayService", True),  # llmctl serve
          "rayclusters": ("ray.io", "RayCluster", True),  # llmctl list: idle clusters
          "localqueues": ("kueue.x-k8s.io", "LocalQueue", True),
          "clusterqueues": ("kueue.x-k8s.io", "ClusterQueue", False),
          "resourceflavors": ("kueue.x-k8s.io", "ResourceFlavor", False)}
RESOURCES = {p: (g, "v1", k)  # compat
             for p, (g, k, _) in {**BUILTIN, "rayjobs": CUSTOM["rayjobs"], "rayservices": CUSTOM["rayservices"]}.items()}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: object
    content_type: str | None
    headers: dict | None = None

    @property
    def line(self) -> str:
        return f"{self.method} {self.path}"


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A failure `Status` body (AM api/errors/errors.go)."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def matches(labels: dict, selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k) != v.lstrip("="):
                return False
        elif term not in labels:
            return False
    return True


def prune(obj, schema):
    """Drop what the structural schema does not declare (AX pkg/apiserver/schema/pruning/algorithm.go)."""
    if isinstance(obj, dict) and isinstance(schema, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        if schema.get("x-kubernetes-preserve-unknown-fields") and props is None:
            return obj
        out = {}
        for k, v in obj.items():
            if props is not None and k in props:
                out[k] = prune(v, props[k])
            elif isinstance(extra, dict):
                out[k] = prune(v, extra)
            elif props is None or extra or schema.get("x-kubernetes-preserve-unknown-fields"):
                out[k] = v
        return out
    if isinstance(obj, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        return [prune(v, schema["items"]) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# RBAC (KK pkg/apis/rbac/v1/evaluation_helpers.go, plugin/pkg/auth/authorizer/rbac/rbac.go; RBAC docs)


def _rule_allows(rule: dict, verb: str, group: str, resource: str, name: str | None) -> bool:
    def has(values, want):
        return "*" in (values or []) or want in (values or [])

    res_ok = has(rule.get("resources"), resource) or (
        "/" in resource and "*/" + resource.split("/", 1)[1] in (rule.get("resources") or []))
    names = rule.get("resourceNames") or []
    return (has(rule.get("verbs"), verb) and has(rule.get("apiGroups"), group) and res_ok
            and (not names or (name is not None and name in names)))


def _subject_matches(subj: dict, binding_ns: str | None, user: str, groups: list[str]) -> bool:
    kind = subj.get("kind")
    if kind == "User":
        return subj.get("name") == user
    if kind == "Group":
        return subj.get("name") in groups
    if kind == "ServiceAccount":  # AS authentication/serviceaccount/util.go
        return user == f"system:serviceaccount:{subj.get('namespace') or binding_ns}:{subj.get('name')}"
    return False


class FakeKube:
    def __init__(self, *, crds: bool = True, forbid: set[tuple[str, str]] | None = None, token: str = TOKEN,
                 kuberay: str | None = None, kueue: str | None = None, rbac: list[dict] | None = None,
                 namespaces=("team", "default"), operator: bool = True):
        from tests import schemas

        self.schemas = schemas
        self.crds = crds  # False: ray.io is not served (KubeRay not installed)
        self.kuberay = (kuberay or schemas.LATEST["kuberay"]) if crds else None
        self.kueue = kueue  # None: Kueue not installed
        self.forbid = forbid or set()  # {(verb, plural)} answered 403
        self.token = token
        self.tokens: dict[str, tuple[str, list[str]]] = {token: (USER, ["system:authenticated"])}
        self.rbac: list[dict] | None = None if rbac is None else list(rbac)
        self.namespaces = set(namespaces)
        self.namespace_labels: dict[str, dict[str, str]] = {}  # namespace -> its labels (Pod Security, ...)
        self.operator = operator  # the simulated KubeRay operator adds its finalizer to every RayJob
        # Deterministic time, no sleeps: a container waiting to start starts after this many log requests
        # answered 400, and the operator finishes a RayJob's deletion after this many reads of it while terminating.
        self.starts_after: dict[tuple[str, str], int] = {}  # (namespace, pod) -> log requests still refused
        self.finalize_after: int | None = None
        # The operator's progress, also without sleeps: (plural, namespace, name) -> the statuses it sets, one more
        # at each GET of that object (the last one stays), e.g. a RayJob going Initializing -> Running -> Complete.
        self.status_script: dict[tuple[str, str, str], list[dict]] = {}
        self._reads: dict[tuple[str, str, str], int] = {}
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace or "", name) -> object
        self.logs: dict[tuple[str, str, str], str] = {}  # (namespace, pod, container) -> text
        self.requests: list[Request] = []
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self.resources: dict[str, tuple[str, list[str], str, bool]] = {
            p: (g, ["v1"], k, ns) for p, (g, k, ns) in BUILTIN.items()}
        for plural, (group, kind, namespaced) in CUSTOM.items():
            release = self.kuberay if group == "ray.io" else self.kueue
            if release:
                self.resources[plural] = (group, schemas.served_versions(group, kind, release), kind, namespaced)

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> FakeKube:
        handler = type("Handler", (_Handler,), {"kube": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path, *, namespace: str = "team", context: str = "fake", token: str | None = None) -> Path:
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token or self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    # -- identities and RBAC -------------------------------------------------------------------------
    def user_token(self, user: str, groups=()) -> str:
        """A bearer token that authenticates as `user` (plus system:authenticated)."""
        token = f"token-{user}"
        self.tokens[token] = (user, [*groups, "system:authenticated"])
        return token

    def sa_token(self, namespace: str, name: str) -> str:
        """A pod's projected service-account token (AS authentication/serviceaccount/util.go names and groups)."""
        token = f"sa-{namespace}-{name}"
        self.tokens[token] = (f"system:serviceaccount:{namespace}:{name}",
                              ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"])
        return token

    def load_rbac(self, docs: list[dict]) -> None:
        """Evaluate RBAC from these objects (e.g. `helm template` output); other kinds are ignored."""
        self.rbac = [copy.deepcopy(d) for d in docs
                     if d.get("kind") in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]

    def authorize(self, user: str, groups: list[str], verb: str, group: str, resource: str,
                  namespace: str | None, name: str | None) -> tuple[bool, str]:
        if self.rbac is None:
            return True, "no RBAC in this stand-in"
        roles = {(d["kind"], (d["metadata"].get("namespace") if d["kind"] == "Role" else None), d["metadata"]["name"]): d
                 for d in self.rbac if d["kind"] in ("Role", "ClusterRole")}
        for b in self.rbac:
            if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            bns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
            if b["kind"] == "RoleBinding" and bns != namespace:
                continue  # a RoleBinding grants only inside its namespace, even for a ClusterRole (RBAC docs)
            if not any(_subject_matches(s, bns, user, groups) for s in b.get("subjects") or []):
                continue
            ref = b["roleRef"]
            role = roles.get((ref["kind"], bns if ref["kind"] == "Role" else None, ref["name"]))
            if role and any(_rule_allows(r, verb, group, resource, name) for r in role.get("rules") or []):
                return True, f'RBAC: allowed by {b["kind"]} "{b["metadata"]["name"]}" of {ref["kind"]} "{ref["name"]}"'
        return False, ""

    # -- state -------------------------------------------------------------------------------------
    def _plural_of(self, obj: dict) -> str:
        return next(p for p, (_, _, kind, _) in self.resources.items() if kind == obj["kind"])

    def add(self, obj: dict, *, log: str | None = None) -> dict:
        obj = copy.deepcopy(obj)
        plural = self._plural_of(obj)
        meta = obj.setdefault("metadata", {})
        if self.resources[plural][3]:
            meta.setdefault("namespace", "team")
            self.namespaces.add(meta["namespace"])
        meta.setdefault("uid", f"uid-{next(_uids)}")
        meta.setdefault("creationTimestamp", _now())
        meta.setdefault("resourceVersion", "1")
        with self._lock:
            self.objects[(plural, meta.get("namespace", ""), meta["name"])] = obj
            if log is not None:
                for c in obj.get("spec", {}).get("containers", []):
                    self.logs[(meta["namespace"], meta["name"], c["name"])] = log
        return obj

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            return copy.deepcopy(self.objects.get((plural, namespace or "", name)))

    def lines(self) -> list[str]:
        return [r.line for r in self.requests]

    def reconcile(self) -> list[str]:
        """The KubeRay operator's turn: each RayJob being deleted loses its finalizer and goes (KubeRay
        rayjob_controller.go: on deletionTimestamp, stop the Ray job, remove the finalizer). Returns names."""
        gone = []
        with self._lock:
            for key, obj in list(self.objects.items()):
                meta = obj["metadata"]
                if key[0] == "rayjobs" and meta.get("deletionTimestamp"):  # and the garbage collector's own
                    meta["finalizers"] = [f for f in meta.get("finalizers", [])
                                          if f not in (RAYJOB_FINALIZER, "foregroundDeletion", "orphan")]
                    if not meta["finalizers"]:
                        del self.objects[key]
                        gone.append(key[2])
        return gone

    # -- the API -------------------------------------------------------------------------------------
    def _forbidden(self, user: str, verb: str, group: str, resource: str, namespace: str | None,
                   name: str | None) -> tuple[int, dict, str]:
        """403 text of AS endpoints/handlers/responsewriters/errors.go."""
        plural = resource.split("/")[0]
        full = f"{plural}.{group}" if group else plural
        what = f'{full} "{name}"' if name else full
        target = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        return 403, status(403, "Forbidden", f'{what} is forbidden: User "{user}" cannot {verb} resource '
                           f'"{resource}" in API group "{group}"{target}',
                           {"name": name, "group": group, "kind": plural} if name else
                           {"group": group, "kind": plural}), "application/json"

    def handle(self, method: str, path: str, query: dict, body, headers) -> tuple[int, object, str]:
        auth = headers.get("Authorization") or ""
        ident = self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None
        if ident is None:
            return 401, status(401, "Unauthorized", "Unauthorized"), "application/json"
        user, groups = ident
        # any authenticated user may ask who they are and what they may do (system:basic-user)
        if method == "POST" and path == "/apis/authentication.k8s.io/v1/selfsubjectreviews":
            return 201, {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {},
                         "status": {"userInfo": {"username": user, "groups": groups}}}, "application/json"
        if method == "POST" and path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
            ra = (body.get("spec") or {}).get("resourceAttributes") or {}
            resource = ra.get("resource", "") + (f"/{ra['subresource']}" if ra.get("subresource") else "")
            allowed, reason = self.authorize(user, groups, ra.get("verb", ""), ra.get("group", ""), resource,
                                             ra.get("namespace") or None, ra.get("name") or None)
            if (ra.get("verb"), ra.get("resource")) in self.forbid:
                allowed, reason = False, ""
            st = {"allowed": allowed}
            if reason:
                st["reason"] = reason
            return 201, dict(body, status=st, metadata={}), "application/json"
        if method == "POST" and path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
            # about another subject: needs create on subjectaccessreviews at cluster scope
            if not self.authorize(user, groups, "create", "authorization.k8s.io", "subjectaccessreviews", None,
                                  None)[0]:
                return self._forbidden(user, "create", "authorization.k8s.io", "subjectaccessreviews", None, None)
            spec = body.get("spec") or {}
            ra = spec.get("resourceAttributes") or {}
            resource = ra.get("resource", "") + (f"/{ra['subresource']}" if ra.get("subresource") else "")
            allowed, reason = self.authorize(spec.get("user", ""), spec.get("groups") or [], ra.get("verb", ""),
                                             ra.get("group", ""), resource, ra.get("namespace") or None,
                                             ra.get("name") or None)
            st = {"allowed": allowed, **({"reason": reason} if reason else {})}
            return 201, dict(body, status=st, metadata={}), "application/json"
        m = re.fullmatch(r"/apis/([^/]+)/([^/]+)", path)
        if m and method == "GET":  # API discovery of one group version (APIResourceList)
            served = [(p, k, ns) for p, (g, vs, k, ns) in self.resources.items() if g == m[1] and m[2] in vs]
            if not served:
                return 404, status(404, "NotFound", "the server could not find the requested resource"), \
                    "application/json"
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{m[1]}/{m[2]}",
                         "resources": [{"name": p, "singularName": k.lower(), "namespaced": ns, "kind": k,
                                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                                       for p, k, ns in served]}, "application/json"
        m = re.fullmatch(r"/apis/([^/]+)", path)
        if m and method == "GET":  # API discovery (system:discovery)
            versions = sorted({v for g, vs, _, _ in self.resources.values() if g == m[1] for v in vs})
            if not versions:
                return 404, status(404, "NotFound", "the server could not find the requested resource"), \
                    "application/json"
            gvs = [{"groupVersion": f"{m[1]}/{v}", "version": v} for v in versions]
            return 200, {"kind": "APIGroup", "apiVersion": "v1", "name": m[1], "versions": gvs[::-1],
                         "preferredVersion": gvs[-1]}, "application/json"
        route = self._route(path)
        if route is None:
            return 404, status(404, "NotFound", "the server could not find the requested resource"), "application/json"
        group, version, namespace, plural, name, sub = route
        known = self.resources.get(plural)
        if known is None or known[0] != group or version not in known[1]:
            return 404, status(404, "NotFound", "the server could not find the requested resource"), "application/json"
        kind, namespaced = known[2], known[3]
        if namespace is None and namespaced and name is not None:
            return 404, status(404, "NotFound", "the server could not find the requested resource"), "application/json"
        # AS endpoints/request/requestinfo.go: verbs from method + shape
        verb = {"GET": "get" if name else ("watch" if query.get("watch") == "true" else "list"), "POST": "create",
                "DELETE": "delete" if name else "deletecollection", "PATCH": "patch", "PUT": "update"}[method]
        resource = f"{plural}/{sub}" if sub else plural
        allowed, _ = self.authorize(user, groups, verb, group, resource, namespace, name if verb != "create" else None)
        if not allowed or (verb, plural) in self.forbid:
            return self._forbidden(user, verb, group, resource, namespace, name)
        dry = query.get("dryRun")
        if dry not in (None, "All"):
            return 422, status(422, "Invalid", f'CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: '
                               f'["{dry}"]: supported values: "All"'), "application/json"
        full = f"{plural}.{group}" if group else plural
        with self._lock:
            if plural == "customresourcedefinitions":
                return self._crd(verb, name)
            if plural == "namespaces" and verb in ("get", "list"):  # the namespaces this server knows
                items = [{"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": n, "labels": {"kubernetes.io/metadata.name": n,
                                                             **self.namespace_labels.get(n, {})}},
                          "status": {"phase": "Active"}} for n in sorted(self.namespaces)]
                if verb == "list":
                    return 200, {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items}, \
                        "application/json"
                if name not in self.namespaces:
                    return 404, status(404, "NotFound", f'namespaces "{name}" not found',
                                       {"name": name, "kind": "namespaces"}), "application/json"
                return 200, next(i for i in items if i["metadata"]["name"] == name), "application/json"
            if verb == "list":
                items = [copy.deepcopy(o) for (p, ns, _), o in sorted(self.objects.items())
                         if p == plural and (namespace is None or ns == namespace)
                         and matches(o["metadata"].get("labels") or {}, query.get("labelSelector"))]
                api = f"{group}/{version}" if group else version
                return 200, {"apiVersion": api, "kind": kind + "List", "metadata": {"resourceVersion": "1"},
                             "items": items}, "application/json"
            if verb == "create":
                name = (body.get("metadata") or {}).get("name")
                # AS admission/plugin/namespace/lifecycle: no creating in a namespace that does not exist
                if namespaced and namespace not in self.namespaces:
                    return 404, status(404, "NotFound", f'namespaces "{namespace}" not found',
                                       {"name": namespace, "kind": "namespaces"}), "application/json"
            key = (plural, namespace or "", name)
            if verb == "create":
                code, obj = self._validate_custom(group, version, kind, body, query, name)
                if code:
                    return code, obj, "application/json"
                denied = self._kueue_webhooks(plural, obj)
                if denied:
                    return 403, status(403, "Forbidden", f'admission webhook "vrayjob.kb.io" denied the request: '
                                       f'{denied}'), "application/json"
                old = self.objects.get(key)
                if old is not None:  # AS registry/generic/registry/store.go
                    prefix = "object is being deleted: " if old["metadata"].get("deletionTimestamp") else ""
                    return 409, status(409, "AlreadyExists", f'{prefix}{full} "{name}" already exists',
                                       {"name": name, "group": group, "kind": plural}), "application/json"
                obj["metadata"].update(namespace=namespace, uid=f"uid-{next(_uids)}", creationTimestamp=_now(),
                                       resourceVersion=str(next(_rvs)), generation=1)
                if not namespaced:
                    obj["metadata"].pop("namespace")
                obj.pop("status", None)  # CRs with a status subresource drop it on create (AX strategy.go)
                if dry != "All":
                    if plural == "rayjobs" and self.operator:
                        obj["metadata"].setdefault("finalizers", []).append(RAYJOB_FINALIZER)
                    self.objects[key] = copy.deepcopy(obj)
                    if plural == "rayjobs" and self.operator:
                        obj = copy.deepcopy(obj)
                        obj["metadata"]["finalizers"].remove(RAYJOB_FINALIZER)  # added after the create returns
                        if not obj["metadata"]["finalizers"]:
                            del obj["metadata"]["finalizers"]
                return 201, obj, "application/json"
            if key not in self.objects:
                return 404, status(404, "NotFound", f'{full} "{name}" not found',
                                   {"name": name, "group": group, "kind": plural}), "application/json"
            obj = self.objects[key]
            if sub == "log":
                return self._log(obj, namespace, name, query)
            if verb == "get":
                if plural == "rayjobs" and obj["metadata"].get("deletionTimestamp") and self.finalize_after is not None:
                    reads = self._reads.get(key, 0) + 1
                    self._reads[key] = reads
                    if reads > self.finalize_after:
                        del self._reads[key], self.objects[key]  # the operator got there first
                        return 404, status(404, "NotFound", f'{full} "{name}" not found',
                                           {"name": name, "group": group, "kind": plural}), "application/json"
                script = self.status_script.get(key)
                if script:
                    obj["status"] = copy.deepcopy(script.pop(0) if len(script) > 1 else script[0])
                return 200, copy.deepcopy(obj), "application/json"
            if verb == "patch":
                want_rv = ((body or {}).get("metadata") or {}).get("resourceVersion")
                if want_rv and want_rv != obj["metadata"].get("resourceVersion"):  # AS store.go precondition
                    return 409, status(409, "Conflict", f'Operation cannot be fulfilled on {full} "{name}": the object '
                                       f'has been modified; please apply your changes to the latest version and try '
                                       f'again', {"name": name, "group": group, "kind": plural}), "application/json"
                new = merge_patch(obj, body)
                if group in ("ray.io", "kueue.x-k8s.io"):  # status subresource (AX registry/customresource/strategy.go)
                    if sub == "status":
                        new = dict(copy.deepcopy(obj), status=new.get("status"))
                    else:
                        new["status"] = copy.deepcopy(obj.get("status"))
                        if new.get("spec") != obj.get("spec"):
                            new["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
                    if new.get("status") is None:
                        new.pop("status")
                added = set(new["metadata"].get("finalizers") or []) - set(obj["metadata"].get("finalizers") or [])
                if obj["metadata"].get("deletionTimestamp") and added:  # AM api/validation/objectmeta.go
                    return 422, status(422, "Invalid", f'{kind}.{group} "{name}" is invalid: metadata.finalizers: '
                                       f'Forbidden: no new finalizers can be added if the object is being deleted, '
                                       f'found new finalizers []string{{{", ".join(repr(f) for f in sorted(added))}}}'
                                       .replace("'", '"')), "application/json"
                code, checked = self._validate_custom(group, version, kind, new, query, name, patch=True)
                if code:
                    return code, checked, "application/json"
                checked["metadata"]["resourceVersion"] = str(next(_rvs))
                if dry != "All":
                    if checked["metadata"].get("deletionTimestamp") and not checked["metadata"].get("finalizers"):
                        del self.objects[key]
                    else:
                        self.objects[key] = checked
                return 200, copy.deepcopy(checked), "application/json"
            # delete (AS registry/generic/registry/store.go markAsDeleting / finalizeDelete); Foreground and Orphan
            # add their own finalizer for the garbage collector (AM apis/meta/v1/types.go DeletionPropagation)
            policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
            gc = {"Foreground": "foregroundDeletion", "Orphan": "orphan"}.get(policy)
            if gc and gc not in (obj["metadata"].get("finalizers") or []):
                obj = dict(obj, metadata=dict(obj["metadata"], finalizers=[*(obj["metadata"].get("finalizers") or []),
                                                                             gc]))
            if obj["metadata"].get("finalizers"):
                marked = copy.deepcopy(obj)
                if not marked["metadata"].get("deletionTimestamp"):
                    marked["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0,
                                              generation=marked["metadata"].get("generation", 1) + 1)
                if dry != "All":
                    self.objects[key] = marked
                return 200, copy.deepcopy(marked), "application/json"
            if dry != "All":
                del self.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": group, "kind": plural, "uid": obj["metadata"]["uid"]}}, \
                "application/json"

    @staticmethod
    def _route(path: str):
        """(group, version, namespace, plural, name, subresource) for a resource path, else None."""
        m = re.fullmatch(r"/api/(v1)/namespaces/([^/]+)/(\w+)(?:/([^/]+))?(?:/(\w+))?", path)
        if m:
            return ("", m[1], m[2], m[3], m[4], m[5])
        m = re.fullmatch(r"/api/(v1)/(\w+)(?:/([^/]+))?", path)
        if m:
            return ("", m[1], None, m[2], m[3], None)
        m = re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/(\w+)(?:/([^/]+))?(?:/(\w+))?", path)
        if m:
            return (m[1], m[2], m[3], m[4], m[5], m[6])
        m = re.fullmatch(r"/apis/([^/]+)/([^/]+)/(\w+)(?:/([^/]+))?", path)
        if m:
            return (m[1], m[2], None, m[3], m[4], None)
        return None

    def _crd(self, verb: str, name: str | None):
        """CRDs of the installed releases, as the API server serves them."""
        crds = {}
        for plural, (group, _, kind, _) in self.resources.items():
            if plural in CUSTOM:
                crds[f"{plural}.{group}"] = self.schemas.crd_object(group, kind, self.kuberay if group == "ray.io"
                                                                    else self.kueue)
        if verb == "list":
            return 200, {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinitionList",
                         "metadata": {}, "items": list(crds.values())}, "application/json"
        if verb != "get" or name not in crds:
            return 404, status(404, "NotFound", f'customresourcedefinitions.apiextensions.k8s.io "{name}" not found',
                               {"name": name, "group": "apiextensions.k8s.io", "kind": "customresourcedefinitions"}), \
                "application/json"
        return 200, crds[name], "application/json"

    def _validate_custom(self, group, version, kind, body, query, name, patch: bool = False):
        """(0, object as stored) or (code, Status). Field validation per AS endpoints/handlers/{create,patch}.go."""
        obj = copy.deepcopy(body)
        if group not in ("ray.io", "kueue.x-k8s.io"):
            return 0, obj
        fv = query.get("fieldValidation") or "Warn"
        if fv not in ("Strict", "Warn", "Ignore"):
            return 422, status(422, "Invalid", f'fieldValidation: Unsupported value: "{fv}": supported values: '
                               f'"", "Ignore", "Strict", "Warn"')
        release = self.kuberay if group == "ray.io" else self.kueue
        schema = self.schemas.crd_schema(group, kind, version, release)
        unknown = self.schemas.unknown_fields({k: v for k, v in obj.items() if k != "metadata"}, schema)
        if unknown and fv == "Strict":
            errs = ", ".join(f'unknown field "{u}"' for u in unknown)
            if patch:
                return 422, status(422, "Invalid", f'{kind}.{group} "{name}" is invalid: patch: Invalid value: '
                                   f'"...": strict decoding error: {errs}')
            return 400, status(400, "BadRequest", f'{kind} in version "{version}" cannot be handled as a {kind}: '
                               f'strict decoding error: {errs}')
        if unknown and fv == "Warn":
            self.warnings += [f'unknown field "{u}"' for u in unknown]
        obj = prune(obj, schema)
        import jsonschema

        errors = sorted(jsonschema.Draft202012Validator(dict(schema, properties=dict(
            schema["properties"], metadata={"type": "object"}))).iter_errors(obj), key=lambda e: list(e.path))
        if errors:  # AX apiserver/schema validation -> 422 (AM util/errors aggregates)
            msgs = [f"{'.'.join(map(str, e.absolute_path))}: Invalid value: {e.message[:200]}" for e in errors[:3]]
            text = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
            return 422, status(422, "Invalid", f'{kind}.{group} "{name}" is invalid: {text}',
                               {"name": name, "group": group, "kind": kind})
        return 0, obj

    def _kueue_webhooks(self, plural: str, obj: dict) -> str | None:
        """Kueue's RayJob webhooks when Kueue is installed and the RayJob names a queue (KQ
        pkg/controller/jobs/rayjob/rayjob_webhook.go; https://kueue.sigs.k8s.io/docs/tasks/run/rayjobs/):
        mrayjob.kb.io suspends it (Kueue un-suspends on admission); vrayjob.kb.io refuses one that keeps its
        cluster after finishing. Returns the denial, else None (and mutates `obj`)."""
        if plural != "rayjobs" or not self.kueue:
            return None
        if not (obj["metadata"].get("labels") or {}).get("kueue.x-k8s.io/queue-name"):
            return None
        spec = obj.setdefault("spec", {})
        if not spec.get("shutdownAfterJobFinishes"):
            return ("spec.shutdownAfterJobFinishes: Invalid value: false: a kueue managed job should delete the "
                    "cluster after finishing")
        spec["suspend"] = True
        return None

    def _log(self, pod: dict, namespace: str, name: str, query: dict):
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = query.get("container")
        if container is None:
            if len(containers) > 1:  # KK pkg/registry/core/pod/strategy.go
                return 400, status(400, "BadRequest", f"a container name must be specified for pod {name}, choose "
                                   f"one of: [{' '.join(containers)}]"), "application/json"
            container = containers[0]
        left = self.starts_after.get((namespace, name))
        if left == 0:  # it started: Running from now on
            pod["status"] = {"phase": "Running", "containerStatuses": [
                {"name": c, "image": "x", "imageID": "", "ready": True, "restartCount": 0,
                 "state": {"running": {"startedAt": _now()}}} for c in containers]}
            del self.starts_after[(namespace, name)]
        elif left is not None:
            self.starts_after[(namespace, name)] = left - 1
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting")
            if cs.get("name") == container and waiting:  # kubelet_pods.go, as BadRequest via the API server
                return 400, status(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: '
                                   f'{waiting.get("reason", "ContainerCreating")}'), "application/json"
        text = self.logs.get((namespace, name, container), "")
        if "tailLines" in query:
            text = "".join(text.splitlines(keepends=True)[-int(query["tailLines"]):])
        return 200, text, "text/plain"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Handler(http.server.BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:  # quiet
        pass

    def _serve(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        req = Request(self.command, url.path, query, body, self.headers.get("Content-Type"), dict(self.headers))
        with self.kube._lock:
            self.kube.requests.append(req)
            before = len(self.kube.warnings)
        code, payload, ctype = self.kube.handle(self.command, url.path, query, body, self.headers)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for w in self.kube.warnings[before:]:  # AS: one `Warning: 299 - "<text>"` header per warning
            self.send_header("Warning", f'299 - "{w}"')
        if query.get("follow") == "true" and ctype == "text/plain":
            # a follow streams until the container ends: chunked, one line per chunk
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for line in payload.splitlines(keepends=True):
                chunk = line.encode()
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _serve

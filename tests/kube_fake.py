"""A small Kubernetes API server on loopback, enough for llmctl's commands; the real kubernetes client talks to it.

It serves the REST paths and wire format of the real API server for what `submit/status/list/logs/cancel`
touch: ConfigMaps and Pods (core/v1, pods/log included, `follow` streams), and RayJobs (ray.io/v1, namespaced
and cluster-wide lists, create/get/delete/merge-patch). Objects live in memory; label selectors
(`k=v`, `k!=v`, `k`) filter lists; failures come back as `Status` objects with the real reasons and message
shapes (NotFound for a missing object vs. a missing API group, AlreadyExists, Forbidden, Unauthorized).

Every request is recorded (`server.requests`: method, path, query, body) so tests assert exactly what was
sent, and that refusals send nothing.

    with FakeKube() as kube:
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
_uids = itertools.count(1)

# resource plural -> (group, version, kind); "" group = core
RESOURCES = {
    "configmaps": ("", "v1", "ConfigMap"),
    "pods": ("", "v1", "Pod"),
    "rayjobs": ("ray.io", "v1", "RayJob"),
    "rayservices": ("ray.io", "v1", "RayService"),  # llmctl serve
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: object
    content_type: str | None

    @property
    def line(self) -> str:
        return f"{self.method} {self.path}"


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
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


class FakeKube:
    def __init__(self, *, crds: bool = True, forbid: set[tuple[str, str]] | None = None, token: str = TOKEN):
        self.crds = crds  # False: ray.io is not served (KubeRay not installed)
        self.forbid = forbid or set()  # {(verb, plural)} answered 403
        self.token = token
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.logs: dict[tuple[str, str, str], str] = {}  # (namespace, pod, container) -> text
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

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

    # -- state -------------------------------------------------------------------------------------
    def add(self, obj: dict, *, log: str | None = None) -> dict:
        obj = copy.deepcopy(obj)
        plural = next(p for p, (_, _, kind) in RESOURCES.items() if kind == obj["kind"])
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "team")
        meta.setdefault("uid", f"uid-{next(_uids)}")
        meta.setdefault("creationTimestamp", _now())
        meta.setdefault("resourceVersion", "1")
        with self._lock:
            self.objects[(plural, meta["namespace"], meta["name"])] = obj
            if log is not None:
                for c in obj.get("spec", {}).get("containers", []):
                    self.logs[(meta["namespace"], meta["name"], c["name"])] = log
        return obj

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def lines(self) -> list[str]:
        return [r.line for r in self.requests]

    # -- the API -------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict, body, headers) -> tuple[int, object, str]:
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, status(401, "Unauthorized", "Unauthorized"), "application/json"
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/(\w+)(?:/([^/]+))?(?:/(log))?", path) or \
            re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/(\w+)(?:/([^/]+))?", path) or \
            re.fullmatch(r"/apis/([^/]+)/([^/]+)/(\w+)", path)
        if not m:
            return 404, status(404, "NotFound", "the server could not find the requested resource"), "application/json"
        if path.startswith("/api/v1/"):
            namespace, plural, name, sub = m.groups()
            group = ""
        elif m.re.groups == 5:
            group, version, namespace, plural, name = m.groups()
            sub = None
        else:
            group, version, plural = m.groups()
            namespace = name = sub = None
        known = RESOURCES.get(plural)
        if known is None or known[0] != group or (group == "ray.io" and not self.crds):
            return 404, status(404, "NotFound", "the server could not find the requested resource"), "application/json"
        verb = {"GET": "get" if name else "list", "POST": "create", "DELETE": "delete", "PATCH": "patch"}[method]
        if (verb, plural) in self.forbid:
            target = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            return 403, status(403, "Forbidden", f'{plural}{"." + group if group else ""} is forbidden: User '
                               f'"tester" cannot {verb} resource "{plural}" in API group "{group}"{target}',
                               {"kind": plural, "group": group}), "application/json"
        full = f"{plural}.{group}" if group else plural
        with self._lock:
            if verb == "list":
                items = [copy.deepcopy(o) for (p, ns, _), o in sorted(self.objects.items())
                         if p == plural and (namespace is None or ns == namespace)
                         and matches(o["metadata"].get("labels") or {}, query.get("labelSelector"))]
                kind = known[2] + "List"
                api = f"{group}/{known[1]}" if group else known[1]
                return 200, {"apiVersion": api, "kind": kind, "metadata": {"resourceVersion": "1"},
                             "items": items}, "application/json"
            key = (plural, namespace, name)
            if verb == "create":
                name = body["metadata"]["name"]
                key = (plural, namespace, name)
                if key in self.objects:
                    return 409, status(409, "AlreadyExists", f'{full} "{name}" already exists',
                                       {"name": name, "group": group, "kind": plural}), "application/json"
                obj = copy.deepcopy(body)
                obj["metadata"].update(namespace=namespace, uid=f"uid-{next(_uids)}", creationTimestamp=_now(),
                                       resourceVersion="1", generation=1)
                self.objects[key] = obj
                return 201, obj, "application/json"
            if key not in self.objects:
                return 404, status(404, "NotFound", f'{full} "{name}" not found',
                                   {"name": name, "group": group, "kind": plural}), "application/json"
            obj = self.objects[key]
            if sub == "log":
                container = query.get("container") or obj["spec"]["containers"][0]["name"]
                text = self.logs.get((namespace, name, container), "")
                if "tailLines" in query:
                    text = "".join(text.splitlines(keepends=True)[-int(query["tailLines"]):])
                return 200, text, "text/plain"
            if verb == "get":
                return 200, copy.deepcopy(obj), "application/json"
            if verb == "patch":
                self.objects[key] = merge_patch(obj, body)
                return 200, copy.deepcopy(self.objects[key]), "application/json"
            del self.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": group, "kind": plural, "uid": obj["metadata"]["uid"]}}, \
                "application/json"


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
        req = Request(self.command, url.path, query, body, self.headers.get("Content-Type"))
        with self.kube._lock:
            self.kube.requests.append(req)
        code, payload, ctype = self.kube.handle(self.command, url.path, query, body, self.headers)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
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

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

"""A real Kubernetes control plane on 127.0.0.1, for the tests: `RealCluster.start()` ... `.stop()`.

Runs the binaries tests/controlplane/build.py made from upstream Go modules: etcd, kube-apiserver (RBAC,
PodSecurity and the other default admission plugins, static-token users), kube-scheduler,
kube-controller-manager, the KubeRay operator, Kueue (its webhooks served on loopback with certificates made
here) and kwok, which plays the kubelets of simulated H100 nodes (tests/controlplane/nodes.py).

Nothing here sleeps to synchronise: each step polls a health endpoint or an API condition with a deadline,
and a failure names the component and shows the tail of its log. Every process runs in its own process
group, killed by stop() (also at interpreter exit).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.controlplane import build, pki
from tests.controlplane.nodes import DEFAULT_NODES, node_manifest

# Named test users: authenticated, in no group but system:authenticated, bound to nothing. Tests bind them.
TEST_USERS = ("alice", "bob", "carol", "dave", "erin", "frank")

KUEUE_FRAMEWORKS = ("batch/job", "ray.io/rayjob", "ray.io/raycluster", "ray.io/rayservice")
# Kueue webhooks registered: those for the frameworks above and Kueue's own kinds. Its manifest also lists
# pod/deployment/statefulset and other operators' kinds, which this cluster does not run.
KUEUE_WEBHOOK_GROUPS = {"kueue.x-k8s.io", "ray.io", "batch"}
# CRDs Kueue serves in two versions and converts through its /convert webhook (its crd/kustomization.yaml).
KUEUE_CONVERTED_CRDS = {"localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters"}


class StartupError(RuntimeError):
    pass


# Seconds allowed to each start-up wait. Generous: the box may be shared (the API server needed 60 s for
# the CRDs alone at load average 30); raise it with LLMCTL_REAL_CLUSTER_TIMEOUT.
STEP_TIMEOUT = float(os.environ.get("LLMCTL_REAL_CLUSTER_TIMEOUT", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.popen.poll() is None


class Api:
    """A small JSON client for the API server (urllib, so the fixture needs no Kubernetes client)."""

    def __init__(self, url: str, ca: Path, token: str):
        self.url, self.token = url, token
        self.ctx = ssl.create_default_context(cafile=str(ca))

    def request(self, method: str, path: str, body=None, *, content_type="application/json", timeout=30):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path):
        return self.request("GET", path)

    def create(self, path, obj, deadline_s: float = 180):
        """POST obj; an existing object (409) counts as created. A server timeout (5xx) or a dropped
        connection is retried until deadline_s: on a saturated box the API server may time a large CRD
        out and still store it, and the retry then answers 409."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                code, out = self.request("POST", path, obj, timeout=120)
            except OSError as e:  # urllib.error.URLError, socket timeouts
                code, out = None, repr(e)
            if code in (200, 201, 202, 409):
                return out
            if (code is not None and code < 500) or time.monotonic() > deadline:
                raise RuntimeError(f"POST {path}: {code} {out}")

    def apply(self, path, obj, manager="llmctl-test-fixture"):
        """Server-side apply of obj at path (the object's own URL)."""
        code, out = self.request("PATCH", f"{path}?fieldManager={manager}&force=true", obj,
                                 content_type="application/apply-patch+yaml")
        if code not in (200, 201):
            raise RuntimeError(f"apply {path}: {code} {out}")
        return out


def wait_for(what: str, check, deadline: float, procs: list[Proc] = (), interval: float = 0.1):
    """Poll check() until it returns a truthy value or deadline (time.monotonic()) passes; fail early if one
    of procs died. A poll interval, not a synchronising sleep: the condition is what is waited on."""
    last = None
    while True:
        try:
            out = check()
            if out:
                return out
        except Exception as e:  # noqa: BLE001 - connection refused and the like while it starts
            last = e
        for p in procs:
            if not p.alive():
                raise StartupError(f"{p.name} exited ({p.popen.returncode}) while waiting for {what}; "
                                   f"tail of {p.log}:\n{p.tail()}")
        if time.monotonic() > deadline:
            names = ", ".join(p.name for p in procs) or "-"
            tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail()}" for p in procs)
            raise StartupError(f"timed out waiting for {what} (component: {names}); last error: {last!r}\n{tails}")
        time.sleep(interval)


def local_queue(api: Api, namespace: str, cluster_queue: str, quota: dict[str, str], *, name: str = "lq",
                preemption: dict | None = None, deadline_s: float = 180) -> None:
    """Kueue quota for a test: the ResourceFlavor `default` (shared, no node labels), a ClusterQueue `cluster_queue`
    covering exactly `quota`'s resources ({"nvidia.com/gpu": "16", ...}; Kueue admits only workloads whose every
    requested resource is covered), with `preemption` (Kueue's default: none within the queue), and a LocalQueue
    `name` in `namespace` pointing at it; returns once the LocalQueue is Active."""
    api.create("/apis/kueue.x-k8s.io/v1beta2/resourceflavors", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default"}})
    spec = {"namespaceSelector": {}, "resourceGroups": [{
        "coveredResources": list(quota),
        "flavors": [{"name": "default", "resources": [{"name": r, "nominalQuota": q} for r, q in quota.items()]}]}]}
    if preemption:
        spec["preemption"] = preemption
    api.create("/apis/kueue.x-k8s.io/v1beta2/clusterqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
        "spec": spec})
    api.create(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{namespace}/localqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": name},
        "spec": {"clusterQueue": cluster_queue}})

    def active():
        _, lq = api.get(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{namespace}/localqueues/{name}")
        return any(c["type"] == "Active" and c["status"] == "True" for c in lq.get("status", {}).get("conditions", []))

    wait_for(f"LocalQueue {namespace}/{name} Active", active, time.monotonic() + deadline_s)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class RealCluster:
    root: Path
    url: str = ""
    ca_path: Path = None
    admin_token: str = ""
    user_tokens: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    provisioning_requests: bool = False  # the ProvisioningRequest CRD is installed (Kueue's check works)
    _bins: dict[str, Path] = field(default_factory=dict)

    # ---------- what tests use ----------
    def admin(self) -> Api:
        return Api(self.url, self.ca_path, self.admin_token)

    def api_as(self, user: str) -> Api:
        return Api(self.url, self.ca_path, self.user_tokens[user])

    def kubeconfig(self, user: str = "admin", path: Path | None = None, namespace: str = "default",
                   token: str | None = None) -> Path:
        """A kubeconfig file for `user` ("admin" or one of TEST_USERS), or for any `token` (e.g. from
        service_account_token) under the name `user`; point KUBECONFIG at it."""
        token = token or (self.admin_token if user == "admin" else self.user_tokens[user])
        path = Path(path or self.root / "kubeconfigs" / f"{user}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": user, "preferences": {},
            "clusters": [{"name": "real", "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "real", "user": user, "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A bound token (TokenRequest) for ServiceAccount namespace/name, created if missing: a further
        identity made at run time (user system:serviceaccount:<ns>:<name>, its groups
        system:serviceaccounts[:<ns>] and system:authenticated)."""
        admin = self.admin()
        admin.create(f"/api/v1/namespaces/{namespace}/serviceaccounts",
                     {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
        code, out = admin.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds}})
        if code != 201:
            raise RuntimeError(f"TokenRequest for {namespace}/{name}: {code} {out}")
        return out["status"]["token"]

    def add_node(self, name: str, node_type: str, labels: dict[str, str] | None = None) -> dict:
        """Register one more simulated node (nodes.NODE_TYPES), with extra `labels` (topology, spot, pools),
        and wait until kwok reports it Ready."""
        node = node_manifest(name, node_type)
        node["metadata"]["labels"].update(labels or {})
        self.admin().create("/api/v1/nodes", node)
        return wait_for(f"node {name} Ready", lambda: self._node_ready(name), time.monotonic() + STEP_TIMEOUT, self.procs)

    def log(self, component: str) -> Path:
        return self.root / component / "log.txt"

    def stop(self) -> None:
        for p in reversed(self.procs):
            _killpg(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + 2  # nothing persists: a short grace, then SIGKILL
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(p.popen, signal.SIGKILL)
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    # ---------- start-up ----------
    @classmethod
    def start(cls, root: Path | None = None, nodes: dict[str, str] | None = None, operators: bool = True,
              log=print) -> "RealCluster":
        """operators=False: no KubeRay operator and no Kueue (their CRDs are still installed)."""
        dirs = build.paths()  # the operators' folders also hold the CRDs
        if dirs is None:  # normally built by `make setup`; build here when run alone
            dirs = build.ensure_all(log=log)
        root = Path(root or tempfile.mkdtemp(prefix="llmctl-real-cluster-"))
        c = cls(root=root)
        c._bins = {f: d / "bin" for f, d in dirs.items()}
        c._assets = {f: d / "assets" for f, d in dirs.items()}
        c.versions = {f: json.loads((d / "build.json").read_text())["version"] for f, d in dirs.items()}
        atexit.register(c.stop)
        t0 = time.monotonic()
        try:
            c._start(nodes or DEFAULT_NODES, t0, operators)
        except BaseException:
            c.stop()
            raise
        c.timings["total"] = round(time.monotonic() - t0, 1)
        # CPU seconds each component spent starting: the load-independent cost (the box may be shared).
        c.timings["cpu_s"] = {p.name: _cpu_seconds(p.popen.pid) for p in c.procs}
        # Seconds from the start to each step's end, with the load they ran under (docs/benchmarks.md).
        (root / "timings.json").write_text(json.dumps({**c.timings, "loadavg": os.getloadavg()}))
        log(f"real cluster up in {c.timings['total']} s (load {os.getloadavg()[0]:.1f}): {c.url}, logs in {root}")
        return c

    def _mark(self, step: str, t0: float) -> None:
        self.timings[step] = round(time.monotonic() - t0, 1)

    def _spawn(self, name: str, argv: list[str], env: dict | None = None, binds: dict[str, Path] | None = None) -> Proc:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        log = d / "log.txt"
        if binds:
            argv = _in_mount_namespace(argv, binds)
        f = open(log, "ab")  # noqa: SIM115 - kept open by the child
        popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d,
                                 env={**os.environ, **(env or {})}, start_new_session=True,
                                 preexec_fn=_die_with_parent)
        f.close()
        p = Proc(name, popen, log)
        self.procs.append(p)
        return p

    def _start(self, nodes: dict[str, str], t0: float, operators: bool = True) -> None:
        root, b = self.root, self._bins
        for name in ("etcd", "etcd-peer", "apiserver", "scheduler", "kcm", "kueue-webhook", "kueue-health",
                     "kueue-metrics", "kueue-visibility", "kuberay-metrics", "kuberay-health", "kwok"):
            self.ports[name] = free_port()
        P = self.ports

        # PKI and users
        pk = root / "pki"
        ca = pki.make_ca(pk)
        self.ca_path = ca[0]
        api_cert = pki.issue(pk, "apiserver", ca, dns=("localhost", "kubernetes", "kubernetes.default",
                                                       "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"))
        hook_cert = pki.issue(pk, "kueue-webhook", ca)
        sa_pub, sa_key = pki.signing_keypair(pk)
        self.admin_token = secrets.token_hex(16)
        sched_token, kcm_token = secrets.token_hex(16), secrets.token_hex(16)
        self.user_tokens = {u: secrets.token_hex(16) for u in TEST_USERS}
        rows = [f"{self.admin_token},admin,admin-uid,system:masters",
                f"{sched_token},system:kube-scheduler,kube-scheduler-uid",
                f"{kcm_token},system:kube-controller-manager,kcm-uid",
                *(f"{t},{u},{u}-uid" for u, t in self.user_tokens.items())]
        tokens = pk / "tokens.csv"
        tokens.write_text("\n".join(rows) + "\n")
        tokens.chmod(0o600)
        self._mark("pki", t0)

        # etcd
        etcd = self._spawn("etcd", [
            str(b["etcd"] / "etcd"), "--name=node0", f"--data-dir={root / 'etcd' / 'data'}",
            f"--listen-client-urls=http://127.0.0.1:{P['etcd']}", f"--advertise-client-urls=http://127.0.0.1:{P['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{P['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{P['etcd-peer']}",
            f"--initial-cluster=node0=http://127.0.0.1:{P['etcd-peer']}",
            "--unsafe-no-fsync=true", "--quota-backend-bytes=2147483648", "--log-level=warn",
        ])
        wait_for("etcd /health", lambda: _http_ok(f"http://127.0.0.1:{P['etcd']}/health"),
                 time.monotonic() + STEP_TIMEOUT, [etcd])
        self._mark("etcd", t0)

        # kube-apiserver
        self.url = f"https://127.0.0.1:{P['apiserver']}"
        apiserver = self._spawn("kube-apiserver", [
            str(b["kubernetes"] / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{P['etcd']}",
            "--bind-address=127.0.0.1", f"--secure-port={P['apiserver']}", "--advertise-address=127.0.0.1",
            # The `kubernetes` Service's endpoints would carry 127.0.0.1, which Endpoints validation refuses.
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={api_cert[0]}", f"--tls-private-key-file={api_cert[1]}", f"--client-ca-file={ca[0]}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            "--enable-admission-plugins=PodSecurity,NamespaceLifecycle,ServiceAccount,ResourceQuota,LimitRanger",
            "--allow-privileged=true",
            f"--service-account-issuer=https://127.0.0.1:{P['apiserver']}",
            f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
            "--service-cluster-ip-range=10.96.0.0/16",
            f"--cert-dir={root / 'kube-apiserver' / 'certs'}",
            "--profiling=false", "--v=1",
        ])
        admin = self.admin()
        wait_for("kube-apiserver /readyz", lambda: admin.get("/readyz")[0] == 200,
                 time.monotonic() + STEP_TIMEOUT, [etcd, apiserver])
        self._mark("apiserver", t0)

        # scheduler and controller-manager, with their own identities (the default RBAC binds them)
        sched_kc = self._component_kubeconfig("kube-scheduler", sched_token)
        kcm_kc = self._component_kubeconfig("kube-controller-manager", kcm_token)
        sched = self._spawn("kube-scheduler", [
            str(b["kubernetes"] / "kube-scheduler"), f"--kubeconfig={sched_kc}",
            f"--authentication-kubeconfig={sched_kc}", f"--authorization-kubeconfig={sched_kc}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={P['scheduler']}", "--v=1",
        ])
        kcm = self._spawn("kube-controller-manager", [
            str(b["kubernetes"] / "kube-controller-manager"), f"--kubeconfig={kcm_kc}",
            f"--authentication-kubeconfig={kcm_kc}", f"--authorization-kubeconfig={kcm_kc}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={P['kcm']}",
            "--use-service-account-credentials=true", f"--service-account-private-key-file={sa_key}",
            f"--root-ca-file={ca[0]}", "--controllers=*", "--concurrent-gc-syncs=5", "--v=1",
        ])

        # kwok and the nodes
        stages = root / "kwok" / "stages.yaml"
        stages.parent.mkdir(parents=True, exist_ok=True)
        docs = [f.read_text() for d in ("pod-fast", "node-fast", "node-heartbeat-with-lease")
                for f in sorted((self._assets["kwok"] / "stages" / d).glob("*.yaml")) if f.name != "kustomization.yaml"]
        stages.write_text("\n---\n".join(docs))
        admin_kc = self.kubeconfig("admin", root / "kubeconfigs" / "admin.yaml")
        kwok = self._spawn("kwok", [
            str(b["kwok"] / "kwok"), f"--kubeconfig={admin_kc}", f"--config={stages}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            # Fake addresses, written into status only: nothing here dials them (no kube-proxy, no CNI;
            # the operator's dashboard DNS names resolve nowhere, see _in_mount_namespace).
            "--cidr=10.244.0.0/16", "--node-ip=127.0.0.1", "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{P['kwok']}",
        ])
        for name, node_type in nodes.items():
            admin.create("/api/v1/nodes", node_manifest(name, node_type))

        # namespaces and CRDs meanwhile
        for ns in ("kueue-system", "ray-system"):
            admin.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        hook_url = f"https://127.0.0.1:{P['kueue-webhook']}"
        ca_bundle = base64.b64encode(ca[0].read_bytes()).decode()
        # RayCronJob (alpha, gate off by default) is left out: one CRD fewer to start.
        crds = [c for c in _json_docs(self._assets["kuberay"] / "crd") if c["spec"]["names"]["kind"] != "RayCronJob"]
        # The ProvisioningRequest CRD, before Kueue starts: Kueue sets up its provisioning admission-check
        # controller only when the API is served at start-up (cmd/kueue/main.go).
        pr_crd = provisioning_request_crd()
        if pr_crd is not None:
            crds.append(pr_crd)
        self.provisioning_requests = pr_crd is not None
        for crd in _json_docs(self._assets["kueue"] / "crd"):
            if crd["spec"]["names"]["plural"] in KUEUE_CONVERTED_CRDS:
                crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                    "clientConfig": {"url": f"{hook_url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"]}}
            crds.append(crd)
        # `create`, never a client-side apply: the RayJob CRD is over the 256 KiB annotation limit. A few at
        # once: the API server spends seconds on each (schema, OpenAPI), the client nothing.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda crd: admin.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd),
                          crds))
        names = [crd["metadata"]["name"] for crd in crds]
        wait_for("CRDs Established", lambda: all(self._crd_established(n) for n in names),
                 time.monotonic() + STEP_TIMEOUT, [apiserver])
        self._mark("crds", t0)

        if not operators:
            self._wait_core(nodes, t0, apiserver, sched, kcm, kwok)
            return

        # KubeRay operator
        resolv = root / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        kuberay = self._spawn("kuberay-operator", [
            str(b["kuberay"] / "kuberay-operator"),  # reads KUBECONFIG (controller-runtime's GetConfig)
            f"--metrics-addr=127.0.0.1:{P['kuberay-metrics']}",
            f"--health-probe-bind-address=127.0.0.1:{P['kuberay-health']}",
            "--enable-leader-election=false", "--log-stdout-encoder=console",
        ], env={"KUBECONFIG": str(admin_kc)}, binds={"/etc/resolv.conf": resolv})

        # Kueue, out of cluster, its webhook server on loopback with the fixture's certificate
        kq = root / "kueue"
        (kq / "webhook-certs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hook_cert[0], kq / "webhook-certs" / "tls.crt")
        shutil.copyfile(hook_cert[1], kq / "webhook-certs" / "tls.key")
        # Kueue's main.go reads its metrics certificate from a fixed path, /etc/kueue/metrics/certs, when
        # internal cert management is off; a private mount namespace shows it ours (see _in_mount_namespace).
        (kq / "metrics-certs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hook_cert[0], kq / "metrics-certs" / "tls.crt")
        shutil.copyfile(hook_cert[1], kq / "metrics-certs" / "tls.key")
        cfg = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{P['kueue-health']}"},
            "metrics": {"bindAddress": f"127.0.0.1:{P['kueue-metrics']}"},
            "webhook": {"port": P["kueue-webhook"], "host": "127.0.0.1", "certDir": str(kq / "webhook-certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": list(KUEUE_FRAMEWORKS)},
        }
        (kq / "config.yaml").write_text(yaml.safe_dump(cfg))
        kueue = self._spawn("kueue", [
            str(b["kueue"] / "kueue"), f"--config={kq / 'config.yaml'}", f"--kubeconfig={admin_kc}",
            # Off: its aggregated API server reads a certificate from another fixed path (/visibility) and
            # would need an APIService; the tests read Workloads, not the pending-workloads API.
            # ElasticJobsViaWorkloadSlices (alpha, off by default): what a cluster running elastic RayJobs
            # (`llmctl submit --min-gpus`) must turn on; it changes nothing for jobs without the
            # kueue.x-k8s.io/elastic-job annotation.
            "--feature-gates=VisibilityOnDemand=false,ElasticJobsViaWorkloadSlices=true",
            f"--visibility-server-port={P['kueue-visibility']}",
        ], env={"KUBECONFIG": str(admin_kc)},
            binds={"/etc/kueue/metrics/certs": kq / "metrics-certs", "/etc/resolv.conf": resolv})

        self._wait_core(nodes, t0, apiserver, sched, kcm, kwok)
        dl = time.monotonic() + STEP_TIMEOUT
        wait_for("kuberay-operator /readyz", lambda: _http_ok(f"http://127.0.0.1:{P['kuberay-health']}/readyz"),
                 dl, [apiserver, kuberay])
        self._mark("kuberay", t0)
        wait_for("kueue /readyz", lambda: _http_ok(f"http://127.0.0.1:{P['kueue-health']}/readyz"),
                 dl, [apiserver, kueue])
        ctx = ssl.create_default_context(cafile=str(ca[0]))
        wait_for("kueue webhook TLS", lambda: _tls_dial(P["kueue-webhook"], ctx), dl, [kueue])
        self._register_kueue_webhooks(hook_url, ca_bundle)
        self._mark("kueue", t0)

    def _wait_core(self, nodes, t0, apiserver, sched, kcm, kwok) -> None:
        P, admin = self.ports, self.admin()
        dl = time.monotonic() + STEP_TIMEOUT
        wait_for("kube-scheduler /healthz", lambda: _http_ok(f"https://127.0.0.1:{P['scheduler']}/healthz",
                                                             _insecure()), dl, [apiserver, sched])
        wait_for("kube-controller-manager /healthz", lambda: _http_ok(f"https://127.0.0.1:{P['kcm']}/healthz",
                                                                      _insecure()), dl, [apiserver, kcm])
        wait_for("default ServiceAccount (controller-manager)",
                 lambda: admin.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200, dl, [kcm])
        self._mark("scheduler+kcm", t0)
        wait_for("nodes Ready", lambda: all(self._node_ready(n) for n in nodes), dl, [apiserver, kwok])
        self._mark("nodes", t0)

    def _register_kueue_webhooks(self, hook_url: str, ca_bundle: str) -> None:
        docs = _json_docs(self._assets["kueue"] / "webhook")
        admin = self.admin()
        for doc in docs:
            if not doc:
                continue
            kept = []
            for hook in doc.get("webhooks", []):
                if not {r for rule in hook.get("rules", []) for r in rule.get("apiGroups", [])} & KUEUE_WEBHOOK_GROUPS:
                    continue
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": hook_url + path, "caBundle": ca_bundle}
                kept.append(hook)
            doc["webhooks"] = kept
            doc["metadata"]["name"] = "kueue-" + doc["metadata"]["name"]  # as Kueue's kustomize names them
            plural = {"MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
                      "ValidatingWebhookConfiguration": "validatingwebhookconfigurations"}[doc["kind"]]
            admin.create(f"/apis/admissionregistration.k8s.io/v1/{plural}", doc)

    def _component_kubeconfig(self, name: str, token: str) -> Path:
        path = self.root / "kubeconfigs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": "real", "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "real", "user": name}}],
        }))
        path.chmod(0o600)
        return path

    def _crd_established(self, name: str) -> bool:
        code, crd = self.admin().get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        return code == 200 and any(c["type"] == "Established" and c["status"] == "True"
                                   for c in (crd.get("status") or {}).get("conditions") or [])

    def _node_ready(self, name: str):
        code, node = self.admin().get(f"/api/v1/nodes/{name}")
        if code == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                               for c in (node.get("status") or {}).get("conditions") or []):
            return node
        return None


def provisioning_request_crd() -> dict | None:
    """The ProvisioningRequest CRD (autoscaling.x-k8s.io, the cluster autoscaler's API) from the
    k8s.io/autoscaler/cluster-autoscaler/apis module at the version Kueue's go.mod requires, as the Go module
    cache holds it after the Kueue build; None when it is not there."""
    import re

    m = re.search(r"k8s.io/autoscaler/cluster-autoscaler/apis (v\S+)", (build.GO_DIR / "kueue" / "go.mod").read_text())
    if not m:
        return None
    cache = os.environ.get("GOMODCACHE")
    if not cache:
        try:
            cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            cache = ""
    f = Path(cache or Path.home() / "go" / "pkg" / "mod") / f"k8s.io/autoscaler/cluster-autoscaler/apis@{m[1]}" \
        / "config/crd/autoscaling.x-k8s.io_provisioningrequests.yaml"
    if not f.exists():
        return None
    return yaml.safe_load(f.read_text())


def _json_docs(folder: Path) -> list[dict]:
    """The documents of every YAML file in folder, from the <name>.json the builder wrote beside it (or,
    for a cache made before it did, from the YAML through libyaml)."""
    out = []
    for f in sorted(folder.glob("*.yaml")):
        j = f.with_suffix(".json")
        if j.exists():
            out += json.loads(j.read_text())
        else:
            out += [d for d in yaml.load_all(f.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]
    return out


def _insecure() -> ssl.SSLContext:
    # The scheduler's and controller-manager's /healthz serve a self-signed certificate of their own.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_dial(port: int, ctx: ssl.SSLContext) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s, ctx.wrap_socket(s, server_hostname="127.0.0.1"):
        return True


def _in_mount_namespace(argv: list[str], binds: dict[str, Path]) -> list[str]:
    """argv run in a private mount namespace where each target path shows the given file or folder.

    Used for two things a process run out of cluster would otherwise take from the host: Kueue's metrics
    certificate, read from the fixed path /etc/kueue/metrics/certs, and /etc/resolv.conf, replaced by one
    naming 127.0.0.1 so that the KubeRay operator's lookups of `<svc>.<ns>.svc.cluster.local` fail at once
    on loopback and never leave the machine. Needs root (as CI runs) and util-linux `unshare`; without them
    the process runs unconfined (Kueue then needs /etc/kueue/metrics/certs to exist already).
    """
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return argv
    script = []
    for i, (target, source) in enumerate(binds.items()):
        script.append(f'mkdir -p "{target}"' if Path(source).is_dir() else f'[ -e "{target}" ] || touch "{target}"')
        script.append(f'mount --bind "{source}" "{target}"')
    script.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", " && ".join(script), "sh", *argv]


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so a killed pytest leaves no control plane behind. Kept across exec."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _killpg(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

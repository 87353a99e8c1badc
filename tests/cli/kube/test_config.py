"""One validator of the cluster config: the CLI checks a config against the chart's own values.schema.json (shipped
in the package as cli/kube/values.schema.json), so `helm lint` and the CLI give the same verdict on the same values,
including the three cases where the hand-written checks disagreed with the chart.

Run: .venv/bin/pytest tests/cli/kube/test_config.py -v
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.errors import UsageError
from cli.kube.config import SCHEMA_FILE, ClusterConfig, config_from_configmap
from tests.tools import ensure_helm

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "llmctl"

CASES = {  # chart `config:` values -> whether both accept them
    "defaults": ({}, True),
    "env-boolean": ({"env": {"NCCL_IB_DISABLE": True, "NCCL_NET_GDR_LEVEL": 2}}, True),  # the CLI refused
    "scratch-millibytes": ({"workers": {"scratchSize": "100m"}}, False),  # the CLI accepted, then failed later
    "upper-case-scheme": ({"storageRoot": "FILE:///x"}, False),  # the CLI accepted
    "bad-quantity": ({"head": {"memory": "lots"}}, False),
    "bad-queue": ({"queue": "H100 queue"}, False),
    "zero-gpus": ({"workers": {"gpusPerNode": 0}}, False),
    "ok-overrides": ({"storageRoot": "s3://b/p", "prices": {"h100": 2.5}, "lifecycle": {"maxGraceSeconds": 120},
                      "kuberay": {"version": "1.6"}, "workers": {"scratchSize": "500Gi"}}, True),
}


def test_deps_the_package_ships_the_charts_own_schema():
    assert SCHEMA_FILE.read_bytes() == (CHART / "values.schema.json").read_bytes(), \
        "cli/kube/values.schema.json must equal charts/llmctl/values.schema.json: copy the chart's over it"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"kube/values.schema.json"' in pyproject and '"jsonschema>=4",  # the cluster config' in pyproject


@pytest.mark.parametrize("name", CASES)
def test_deps_helm_lint_and_the_cli_give_the_same_verdict(name, tmp_path):
    config, ok = CASES[name]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": config}))
    lint = subprocess.run([str(ensure_helm()), "lint", str(CHART), "-f", str(values)], capture_output=True, text=True)
    assert (lint.returncode == 0) == ok, lint.stdout + lint.stderr
    try:
        ClusterConfig.from_dict(config)
        cli_ok = True
    except UsageError:
        cli_ok = False
    assert cli_ok == ok
    if ok:  # and what the chart renders into the ConfigMap, the CLI reads
        out = subprocess.run([str(ensure_helm()), "template", "r", str(CHART), "-f", str(values),
                              "--show-only", "templates/configmap.yaml"], capture_output=True, text=True, check=True)
        config_from_configmap(yaml.safe_load(out.stdout))


def test_deps_help_does_not_import_jsonschema():
    code = "import sys; from cli.main import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "assert 'jsonschema' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)

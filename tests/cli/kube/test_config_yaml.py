"""The cluster config's YAML (cli/kube/config.py through trainer/safe_yaml.py): a few hundred bytes must not
become a billion nodes . `--cluster-config FILE` and the `llmctl-config` ConfigMap's values
refuse aliases, nest at most MAX_DEPTH deep and are bounded in size: one line, exit 2 (1 for the ConfigMap,
which the cluster's admin wrote), within a second, nothing created.

Run: .venv/bin/pytest tests/cli/kube/test_config_yaml.py -v
"""

from __future__ import annotations


import pytest

from cli.main import main

DRY = ("submit", "--depth", "12", "--gpus", "8", "--dry-run", "-o", "json", "--storage", "s3://bucket/llm")


def alias_bomb(levels: int = 9) -> str:
    """~700 bytes that safe_load turns into 9**levels references: the probe's `placement.affinity`."""
    lines = ["placement:", "  affinity:", "    nodeAffinity:", '      a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"      a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_hostile_alias_bomb_in_the_cluster_config_is_refused_at_once(tmp_path, capsys):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(alias_bomb())
    assert len(cfg.read_bytes()) < 1000
    rc = main([*DRY, "--cluster-config", str(cfg)])  # refused at the first alias, before anything expands
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert "alias" in err and "line 5" in err, err  # line 5: the first alias, so nothing was built


@pytest.mark.parametrize("text, words", [
    ("placement:\n  podAnnotations: &x {a: b}\nenv: *x\n", "alias"),
    ("base: &b {image: x}\n<<: *b\n", "alias"),
    ("placement:\n  affinity: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("image: x\n" + "# padding\n" * 500_000, "over"),
])
def test_hostile_cluster_config_yaml_is_bounded(tmp_path, capsys, text, words):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(text)
    rc = main([*DRY, "--cluster-config", str(cfg)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and words in err and "Traceback" not in err, err


def test_hostile_alias_bomb_in_the_configmap_is_one_error_line():
    from cli.errors import CLIError
    from cli.kube.config import config_from_configmap

    for data in ({"config.yaml": alias_bomb()}, {"config.yaml": "image: x\n", "interconnect.yaml": alias_bomb()}):
        with pytest.raises(CLIError, match="alias"):
            config_from_configmap({"data": data})


def test_a_plain_config_still_loads(tmp_path, capsys):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("placement:\n  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n"
                   "        nodeSelectorTerms:\n        - matchExpressions:\n          - {key: pool, operator: In, "
                   "values: [gpu]}\n")
    rc = main([*DRY, "--cluster-config", str(cfg)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert '"pool"' in out

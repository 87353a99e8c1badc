"""`llmctl submit`: what it refuses before anything reaches a cluster (hostile input: --env, credentials, numbers, storage, names).

Run: .venv/bin/pytest tests/cli/test_submit.py
"""

from __future__ import annotations

import json

import pytest

from tests.hostile import DRY, llmctl, no_cluster, refused  # noqa: F401 - no_cluster: a fixture

pytestmark = pytest.mark.usefixtures("no_cluster")


@pytest.mark.parametrize("pair", ["LLMCTL_RUN=victim-run", "AWS_ENDPOINT_URL=http://elsewhere", "HOME=/",
                                  "LLMCTL_NAMESPACE=other", "TMPDIR=/", "RAY_TMPDIR=/x", "AWS_REGION=x",
                                  "LD_PRELOAD=/tmp/x.so", "PYTHONPATH=/tmp"])
def test_hostile_env_cannot_replace_what_llmctl_sets(capsys, pair):
    err = refused(capsys, *DRY, "--env", pair)
    assert pair.split("=")[0] in err and "llmctl sets" in err


def test_hostile_env_that_llmctl_does_not_own_still_passes(capsys):
    rc, out, err = llmctl(capsys, *DRY, "--env", "NCCL_DEBUG=INFO", "--env", "NCCL_SOCKET_IFNAME=eth0")
    assert rc == 0, err
    env = {e["name"]: e.get("value") for e in json.loads(out)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
           ["spec"]["containers"][0]["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_SOCKET_IFNAME"] == "eth0" and env["HOME"] == "/tmp"


def test_hostile_cluster_config_env_is_held_to_the_same_rules(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storageRoot: s3://bucket/llm\nenv:\n  LLMCTL_RUN: victim\n")
    err = refused(capsys, *DRY, "--cluster-config", str(cfg))
    assert "env.LLMCTL_RUN" in err


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "DB_PASS", "HF_AUTH", "GITHUB_TOKEN", "MY_SECRET",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "DB_PASSWORD"])
def test_hostile_credentials_by_name_are_refused(capsys, name):
    err = refused(capsys, *DRY, "--env", f"{name}=x")
    assert name in err and "Secret" in err


@pytest.mark.parametrize("value", [
    "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9, "hf_" + "AbCd" * 9, "xoxb-1234567890-abcdefghij",
    "-----BEGIN RSA PRIVATE KEY-----", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig",
    "https://user:token@example.com/x", "sk-" + "x" * 40])
def test_hostile_credentials_by_value_are_refused(capsys, value):
    err = refused(capsys, *DRY, "--env", f"NCCL_NOTE={value}")
    assert ("NCCL_NOTE" in err or "--env" in err) and "Secret" in err and value not in err


@pytest.mark.parametrize("flag", ["--storage", "--core-bundle"])
def test_hostile_urls_with_user_and_password_are_refused(capsys, flag):
    url = "https://user:s3cr3t@host.example/llm"
    argv = [a for a in DRY if a not in ("--storage", "s3://bucket/llm")] if flag == "--storage" else list(DRY)
    err = refused(capsys, *argv, flag, url)
    assert "s3cr3t" not in err and "Secret" in err


def test_hostile_cluster_config_endpoint_and_storage_with_credentials_are_refused(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storageRoot: s3://bucket/llm\ns3:\n  endpoint: https://minio:pw@minio.local:9000\n")
    assert "s3.endpoint" in refused(capsys, *DRY, "--cluster-config", str(cfg))


@pytest.mark.parametrize("argv", [
    ("plan", "--depth", "12", "--ratio", "1e300"),
    ("plan", "--depth", "12", "--ratio", "nan"),
    ("plan", "--depth", "12", "--price", "inf", "-o", "json"),
    ("plan", "--depth", "12", "--price", "nan", "-o", "json"),
    ("plan", "--depth", "12", "--max-cost", "inf"),
    ("plan", "--depth", "12", "--num-iterations", "100000000000000000000"),
    ("plan", "--depth", "12", "--seq-len", str(1 << 40)),
    ("plan", "--depth", "12", "--total-batch-size", str(1 << 62)),
    (*DRY, "--num-iterations", "100000000000000000000"),
])
def test_hostile_numbers_that_overflow_or_are_not_finite_are_refused(capsys, argv):
    refused(capsys, *argv)


def test_hostile_active_deadline_fits_int64_for_the_largest_plan(capsys):
    rc, out, err = llmctl(capsys, *DRY, "--num-iterations", "1000000000", "--depth", "64", "--gpus", "8")
    if rc == 0:
        assert json.loads(out)["spec"]["activeDeadlineSeconds"] < 2**63
    else:
        assert rc == 2 and err.count("\n") == 1


@pytest.mark.parametrize("storage", ["/mnt/local", "local:///x", "FILE:///x", "memory://x", "file:///x"])
def test_hostile_cluster_runs_need_shared_storage(capsys, storage):
    argv = [a for a in DRY if a not in ("--storage", "s3://bucket/llm")]
    err = refused(capsys, *argv, "--storage", storage)
    assert "shared" in err


@pytest.mark.parametrize("storage", ["s3://b/x", "gs://b/x", "az://c/x", "abfs://c/x"])
def test_hostile_shared_protocols_pass(capsys, storage):
    argv = [a for a in DRY if a not in ("--storage", "s3://bucket/llm")]
    rc, _, err = llmctl(capsys, *argv, "--storage", storage)
    assert rc == 0, err


def test_hostile_core_bundle_of_a_cluster_run_is_shared_too(capsys):
    assert "shared" in refused(capsys, *DRY, "--core-bundle", "file:///data/bundle")


def test_hostile_spec_names_that_become_paths_are_plain(capsys):
    from trainer.plan import PlanError, RunSpec

    for field in ("tokenizer", "dataset", "sft_dataset"):
        with pytest.raises(PlanError, match=field):
            RunSpec(depth=4, **{field: "../../team-b"})


@pytest.mark.parametrize("target, why", [("nope=x", "not a tracker"), ("mlflow", "tracking URI"),
                                         ("mlflow=ftp://host/x", "tracking URI"), ("wandb=a/b/c", "W&B project"),
                                         ("wandb=my project", "without spaces"),
                                         ("mlflow=https://u:s3cr3t@mlflow.example", "user:password")])
def test_tracking_target_that_is_not_one_is_refused(capsys, tmp_path, target, why):
    """`--track` (trainer/plan/spec.py parse_track): one line, exit 2, for a cluster run and a local one alike,
    and a local run creates nothing."""
    err = refused(capsys, *DRY, "--track", target)
    assert why in err and "s3cr3t" not in err
    err = refused(capsys, "submit", "--local", "--storage", str(tmp_path / "root"), "--track", target)
    assert why in err and not (tmp_path / "root").exists()


def test_tracking_targets_reach_the_plan_and_the_pods(capsys, tmp_path):
    """Both trackers on a dry run: the plan inside the RayJob carries them; the Ray containers get the URI and
    the project, and with a trackingSecret each credential by secretKeyRef; without one, a warning."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storageRoot: s3://bucket/llm\ntrackingSecret: trackers\n")
    argv = (*DRY, "--track", "mlflow=https://mlflow.example", "--track", "wandb=team/llm")
    rc, out, err = llmctl(capsys, *argv, "--cluster-config", str(cfg))
    assert rc == 0, err
    head = json.loads(out)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example"
    assert env["WANDB_PROJECT"]["value"] == "team/llm"
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "trackers", "key": key,
                                                                        "optional": True}}}
    assert "mlflow=https://mlflow.example" in out and "trackingSecret" not in err
    rc, out, err = llmctl(capsys, *argv)
    assert rc == 0 and "no trackingSecret" in err and "WANDB_API_KEY" not in out

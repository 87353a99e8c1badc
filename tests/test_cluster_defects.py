"""Defects a source-level review found, whose fixes live in cli/jobs.py, cli/submit.py or trainer/,
pinned against the strict stand-in (tests/kube_fake.py). Each was first a strict xfail naming the function to
change; the markers came off as the fixes landed: progress and spend read from the run's storage (items 3, 4),
`logs -f` waiting for a pending pod (6), submit waiting for a cancelled run's finalizer (7), and the missing
namespace named on the read paths (8).

Run: .venv/bin/pytest tests/test_cluster_defects.py -v
"""

from __future__ import annotations

import datetime
import json

import pytest

from cli import console
from cli.main import main
from tests.kube_fake import FakeKube


@pytest.fixture
def kube(tmp_path, monkeypatch):
    monkeypatch.setattr(console, "POLL_SECONDS", 0.0)  # the stand-in's clock is its request count, not time
    with FakeKube() as k:
        monkeypatch.setenv("KUBECONFIG", str(k.kubeconfig(tmp_path / "kubeconfig")))
        yield k


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _iso(dt: datetime.datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _run(kube, name: str, storage: str, status: dict) -> None:
    kube.add({"apiVersion": "ray.io/v1", "kind": "RayJob",
              "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "llmctl", "llmctl.dev/depth": "20",
                                                    "llmctl.dev/gpus": "8", "llmctl.dev/gpu-type": "h100"},
                           "annotations": {"llmctl.dev/storage": storage, "llmctl.dev/price-per-gpu-hour": "2.00",
                                           "llmctl.dev/estimate-dollars": "500.00"}},
              "spec": {"backoffLimit": 2}, "status": status})


def test_status_shows_progress_written_to_the_runs_storage_by_a_pod_without_an_api_token(kube, capsys, tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "progress.json").write_text(json.dumps({"stage": "pretrain", "step": 1200, "steps": 4800}))
    now = datetime.datetime.now(datetime.timezone.utc)
    _run(kube, "r1", f"file://{run_dir}", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                           "startTime": _iso(now - datetime.timedelta(hours=1))})
    rc, out, err = run(capsys, "status", "r1", "-o", "json")
    assert rc == 0, err
    assert (json.loads(out)["progress"] or {}).get("step") == 1200


def test_spend_survives_a_retry(kube, capsys, tmp_path):
    run_dir = tmp_path / "runs" / "r2"
    run_dir.mkdir(parents=True)
    # attempt 1 ran 5 h on 8 GPUs before failing; attempt 2 started 1 h ago
    (run_dir / "progress.json").write_text(json.dumps({"spent_gpu_seconds": 8 * 6 * 3600}))
    now = datetime.datetime.now(datetime.timezone.utc)
    _run(kube, "r2", f"file://{run_dir}", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "failed": 1,
                                           "startTime": _iso(now - datetime.timedelta(hours=1))})
    rc, out, err = run(capsys, "status", "r2", "-o", "json")
    assert rc == 0, err
    assert json.loads(out)["spent_dollars"] >= 6 * 8 * 2.0 - 1  # 6 GPU-node-hours at $2/GPU-h, not 1


def test_elastic_status_prices_a_shrunk_attempt_at_the_sizes_it_ran(kube, capsys, tmp_path):
    """A run planned for 8 GPUs, running for 2 h, that lost half its workers after the first hour: status
    says 8 x 1 h + 4 x 1 h = 12 GPU-hours ($24), from the ledger's segments, not 8 x 2 h (trainer/spend.py)."""
    run_dir = tmp_path / "runs" / "r3"
    run_dir.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(hours=2)
    (run_dir / "spend.json").write_text(json.dumps({"run": "r3", "price_per_gpu_hour": 2.0, "attempts": [
        {"start": _iso(start), "last": _iso(now - datetime.timedelta(seconds=60)), "gpus": 4, "seconds": 7140.0,
         "state": "running", "segments": [[0.0, 8], [3600.0, 4]]}]}))
    _run(kube, "r3", f"file://{run_dir}", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                           "startTime": _iso(start)})
    rc, out, err = run(capsys, "status", "r3", "-o", "json")
    assert rc == 0, err
    assert json.loads(out)["spent_dollars"] == pytest.approx(12 * 2.0, abs=0.1)


def test_logs_follow_waits_for_a_pod_that_has_not_started(kube, capsys):
    kube.add({"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "r3-submitter", "labels": {"llmctl.dev/run": "r3", "llmctl.dev/role": "submitter"}},
              "spec": {"containers": [{"name": "ray-job-submitter", "image": "x"}]},
              "status": {"phase": "Pending", "containerStatuses": [
                  {"name": "ray-job-submitter", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
                   "state": {"waiting": {"reason": "ContainerCreating"}}}]}},
             log="step 1\n")
    kube.starts_after[("team", "r3-submitter")] = 2  # two refused log requests, then it runs
    rc, out, err = run(capsys, "logs", "r3", "-f")
    assert rc == 0, err
    assert out == "step 1\n" and "waiting" in err and "ContainerCreating" in err


def test_cancel_then_resubmit_waits_for_the_finalizer(kube, capsys):
    argv = ("submit", "--depth", "12", "--gpus", "8", "--storage", "s3://b", "--yes")
    assert run(capsys, *argv)[0] == 0
    name = next(r for r in reversed(kube.requests) if r.line.endswith("/rayjobs")).body["metadata"]["name"]
    assert run(capsys, "cancel", name, "--yes")[0] == 0
    kube.finalize_after = 2  # the operator lets go after the old object has been read twice
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert "created" in out and "being deleted" in err


def test_status_in_a_missing_namespace_names_the_namespace(kube, capsys):
    rc, _, err = run(capsys, "status", "r1", "-n", "nope")
    assert rc == 1 and "namespace nope does not exist" in err

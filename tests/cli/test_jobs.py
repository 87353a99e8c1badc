"""cli/submit.py, cli/jobs.py and cli/kube/ (client.py, runs.py): `llmctl submit/status/list/logs/cancel` against a Kubernetes API
server on loopback (tests/kube_fake.py), through the real kubernetes client. Each test asserts the exact
requests; refusals and --dry-run must make none.

Run: .venv/bin/pytest tests/cli/test_jobs.py -v
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.kube.config import ClusterConfig
from trainer.progress import write_progress
from cli.kube.runs import describe
from cli.main import main
from tests import schemas
from tests.kube_fake import FakeKube
from tests.hostile import ESC, llmctl, no_controls

ROOT = Path(__file__).resolve().parents[2]
RAYJOBS = "/apis/ray.io/v1/namespaces/team/rayjobs"
CONFIGMAP = "/api/v1/namespaces/team/configmaps/llmctl-config"
CRD = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rayjobs.ray.io"  # KubeRay release discovery
PDBS = "/apis/policy/v1/namespaces/team/poddisruptionbudgets"


def posted_rayjob(kube) -> dict:
    """The body of the last RayJob POST (submit then creates the head's PodDisruptionBudget)."""
    return next(r for r in reversed(kube.requests) if r.line == f"POST {RAYJOBS}").body


@pytest.fixture
def kube(tmp_path, monkeypatch):
    # status reads the run's storage: the runs here name s3://b, so point S3 at a closed loopback port (a fast
    # "connection refused" warning) rather than at AWS
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with FakeKube() as k:
        k.kc = str(k.kubeconfig(tmp_path / "kubeconfig"))
        monkeypatch.setenv("KUBECONFIG", k.kc)
        yield k


def run(capsys, *argv: str, stdin: str | None = None, tty: bool = False, monkeypatch=None) -> tuple[int, str, str]:
    if monkeypatch is not None:
        fake = io.StringIO(stdin or "")
        fake.isatty = lambda: tty  # type: ignore[method-assign]
        monkeypatch.setattr(sys, "stdin", fake)
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def configmap(cfg: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "llmctl-config", "namespace": "team"},
            "data": {"config.yaml": yaml.safe_dump(cfg)}}


def dry_run_rayjob(capsys, *argv: str) -> dict:
    rc, out, _ = run(capsys, "submit", *argv, "--dry-run", "-o", "json")
    assert rc == 0
    return json.loads(out)


# ---------------------------------------------------------------------------------------------
# submit --dry-run: no cluster, no request


def test_dry_run_with_no_kubeconfig_prints_one_8_gpu_pod(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rc, out, err = run(capsys, "submit", "--depth", "26", "--gpus", "8", "--dry-run", "-o", "yaml")
    assert rc == 0
    (rj,) = schemas.load_yaml_stream(out)
    schemas.validate(rj)
    (group,) = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 1
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert rj["metadata"]["namespace"] == "default"
    assert "cost" in err and "dry run: nothing was sent" in err  # the plan table goes to stderr


def test_dry_run_16_gpus_gives_two_pods(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rj = dry_run_rayjob(capsys, "--depth", "26", "--gpus", "16")
    (group,) = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_dry_run_takes_the_namespace_from_the_kubeconfig_and_sends_nothing(kube, capsys):
    rj = dry_run_rayjob(capsys, "--depth", "20", "--gpus", "8")
    assert rj["metadata"]["namespace"] == "team"
    assert kube.requests == []


def test_dry_run_imports_neither_kubernetes_nor_torch_nor_ray(tmp_path):
    code = ("import sys; from cli.main import main; rc = main(['submit', '--depth', '26', '--gpus', '8', "
            "'--dry-run']); heavy = sorted({m.split('.')[0] for m in sys.modules} & {'kubernetes', 'torch', 'ray'}); "
            "print(heavy, file=sys.stderr); sys.exit(rc or bool(heavy))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "absent"), "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.rstrip().endswith("[]")


def test_cluster_config_file_shapes_the_dry_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    cfg = ClusterConfig(image="registry.example.com/t:1", storage_root="s3://team-bucket/llmctl", queue="h100",
                        prices={"h100": 2.0}).to_dict()
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    rj = dry_run_rayjob(capsys, "--depth", "12", "--gpus", "8", "--cluster-config", str(tmp_path / "cluster.yaml"),
                        "--image", "registry.example.com/t:2")
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "registry.example.com/t:2"  # the flag beats the file
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100" and rj["spec"]["suspend"] is True
    assert rj["metadata"]["annotations"]["llmctl.dev/price-per-gpu-hour"] == "2.00"
    assert rj["metadata"]["annotations"]["llmctl.dev/storage"].startswith("s3://team-bucket/llmctl/runs/")
    rj = dry_run_rayjob(capsys, "--depth", "12", "--gpus", "8", "--cluster-config", str(tmp_path / "cluster.yaml"),
                        "--queue", "")
    assert "suspend" not in rj["spec"]


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, no request


REFUSED = [
    (["--depth", "26", "--gpus", "8", "--max-cost", "50", "--dry-run"],
     r"estimate \$\d[\d,]*\.\d\d \(\d+\.\d\d h on 8 x h100 at \$3\.00/GPU-h\) exceeds --max-cost \$50\.00"),
    (["--depth", "26", "--gpus", "8", "--max-cost", "50", "--price", "3", "--yes"], r"exceeds --max-cost \$50\.00"),
    (["--depth", "99", "--gpus", "8", "--dry-run"], "depth: must be an integer from 1 to 64"),
    (["--depth", "20", "--gpus", "12", "--yes"], "which 12 GPUs cannot share evenly"),
    (["--depth", "20", "--gpus", "8", "--gpu-type", "cpu", "--yes"], "use --local"),
    (["--depth", "20", "--gpus", "8", "--storage", "file:///tmp/x", "--yes"], "pods need shared storage"),
    (["--depth", "20", "--gpus", "8", "--env", "NOEQUALS", "--yes"], "--env: expected KEY=VALUE"),
    (["--depth", "20", "--gpus", "8", "--env", "AWS_SECRET_ACCESS_KEY=x", "--yes"], "looks like a credential"),
    (["--depth", "20", "--gpus", "8", "--queue", "h100", "--ray-cluster", "warm", "--yes"], "cannot be queued"),
    (["--gpus", "8", "--yes"], "--depth is required"),
    (["--depth", "26", "--gpus", "8", "--dry-run", "--namespace", "Bad_NS"],
     r"namespace: 'Bad_NS' is not a valid Kubernetes namespace \(RFC 1123 label"),
    (["--depth", "26", "--gpus", "8", "--dry-run", "--namespace", "a" * 64], "at most 63 characters"),
    (["--depth", "20", "--gpus", "8"], "stdin is not a terminal, so nobody can confirm; pass --yes"),
    (["--depth", "20", "--gpus", "8", "--yes", "--cluster-config", "/nonexistent.yaml"], "cannot read"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_inputs_make_no_request(kube, capsys, monkeypatch, argv, message):
    rc, out, err = run(capsys, "submit", *argv, monkeypatch=monkeypatch)
    assert rc == 2 and out == ""
    assert err.startswith("llmctl: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert kube.requests == []


def test_budget_at_the_cluster_price_is_checked_after_reading_the_config_and_creates_nothing(kube, capsys):
    kube.add(configmap({"prices": {"h100": 9.0}}))
    rc, _, err = run(capsys, "submit", "--depth", "20", "--gpus", "8", "--max-cost", "100", "--yes")
    assert rc == 2 and "at $9.00/GPU-h) exceeds --max-cost $100.00" in err
    assert kube.lines() == [f"GET {CONFIGMAP}", f"GET {CRD}"]  # reads, and no POST


# ---------------------------------------------------------------------------------------------
# submit against the API


def test_submit_posts_exactly_the_dry_run_object(kube, capsys):
    expected = dry_run_rayjob(capsys, "--depth", "20", "--gpus", "8")
    rc, out, err = run(capsys, "submit", "--depth", "20", "--gpus", "8", "--yes")
    assert rc == 0, err
    name = expected["metadata"]["name"]
    assert out == f"rayjob.ray.io/{name} created in namespace team\n"
    assert f"llmctl status {name} -n team" in err and "no ConfigMap llmctl-config" in err
    # the RayJob, then the head's PodDisruptionBudget owned by it (cli/kube/guards.py)
    assert kube.lines() == [f"GET {CONFIGMAP}", f"GET {CRD}", f"POST {RAYJOBS}", f"POST {PDBS}"]
    post = kube.requests[2]
    assert post.query == {"fieldValidation": "Strict"}  # an unknown field is a loud 400, never a silent prune
    assert post.body == expected
    schemas.validate(post.body)


def test_submit_uses_the_namespace_configmap_and_flags_override_it(kube, capsys):
    kube.add(configmap({"image": "registry.example.com/llmctl:7", "storageRoot": "s3://team/llmctl",
                        "queue": "h100", "prices": {"h100": 2.0}, "runServiceAccount": "llmctl-run",
                        "s3": {"credentialsSecret": "llmctl-s3"}}))
    rc, _, err = run(capsys, "submit", "--depth", "20", "--gpus", "16", "--yes", "--env", "NCCL_DEBUG=INFO",
                     "-o", "json")
    assert rc == 0, err
    rj = posted_rayjob(kube)
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example.com/llmctl:7"
    assert head["serviceAccountName"] == "llmctl-run"
    assert head["containers"][0]["envFrom"] == [{"secretRef": {"name": "llmctl-s3"}}]
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in head["containers"][0]["env"]
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100" and rj["spec"]["suspend"] is True
    assert rj["metadata"]["annotations"]["llmctl.dev/price-per-gpu-hour"] == "2.00"
    assert rj["metadata"]["annotations"]["llmctl.dev/storage"].startswith("s3://team/llmctl/runs/")
    schemas.validate(rj)
    rc, _, _ = run(capsys, "submit", "--depth", "20", "--gpus", "8", "--yes", "--image", "mine:1", "--queue", "",
                   "--price", "1.5")
    rj = posted_rayjob(kube)
    assert rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "mine:1"
    assert "suspend" not in rj["spec"] and rj["metadata"]["annotations"]["llmctl.dev/price-per-gpu-hour"] == "1.50"


def test_submit_asks_on_a_terminal(kube, capsys, monkeypatch):
    rc, _, err = run(capsys, "submit", "--depth", "12", "--gpus", "8", stdin="n\n", tty=True, monkeypatch=monkeypatch)
    assert rc == 1 and "[y/N]" in err and "nothing was created" in err
    assert kube.lines() == [f"GET {CONFIGMAP}", f"GET {CRD}"]
    rc, out, _ = run(capsys, "submit", "--depth", "12", "--gpus", "8", stdin="y\n", tty=True, monkeypatch=monkeypatch)
    assert rc == 0 and "created" in out
    assert kube.lines()[-2:] == [f"POST {RAYJOBS}", f"POST {PDBS}"]


def test_submitting_the_same_run_twice_says_it_exists(kube, capsys):
    assert run(capsys, "submit", "--depth", "12", "--gpus", "8", "--yes")[0] == 0
    rc, _, err = run(capsys, "submit", "--depth", "12", "--gpus", "8", "--yes")
    assert rc == 1 and "already exists in namespace team; `llmctl status" in err


def test_submit_without_kuberay_is_one_actionable_line(capsys, tmp_path, monkeypatch):
    with FakeKube(crds=False) as k:
        monkeypatch.setenv("KUBECONFIG", str(k.kubeconfig(tmp_path / "kc")))
        rc, _, err = run(capsys, "submit", "--depth", "12", "--gpus", "8", "--yes")
    assert rc == 1 and "KubeRay is not installed" in err and err.splitlines()[-1].startswith("llmctl: error:")
    assert "Traceback" not in err


def test_forbidden_and_unauthorized_are_one_actionable_line(capsys, tmp_path, monkeypatch):
    with FakeKube(forbid={("create", "rayjobs")}) as k:
        monkeypatch.setenv("KUBECONFIG", str(k.kubeconfig(tmp_path / "kc")))
        rc, _, err = run(capsys, "submit", "--depth", "12", "--gpus", "8", "--yes")
        assert rc == 1 and "forbidden" in err
        assert "needs create on rayjobs.ray.io in namespace team, which the llmctl chart's Role grants" in err
        monkeypatch.setenv("KUBECONFIG", str(k.kubeconfig(tmp_path / "kc2", token="stale")))
        rc, _, err = run(capsys, "list")
        assert rc == 1 and "rejected your credentials (401)" in err


def test_unreachable_cluster_and_missing_kubeconfig(capsys, tmp_path, monkeypatch):
    with FakeKube() as k:
        kc = k.kubeconfig(tmp_path / "kc")
    monkeypatch.setenv("KUBECONFIG", str(kc))  # the server is gone
    rc, _, err = run(capsys, "status", "some-run")
    assert rc == 1 and "cannot reach the Kubernetes API" in err and "127.0.0.1" in err
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rc, _, err = run(capsys, "list")
    assert rc == 1 and "no Kubernetes config found" in err and "--dry-run" in err


def test_local_hands_over_to_run_local(capsys, monkeypatch):
    import cli.local

    seen = {}
    monkeypatch.setattr(cli.local, "run_local", lambda args: seen.setdefault("args", args) and 0)
    assert main(["submit", "--local", "--steps", "20"]) == 0
    assert seen["args"].storage == "file://~/.cache/llmctl" and seen["args"].steps == 20


# ---------------------------------------------------------------------------------------------
# status


def _submitted(kube, capsys, *argv) -> dict:
    assert run(capsys, "submit", "--depth", "20", "--gpus", "16", "--yes", *argv)[0] == 0
    ((_, _, name),) = [k for k in kube.objects if k[0] == "rayjobs"]
    kube.requests.clear()
    return kube.get("rayjobs", "team", name)


def _set_status(kube, rj: dict, status: dict, annotations: dict | None = None) -> None:
    rj = dict(rj, status=status)
    if annotations:
        rj["metadata"]["annotations"].update(annotations)
    kube.objects[("rayjobs", "team", rj["metadata"]["name"])] = rj


def test_status_of_a_running_run_shows_progress_cost_and_pods(kube, capsys, tmp_path):
    rj = _submitted(kube, capsys)
    name = rj["metadata"]["name"]
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "progress.json").write_text(json.dumps({"stage": "pretrain", "step": 1200, "steps": 4800,
                                                       "eta_seconds": 5400, "updated": "2026-01-01T02:00:00Z"}))
    _set_status(kube, rj, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": f"{name}-x1y2z",
                           "startTime": "2026-01-01T00:00:00Z", "endTime": "2026-01-01T02:00:00Z"},
                {"llmctl.dev/storage": f"file://{run_dir}"})
    for i, phase in enumerate(["Running", "Pending"]):
        kube.add({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{name}-worker-{i}", "labels": {"llmctl.dev/run": name, "llmctl.dev/role": "worker"}},
            "spec": {"containers": [{"name": "ray-worker", "image": "x"}]},
            "status": {"phase": phase, "conditions": [] if phase == "Running" else [
                {"type": "PodScheduled", "status": "False", "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}})
    rc, out, err = run(capsys, "status", name)
    assert rc == 0, err
    assert kube.lines() == [f"GET {RAYJOBS}/{name}", "GET /api/v1/namespaces/team/pods"]
    assert kube.requests[1].query == {"labelSelector": f"llmctl.dev/run={name}"}
    assert f"running: training on Ray cluster {name}-x1y2z" in out
    assert "d20 on 16 x h100" in out
    assert "pretrain step 1,200 / 4,800 (25%), ETA 1.50 h" in out
    assert "worker 1 Pending, 1 Running (0/4 nodes are available: 4 Insufficient nvidia.com/gpu.)" in out
    assert "$96.00 so far (16 GPUs x $3.00/GPU-h x wall clock)" in out  # 2 h x 16 x $3
    est = float(rj["metadata"]["annotations"]["llmctl.dev/estimate-dollars"])
    assert f"estimate ${est:,.2f}" in out
    rc, out, _ = run(capsys, "status", name, "-o", "json")
    s = json.loads(out)
    assert s["state"] == "running" and s["spent_dollars"] == pytest.approx(96.0) and s["progress"]["step"] == 1200


def test_status_of_a_finished_run_makes_one_request(kube, capsys):
    rj = _submitted(kube, capsys)
    _set_status(kube, rj, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "DeadlineExceeded",
                           "startTime": "2026-01-01T00:00:00Z", "endTime": "2026-01-01T10:00:00Z"})
    rc, out, _ = run(capsys, "status", rj["metadata"]["name"])
    assert rc == 0 and "failed: ran past its deadline" in out
    assert kube.lines() == [f"GET {RAYJOBS}/{rj['metadata']['name']}"]


def test_status_of_a_missing_run(kube, capsys):
    rc, _, err = run(capsys, "status", "gpt-nope")
    assert rc == 1 and "no rayjob 'gpt-nope' in namespace team; see `llmctl list -n team`" in err


@pytest.mark.parametrize("status, spec, state, words", [
    ({}, {}, "submitted", "waiting for the KubeRay operator"),
    ({}, {"suspend": True}, "queued", "waiting for Kueue to admit it from queue h100"),
    ({"jobDeploymentStatus": "Suspended"}, {"suspend": True}, "queued", "queue h100"),
    ({"jobDeploymentStatus": "Initializing"}, {}, "starting", "creating the Ray cluster"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, {}, "starting", "Ray job PENDING"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, {}, "running", "training"),
    ({"jobDeploymentStatus": "Retrying", "failed": 1}, {"backoffLimit": 2}, "retrying", "attempt 1 of 3 failed"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, {}, "succeeded", "all stages finished"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, {}, "stopped", "stopped"),
    ({"jobDeploymentStatus": "Failed", "reason": "PreRunningDeadlineExceeded"}, {}, "failed", "did not start in time"),
    ({"jobDeploymentStatus": "Failed", "reason": "AppFailed", "message": "exit 1"}, {}, "failed",
     "exited with an error (see llmctl logs): exit 1"),
    ({"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed"}, {}, "failed", "could not be submitted"),
    ({"jobDeploymentStatus": "Failed", "reason": "JobStatusCheckTimeoutExceeded"}, {}, "failed", "stopped answering"),
    ({"jobDeploymentStatus": "ValidationFailed", "message": "bad spec"}, {}, "failed", "rejected the spec: bad spec"),
])
def test_describe_maps_rayjob_status_to_words(status, spec, state, words):
    rj = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "h100"} if spec.get("suspend") else {}},
          "spec": spec, "status": status}
    got_state, detail = describe(rj)
    assert got_state == state and words in detail


def test_progress_written_by_the_run_to_its_storage_reaches_status(kube, capsys, tmp_path):
    """The trainer needs no API token; status reads <run>/progress.json from storage."""
    rj = _submitted(kube, capsys)
    name = rj["metadata"]["name"]
    url = f"file://{tmp_path}/runs/{name}"
    write_progress(url, {"stage": "sft", "step": 10, "steps": 40, "cost_dollars": 12.5})
    _set_status(kube, rj, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, {"llmctl.dev/storage": url})
    rc, out, _ = run(capsys, "status", name)
    assert "sft step 10 / 40 (25%)" in out and "$12.50 reported by the run" in out
    assert kube.lines() == [f"GET {RAYJOBS}/{name}", "GET /api/v1/namespaces/team/pods"]  # no PATCH anywhere


def test_status_of_a_cluster_run_shows_its_tracking_runs(kube, capsys, tmp_path):
    """`<run>/tracking.json` (trainer/tracking.py, written by the driver) reaches status: tracker, name, link."""
    from trainer.storage import write_json

    rj = _submitted(kube, capsys)
    name = rj["metadata"]["name"]
    url = f"file://{tmp_path}/runs/{name}"
    link = "https://mlflow.example/#/experiments/1/runs/abc"
    write_json(f"{url}/tracking.json", {"runs": [{"kind": "mlflow", "target": "https://mlflow.example",
                                                  "run_id": "abc", "name": name, "link": link}]})
    _set_status(kube, rj, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, {"llmctl.dev/storage": url})
    rc, out, _ = run(capsys, "status", name)
    assert rc == 0 and f"tracking  mlflow run {name}: {link}" in out


def test_status_treats_the_stored_progress_as_untrusted(kube, capsys, tmp_path):
    rj = _submitted(kube, capsys)
    name = rj["metadata"]["name"]
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "progress.json").write_text(json.dumps({
        "stage": "pre\x1b[2Jtrain\nEVIL" + "x" * 500, "step": "12", "steps": -4, "tokens": float("inf"),
        "eta_seconds": True, "unknown": "dropped", "cost_dollars": 1e300}))
    _set_status(kube, rj, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                {"llmctl.dev/storage": f"file://{run_dir}"})
    rc, out, err = run(capsys, "status", name, "-o", "json")
    prog = json.loads(out)["progress"]
    assert rc == 0 and set(prog) == {"stage"}  # every other field had the wrong kind or range
    assert "\x1b" not in prog["stage"] and "\n" not in prog["stage"] and len(prog["stage"]) == 64
    (run_dir / "progress.json").write_text(" " * (64 * 1024 + 1))  # over the bound: not read at all
    rc, out, err = run(capsys, "status", name, "-o", "json")
    assert rc == 0 and json.loads(out)["progress"] is None and "over the 65,536 this reader accepts" in err
    rc, out, err = run(capsys, "status", name, "--no-storage", "-o", "json")
    assert rc == 0 and err == ""


def test_missing_namespace_is_named_by_logs_and_cancel(kube, capsys):
    for argv in (("logs", "r1", "-n", "nope"), ("cancel", "r1", "-n", "nope", "--yes")):
        rc, _, err = run(capsys, *argv)
        assert rc == 1 and "namespace nope does not exist" in err, argv


# ---------------------------------------------------------------------------------------------
# list, logs, cancel


def test_list_shows_only_llmctl_runs(kube, capsys):
    run(capsys, "submit", "--depth", "12", "--gpus", "8", "--yes")
    run(capsys, "submit", "--depth", "20", "--gpus", "16", "--yes")
    kube.add({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "someone-elses"}, "spec": {}})
    kube.requests.clear()
    rc, out, _ = run(capsys, "list")
    assert rc == 0
    assert kube.lines() == [f"GET {RAYJOBS}", "GET /apis/ray.io/v1/namespaces/team/rayclusters",
                            "GET /apis/ray.io/v1/namespaces/team/rayservices"]  # runs, idle clusters, services
    assert kube.requests[0].query == {"labelSelector": "app.kubernetes.io/managed-by=llmctl"}
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "DEPTH", "GPUS", "AGE", "ESTIMATE"] and len(lines) == 3
    assert "someone-elses" not in out and "d20" in out and "16xh100" in out
    rc, out, _ = run(capsys, "list", "-A", "-o", "json")
    assert kube.lines()[-3:] == ["GET /apis/ray.io/v1/rayjobs", "GET /apis/ray.io/v1/rayclusters",
                                 "GET /apis/ray.io/v1/rayservices"]
    assert {r["state"] for r in json.loads(out)} == {"submitted"}


def test_list_of_an_empty_namespace_says_how_to_start(kube, capsys):
    rc, out, err = run(capsys, "list")
    assert rc == 0 and out == "" and "llmctl submit" in err


def _pod(name: str, run_name: str, role: str, created: str) -> dict:
    container = {"submitter": "ray-job-submitter", "head": "ray-head", "worker": "ray-worker"}[role]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "creationTimestamp": created,
                         "labels": {"llmctl.dev/run": run_name, "llmctl.dev/role": role}},
            # bound to a node (an unscheduled pod has no log: tests/cli/test_real_cluster.py)
            "spec": {"nodeName": "gpu-0", "containers": [{"name": container, "image": "x"}]}}


def test_logs_reads_the_newest_submitter_pod(kube, capsys):
    kube.add(_pod("r1-old", "r1", "submitter", "2026-01-01T00:00:00Z"), log="attempt 1\n")
    kube.add(_pod("r1-new", "r1", "submitter", "2026-01-01T05:00:00Z"), log="step 1\nstep 2\nstep 3\n")
    rc, out, err = run(capsys, "logs", "r1", "--tail", "2")
    assert rc == 0 and out == "step 2\nstep 3\n" and "1 more submitter pod(s): r1-old" in err
    assert kube.lines() == ["GET /api/v1/namespaces/team/pods", "GET /api/v1/namespaces/team/pods/r1-new/log"]
    assert kube.requests[0].query == {"labelSelector": "llmctl.dev/run=r1,llmctl.dev/role=submitter"}
    assert kube.requests[1].query == {"container": "ray-job-submitter", "tailLines": "2"}
    kube.add(_pod("r1-head", "r1", "head", "2026-01-01T05:00:00Z"), log="ray start\n")
    rc, out, _ = run(capsys, "logs", "r1", "-f", "--role", "head")
    assert out == "ray start\n"
    assert kube.requests[-1].query == {"container": "ray-head", "follow": "true"}


def test_logs_before_the_pods_exist_explains_why(kube, capsys):
    rj = _submitted(kube, capsys, "--queue", "h100")
    rc, _, err = run(capsys, "logs", rj["metadata"]["name"])
    assert rc == 1 and "has no submitter pod yet (queued: waiting for Kueue" in err
    assert kube.lines() == ["GET /api/v1/namespaces/team/pods", f"GET {RAYJOBS}/{rj['metadata']['name']}"]


def test_cancel_deletes_the_rayjob_in_the_background(kube, capsys):
    rj = _submitted(kube, capsys)
    name = rj["metadata"]["name"]
    rc, out, err = run(capsys, "cancel", name, "--yes")
    assert rc == 0 and out == f"rayjob.ray.io/{name} deleted in namespace team\n" and "resumes" in err
    assert kube.lines() == [f"GET {RAYJOBS}/{name}", f"DELETE {RAYJOBS}/{name}"]
    assert kube.requests[1].query == {"propagationPolicy": "Background"}
    # a real server keeps it, terminating, until KubeRay removes its finalizer (tests/kube_fake.py reconcile)
    assert kube.get("rayjobs", "team", name)["metadata"]["deletionTimestamp"]
    assert kube.reconcile() == [name] and kube.get("rayjobs", "team", name) is None


def test_cancel_refusals_make_no_delete(kube, capsys, monkeypatch):
    kube.add({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "theirs"}, "spec": {}})
    rc, _, err = run(capsys, "cancel", "theirs", "--yes")
    assert rc == 1 and "not created by llmctl" in err and kube.lines() == [f"GET {RAYJOBS}/theirs"]
    kube.requests.clear()
    rc, _, err = run(capsys, "cancel", "theirs", monkeypatch=monkeypatch)  # off a terminal, no --yes
    assert rc == 2 and "pass --yes" in err and kube.requests == []


# ---------------------------------------------------------------------------------------------
# list: idle Ray clusters


def _ago(hours: float) -> str:
    import datetime

    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=hours)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _cluster(name: str, created_hours_ago: float, gpus: int = 8) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": name, "namespace": "team", "creationTimestamp": _ago(created_hours_ago)},
            "spec": {"headGroupSpec": {"template": {"spec": {"containers": [{"name": "ray-head", "image": "x"}]}}},
                     "workerGroupSpecs": [{"groupName": "gpu", "replicas": 2, "template": {"spec": {"containers": [
                         {"name": "ray-worker", "image": "x",
                          "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}}]}}


def _job_on(name: str, cluster: str, status: dict) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "namespace": "team", "labels": {"app.kubernetes.io/managed-by": "llmctl"}},
            "spec": {"clusterSelector": {"ray.io/cluster": cluster}}, "status": status}


def test_list_warns_about_a_cluster_that_ran_no_job_for_longer_than_idle_after(kube, capsys):
    kube.add(_cluster("warm", created_hours_ago=10))
    kube.add(_job_on("done", "warm", {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                                      "endTime": _ago(3)}))
    kube.add(_cluster("busy", created_hours_ago=10))
    kube.add(_job_on("training", "busy", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}))
    kube.add(_cluster("fresh", created_hours_ago=0.5))
    rc, out, err = run(capsys, "list")
    assert rc == 0 and "done" in out and "training" in out
    (line,) = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert "RayCluster warm in team has run no job for 3.0h and holds 16 GPU(s)" in line
    assert "kubectl delete raycluster warm -n team" in line
    rc, out, err = run(capsys, "list", "--idle-after", "4h")
    assert rc == 0 and "warning" not in err
    rc, out, err = run(capsys, "list", "--idle-after", "soon")
    assert rc == 2 and "--idle-after: expected a duration like 30m" in err


def test_list_without_permission_to_list_clusters_still_lists_runs(kube, capsys):
    kube.add(_cluster("warm", created_hours_ago=10))
    kube.forbid.add(("list", "rayclusters"))  # an older chart's Role: idle detection is skipped, not an error
    rc, out, err = run(capsys, "list")
    assert rc == 0 and "warning" not in err and "GET /apis/ray.io/v1/namespaces/team/rayclusters" in kube.lines()


def test_submit_local_storage_is_the_specs_default():
    """cli/submit.py names RunSpec's default storage root without importing the planner at parser-building time."""
    import dataclasses

    from cli.submit import LOCAL_STORAGE
    from trainer.plan import RunSpec

    assert LOCAL_STORAGE == next(f.default for f in dataclasses.fields(RunSpec) if f.name == "storage_root")


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def _rayjob(kube, capsys, annotations: dict, status: dict | None = None) -> str:
    assert llmctl(capsys, "submit", "--depth", "12", "--gpus", "8", "--yes", "--storage", "s3://b/x")[0] == 0
    ((_, _, name),) = [k for k in kube.objects if k[0] == "rayjobs"]
    rj = kube.get("rayjobs", "team", name)
    rj["metadata"]["annotations"].update(annotations)
    rj["status"] = status or {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                              "message": f"done{ESC}", "startTime": "2026-01-01T00:00:00Z",
                              "endTime": "2026-01-01T01:00:00Z"}
    kube.objects[("rayjobs", "team", name)] = rj
    return name


def test_hostile_status_strips_escapes_from_annotations_and_messages(kube, capsys):
    name = _rayjob(kube, capsys, {"llmctl.dev/progress": json.dumps(
        {"stage": f"pretrain{ESC}", "step": 1, "steps": 2, "updated": ESC}), "llmctl.dev/storage": f"s3://x{ESC}"})
    rc, out, err = llmctl(capsys, "status", name)
    assert rc == 0, err
    no_controls(out + err)
    # Progress is read from the run's storage now (the annotation is ignored); the storage annotation still
    # reaches the storage row and the could-not-read warning, and an OSC title is dropped whole there.
    assert "s3://x" in out and "pwned" not in out + err


def test_hostile_status_json_is_strict_and_survives_odd_annotations(kube, capsys):
    name = _rayjob(kube, capsys, {"llmctl.dev/estimate-dollars": "nan", "llmctl.dev/progress": "[1, 2]"})
    rc, out, err = llmctl(capsys, "status", name, "-o", "json")
    assert rc == 0, err
    json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in -o json"))
    rc, out, err = llmctl(capsys, "status", name)
    assert rc == 0, err


def test_hostile_list_strips_escapes(kube, capsys):
    _rayjob(kube, capsys, {}, {"jobDeploymentStatus": f"Running{ESC}", "message": ESC})
    rc, out, err = llmctl(capsys, "list")
    assert rc == 0, err
    no_controls(out + err)


def test_hostile_logs_strip_escapes_but_keep_the_text(kube, capsys):
    kube.add({"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "r1-s", "creationTimestamp": "2026-01-01T00:00:00Z",
                           "labels": {"llmctl.dev/run": "r1", "llmctl.dev/role": "submitter"}},
              "spec": {"nodeName": "n1", "containers": [{"name": "ray-job-submitter", "image": "x"}]}},
             log=f"step 1{ESC}\nstep\t2\r\n")
    rc, out, err = llmctl(capsys, "logs", "r1")
    assert rc == 0, err
    no_controls(out)
    assert out == "step 1\nstep\t2\n"

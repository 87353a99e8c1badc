"""Logs that outlive the cluster (trainer/logship.py, cli/logview.py, `llmctl logs --rank/--attempt`): every
process of a run tees its output to `<run>/logs/attempt-<K>/<driver|rank-N>/`, and `llmctl logs` reads it back
from storage alone: on a finished local run, and on the real control plane after the RayCluster (and then
the RayJob) is deleted.

Run: .venv/bin/pytest tests/test_shipped_logs.py -v
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cli.main import main
from trainer.logship import Shipper, rank_name, shipping, who_dir

ROOT = Path(__file__).resolve().parents[1]


def _llmctl(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_shipped_logs_capture_c_level_and_child_output_in_time_ordered_chunks(tmp_path):
    """fd mode (pods, Ray workers): what C libraries and child processes write reaches storage too, in chunks
    written while the process runs, and the console still gets every byte."""
    run = f"file://{tmp_path}/runs/r1"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from trainer.logship import shipping
        with shipping({run!r}, 2, "rank-3", {{}}, fd=True, interval_s=0.05) as s:
            print("python line", flush=True)
            os.write(2, b"c-level stderr\\n")
            subprocess.run(["sh", "-c", "echo from a child"], check=True)
            time.sleep(0.3)
            print("after a flush", flush=True)
        assert s.errors == 0 and s.chunks >= 2, (s.errors, s.chunks)
        print("after close: not shipped", flush=True)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "python line" in res.stdout and "from a child" in res.stdout and "c-level stderr" in res.stderr
    chunks = sorted((tmp_path / "runs/r1/logs/attempt-2/rank-3").iterdir())
    assert len(chunks) >= 2 and all(c.suffix == ".log" for c in chunks)
    text = "".join(c.read_text() for c in chunks)
    for line in ("python line", "c-level stderr", "from a child", "after a flush"):
        assert line in text
    assert text.index("python line") < text.index("after a flush")
    assert "not shipped" not in text


def test_shipped_logs_stream_mode_keeps_the_terminal_and_survives_a_storage_failure(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the logs folder should be")
    s = Shipper(f"file://{blocker}/logs/attempt-1/driver", {}, fd=False, interval_s=60)
    with s:
        print("kept on the console")
        assert sys.stdout.isatty() == sys.stdout._inner.isatty()  # the real stream's answers
        s.flush()  # fails: storage refused; the run goes on
        assert s.errors == 1
    out, err = capsys.readouterr()
    assert "kept on the console" in out and "could not ship logs" in err
    ok = Shipper(who_dir(f"file://{tmp_path}/r", 1, "driver"), {}, fd=False)
    with ok:
        print("shipped")
    assert (tmp_path / "r/logs/attempt-1/driver").is_dir()
    assert "shipped" in "".join(p.read_text() for p in (tmp_path / "r/logs/attempt-1/driver").iterdir())


def test_shipped_logs_read_by_rank_and_attempt_without_a_cluster(tmp_path, capsys):
    root = f"file://{tmp_path}"
    run = f"{root}/runs/gpt-x"
    for attempt, who, line in ((1, "driver", "first driver\n"), (1, rank_name(0), "first rank 0\n"),
                               (2, "driver", "second driver\n"), (2, rank_name(1), "second rank 1\n")):
        with shipping(run, attempt, who, {}, fd=False):
            sys.stdout.write(line)
    capsys.readouterr()
    rc, out, err = _llmctl(capsys, "logs", "gpt-x", "--local", "--storage", root)
    assert rc == 0 and "second driver" in out and "first" not in out and "attempt 2 of 2" in err
    rc, out, _ = _llmctl(capsys, "logs", "gpt-x", "--storage", root, "--attempt", "1")
    assert rc == 0 and out.endswith("first driver\n") and "second" not in out
    rc, out, _ = _llmctl(capsys, "logs", "gpt-x", "--storage", root, "--rank", "0")  # newest attempt that has it
    assert rc == 0 and "first rank 0" in out
    rc, _, err = _llmctl(capsys, "logs", "gpt-x", "--storage", root, "--rank", "0", "--attempt", "2")
    assert rc == 1 and "no rank-0 log for attempt 2" in err and "attempt 2: driver, rank-1" in err
    rc, _, err = _llmctl(capsys, "logs", "nope", "--storage", root)
    assert rc == 1 and "no shipped logs" in err


def test_shipped_logs_of_a_finished_local_run(finished_run, capsys):
    """The tiny run of tests/finished_run.py ran through trainer.launch.run: its driver and both ranks shipped."""
    run = finished_run.urls["run"]
    root = finished_run.spec.storage_root
    rc, out, err = _llmctl(capsys, "logs", finished_run.name, "--local", "--storage", root, "--rank", "1")
    assert rc == 0, err
    assert "rank-1, attempt 1" in err and out.strip(), out
    rc, out0, _ = _llmctl(capsys, "logs", run, "--local", "--rank", "0")
    assert rc == 0 and out0.strip() and out0 != out  # each rank its own log
    rc, driver, _ = _llmctl(capsys, "logs", finished_run.name, "--local", "--storage", root)
    assert rc == 0 and "pretrain" in driver  # the driver's own lines (and the relayed worker output)


# ---------------------------------------------------------------------------------------------
# On the real control plane: logs read after the cluster is gone


def test_shipped_logs_read_after_the_raycluster_is_deleted(real_cluster, s3_server, tmp_path, capsys, monkeypatch):
    from tests.controlplane.cluster import wait_for
    from tests.test_controlplane import _ns

    api = real_cluster.admin()
    ns = _ns(api, "shipped")
    bucket = s3_server.bucket("shipped")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"storageRoot": bucket}))
    kc = real_cluster.kubeconfig("admin", tmp_path / "admin.yaml", namespace=ns)
    cluster_args = ("--kubeconfig", str(kc), "-n", ns)
    rc, _, err = _llmctl(capsys, "submit", "--depth", "12", "--gpus", "8", "--yes", "--cluster-config", str(cfg),
                         "--name", "shipped-d12", *cluster_args)
    assert rc == 0, err
    _, rj = api.get(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/shipped-d12")
    run = rj["metadata"]["annotations"]["llmctl.dev/storage"]
    assert run.startswith(bucket)

    # What the run's processes ship (trainer/logship.py), written to the same S3 the pods would reach.
    opts = s3_server.storage_options
    for attempt, who, line in ((1, "driver", "driver of attempt 1\n"), (1, "rank-0", "rank 0 of attempt 1\n"),
                               (2, "rank-0", "rank 0 of attempt 2\n")):
        s = Shipper(who_dir(run, attempt, who), opts, fd=False)
        s._add(line.encode())
        s.close()
        assert s.errors == 0

    def cluster_name():
        _, j = api.get(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/shipped-d12")
        return (j.get("status") or {}).get("rayClusterName")

    name = wait_for("the operator's RayCluster", cluster_name, time.monotonic() + 180, real_cluster.procs)
    _, old = api.get(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}")
    code, out = api.request("DELETE", f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}")
    assert code in (200, 202), out

    def gone():  # the RayJob controller may make a fresh cluster of the same name: a new uid, no old pods
        code, rc = api.get(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}")
        return code == 404 or rc["metadata"]["uid"] != old["metadata"]["uid"]

    wait_for("RayCluster deleted", gone, time.monotonic() + 180, real_cluster.procs)

    def old_pods_gone():
        pods = api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=ray.io/cluster={name}")[1]["items"]
        return all(p["metadata"]["ownerReferences"][0]["uid"] != old["metadata"]["uid"] for p in pods)

    wait_for("the old cluster's pods gone", old_pods_gone, time.monotonic() + 180, real_cluster.procs)
    rc, out, err = _llmctl(capsys, "logs", "shipped-d12", "--rank", "0", *cluster_args)
    assert rc == 0, err
    assert out == "rank 0 of attempt 2\n" and "attempt 2 of 2" in err
    rc, out, err = _llmctl(capsys, "logs", "shipped-d12", "--rank", "0", "--attempt", "1", *cluster_args)
    assert rc == 0 and out == "rank 0 of attempt 1\n", err

    # And with the RayJob gone too: the storage root alone.
    code, out = api.request("DELETE", f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/shipped-d12")
    assert code in (200, 202), out
    rc, out, err = _llmctl(capsys, "logs", "shipped-d12", "--storage", bucket, "--attempt", "1")
    assert rc == 0 and out == "driver of attempt 1\n", err

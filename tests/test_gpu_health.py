"""GPU health (trainer/gpu_health.py, cli/gpuhealth.py): what counts as a GPU failure, the failed rank's node
recorded in the run's storage, `doctor --gpu-health` reading nodes and events, and on the real control plane:
a run resubmitted with --avoid-bad-nodes is kept off the node its first attempt recorded.

Run: .venv/bin/pytest tests/test_gpu_health.py -v
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from cli.gpuhealth import node_problems
from trainer.gpu_health import bad_nodes, classify, exclude_nodes, record, record_if_gpu_failure

WAIT_S = 180


@pytest.mark.parametrize("text, kind", [
    ("NVRM: Xid (PCI:0000:0f:00): 79, pid=1234, GPU has fallen off the bus.", "xid"),
    ("RuntimeError: CUDA error: uncorrectable ECC error encountered", "ecc"),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", "cuda"),
    ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error, "
     "NCCL version 2.21.5 ncclSystemError", "nccl"),
    ("[Rank 3] Watchdog caught collective operation timeout: ProcessGroupNCCL timed out", "nccl"),
    ("ValueError: loss is nan", None),
    ("KeyError: 'tokens'", None),
])
def test_gpu_health_classifies_gpu_and_fabric_failures_only(text, kind):
    assert classify(text) == kind


def test_gpu_health_a_failed_rank_records_its_node_once(tmp_path, monkeypatch):
    run = f"file://{tmp_path}/runs/r"
    monkeypatch.setenv("LLMCTL_NODE", "gke-a3-7")
    err = RuntimeError("CUDA error: uncorrectable ECC error encountered\nmore")
    assert record_if_gpu_failure(err, run, attempt=1, rank=5, storage_options={}) == "ecc"
    assert record_if_gpu_failure(RuntimeError("NCCL error: unhandled"), run, attempt=1, rank=6,
                                 storage_options={}) == "nccl"
    assert record_if_gpu_failure(ValueError("bad config"), run, attempt=1, rank=0, storage_options={}) is None
    nodes = bad_nodes(run, {})
    assert list(nodes) == ["gke-a3-7"] and nodes["gke-a3-7"]["kind"] == "ecc" and nodes["gke-a3-7"]["rank"] == 5
    assert nodes["gke-a3-7"]["error"] == "RuntimeError: CUDA error: uncorrectable ECC error encountered"
    monkeypatch.delenv("LLMCTL_NODE")
    assert record_if_gpu_failure(err, run, attempt=2, rank=1, storage_options={}) is None  # no node known


def test_gpu_health_exclusion_is_anded_into_every_term():
    spec = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}, {"matchFields": []}]}}}}
    exclude_nodes(spec, ["n2", "n1", "n2"])
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    for t in terms:
        assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1", "n2"]} in t["matchExpressions"]


def _node(name="n", cap=8, alloc=8, conditions=(), taints=(), unschedulable=False):
    return {"metadata": {"name": name}, "spec": {"taints": list(taints), "unschedulable": unschedulable},
            "status": {"capacity": {"nvidia.com/gpu": str(cap)}, "allocatable": {"nvidia.com/gpu": str(alloc)},
                       "conditions": [{"type": "Ready", "status": "True"}, *conditions]}}


def test_gpu_health_node_problems_from_device_plugin_conditions_taints_and_xid_events():
    assert node_problems(_node(taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])) == []
    assert node_problems(_node(conditions=[{"type": "MemoryPressure", "status": "False"},
                                           {"type": "GpuHealthy", "status": "True"}])) == []
    probs = node_problems(
        _node(alloc=7, conditions=[{"type": "GpuXidError", "status": "True", "message": "Xid 48 DBE"},
                                   {"type": "NVLinkHealthy", "status": "False"}],
              taints=[{"key": "nvsentinel.dgxc.nvidia.com/quarantine", "effect": "NoExecute"}], unschedulable=True),
        [{"involvedObject": {"kind": "Node", "name": "n"}, "reason": "XidError", "count": 3,
          "message": "NVRM: Xid (PCI:0000:0f:00): 79, GPU has fallen off the bus"},
         {"involvedObject": {"kind": "Node", "name": "other"}, "reason": "XidError", "message": "Xid 13"}])
    assert probs == ["1 of 8 GPUs withdrawn by the device plugin", "condition GpuXidError=True: Xid 48 DBE",
                     "condition NVLinkHealthy=False", "taint nvsentinel.dgxc.nvidia.com/quarantine:NoExecute",
                     "cordoned", "Xid 79 (XidError, 3x): NVRM: Xid (PCI:0000:0f:00): 79, GPU has fallen off the bus"]


# ---------------------------------------------------------------------------------------------
# On the real control plane


def test_gpu_health_real_cluster_doctor_lists_the_sick_node_and_the_retry_keeps_off_it(
        real_cluster, s3_server, tmp_path, capsys, monkeypatch):
    from cli.main import main
    from tests.controlplane.cluster import wait_for
    from tests.test_controlplane import _ns

    api = real_cluster.admin()
    ns = _ns(api, "gpu-health")
    pool = {"llmctl.test/pool": "gpu-health"}
    for name in ("gh-0", "gh-1"):
        real_cluster.add_node(name, "eks-p5.48xlarge", pool)
    # The device plugin withdrew a GPU on gh-sick, and node-problem-detector reported an Xid on it.
    real_cluster.add_node("gh-sick", "aks-nd96isr-h100-v5", {"llmctl.test/pool": "gpu-health-sick"})
    code, out = api.request("PATCH", "/api/v1/nodes/gh-sick/status",
                            {"status": {"allocatable": {"nvidia.com/gpu": "7"}}},
                            content_type="application/merge-patch+json")
    assert code == 200, out
    api.create("/api/v1/namespaces/default/events", {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "gh-sick.xid"},
        "involvedObject": {"kind": "Node", "name": "gh-sick", "apiVersion": "v1"}, "reason": "XidError",
        "message": "NVRM: Xid (PCI:0000:0f:00): 79, pid=0, GPU has fallen off the bus.", "type": "Warning",
        "count": 1, "source": {"component": "kernel-monitor", "host": "gh-sick"}})
    kc = real_cluster.kubeconfig("admin", tmp_path / "admin.yaml", namespace=ns)
    argv = ("--kubeconfig", str(kc), "-n", ns)

    def doctor_sees():
        rc = main(["doctor", "--gpu-health", *argv])
        out = capsys.readouterr().out
        line = next((ln for ln in out.splitlines() if " gh-sick " in ln), "")
        return (rc, out, line) if "Xid 79" in line else None

    rc, out, line = wait_for("doctor --gpu-health sees gh-sick", doctor_sees, time.monotonic() + WAIT_S,
                             real_cluster.procs)
    assert rc == 1 and line.startswith("✗") and "1 of 8 GPUs withdrawn" in line, out
    assert any(ln.startswith("✓") and " gh-0 " in ln for ln in out.splitlines()), out

    # A run on the pool; its rank fails with a GPU error and records its node.
    bucket = s3_server.bucket("gpu-health")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"storageRoot": bucket, "tmpSize": "2Gi",  # the p5's 20 GiB root disk
                                   "workers": {"nodeSelectors": {"h100": pool}, "scratchSize": "4Gi"},
                                   "lifecycle": {"backoffLimit": 0}}))
    submit = ["submit", "--depth", "12", "--gpus", "8", "--yes", "--cluster-config", str(cfg), "--name", "gh-d12",
              "--avoid-bad-nodes", *argv]
    assert main(submit) == 0, capsys.readouterr().err
    capsys.readouterr()

    def worker_node(uid=None):
        _, pods = api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=llmctl.dev/run=gh-d12,llmctl.dev/role=worker")
        for p in pods.get("items", []):
            if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp") and p["metadata"]["uid"] != uid:
                return p
        return None

    first = wait_for("the first attempt's worker placed", worker_node, time.monotonic() + WAIT_S, real_cluster.procs)
    bad = first["spec"]["nodeName"]
    assert bad in ("gh-0", "gh-1")
    env = {e["name"]: e for e in first["spec"]["containers"][0]["env"]}
    assert env["LLMCTL_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    _, rj = api.get(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/gh-d12")
    run = rj["metadata"]["annotations"]["llmctl.dev/storage"]
    record(run, bad, "xid", "Xid 79: GPU has fallen off the bus", attempt=1, rank=3,
           storage_options=s3_server.storage_options)  # what trainer.logship.rank_logged does on the rank

    # The run is retried: cancelled, then submitted again (it resumes from its checkpoint) and kept off the node.
    assert main(["cancel", "gh-d12", "--yes", *argv]) == 0
    wait_for("the first RayJob gone", lambda: api.get(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/gh-d12")[0] == 404,
             time.monotonic() + WAIT_S, real_cluster.procs)
    capsys.readouterr()
    assert main(submit) == 0
    err = capsys.readouterr().err
    assert f"keeping workers off 1 node(s) this run recorded as failing: {bad} (xid)" in err, err
    second = wait_for("the retry's worker placed", lambda: worker_node(first["metadata"]["uid"]),
                      time.monotonic() + WAIT_S, real_cluster.procs)
    assert second["spec"]["nodeName"] not in (bad, "gh-sick")


def test_gpu_health_fleet_dashboard_has_dcgm_panels_joined_to_runs():
    import json
    from pathlib import Path

    d = json.loads((Path(__file__).resolve().parents[1] / "charts/llmctl/dashboards/fleet.json").read_text())
    dcgm = {p["title"]: p for p in d["panels"] if p["title"].startswith("DCGM:")}
    assert set(dcgm) == {"DCGM: GPU Xid errors per node", "DCGM: ECC errors per node",
                         "DCGM: time throttled (power, thermal)"}
    exprs = " ".join(t["expr"] for p in dcgm.values() for t in p["targets"])
    for metric in ("DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_POWER_VIOLATION",
                   "DCGM_FI_DEV_THERMAL_VIOLATION"):
        assert metric in exprs
    for p in dcgm.values():  # each joined to the run's pods, so $run filters it
        assert all('group_left (run)' in t["expr"] and 'llmctl_run_info{run=~"$run"}' in t["expr"] for t in p["targets"])


# ---------------------------------------------------------------------------------------------
# --preflight (trainer/preflight.py)


def test_gpu_health_preflight_judges_wrong_and_slow_nodes():
    from trainer.preflight import judge

    rows = [{"rank": 0, "node": "a", "tflops": 700.0, "err": 0.004, "busbw": 420.0},
            {"rank": 1, "node": "a", "tflops": 690.0, "err": 0.004, "busbw": 410.0},
            {"rank": 2, "node": "b", "tflops": 700.0, "err": 0.9, "busbw": 400.0},
            {"rank": 3, "node": "c", "tflops": 700.0, "err": 0.004, "busbw": 400.0},
            {"rank": 4, "node": "c", "tflops": 90.0, "err": 0.004, "busbw": 400.0}]
    nodes = judge(rows)
    assert nodes["a"]["ok"] and nodes["a"]["ranks"] == [0, 1] and nodes["a"]["allreduce_busbw_gbs"] == 410.0
    assert not nodes["b"]["ok"] and "matmul wrong by 0.9" in nodes["b"]["why"]
    assert not nodes["c"]["ok"] and "rank(s) [4] below 30%" in nodes["c"]["why"]


def _two_rank_check(rank: int, init: str, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from trainer.preflight import run_check

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    row = run_check(torch.device("cpu"), rank, rank, 2, node="n0")
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(row, f)


def test_gpu_health_preflight_matmul_and_node_allreduce_on_two_cpu_ranks(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.start_processes(_two_rank_check, args=(f"file://{tmp_path}/store", str(tmp_path / "row")), nprocs=2,
                       start_method="spawn")
    rows = [json.loads((tmp_path / f"row.{r}").read_text()) for r in (0, 1)]
    for r in rows:
        assert r["node"] == "n0" and r["tflops"] > 0 and r["err"] < 1e-5 and r["busbw"] > 0


def test_gpu_health_preflight_runs_on_ray_train_and_stores_its_result(tiny_inputs, ray_cluster):
    from tests.finished_run import tiny_plan
    from trainer.preflight import run_preflight
    from trainer.storage import read_json

    p = tiny_plan(tiny_inputs, "preflight-check")
    doc = run_preflight(p, {}, attempts=1, workers=2, local=True)
    assert doc == read_json(f"{p.urls['run']}/preflight.json", {})
    assert doc["ok"] and doc["attempt"] == 1
    (node,) = doc["nodes"].values()  # both ranks on this machine: one node, one all-reduce group
    assert node["ranks"] == [0, 1] and node["ok"] and node["allreduce_busbw_gbs"] > 0


def test_gpu_health_preflight_flag_reaches_the_run(capsys):
    from cli.main import main

    assert main(["submit", "--depth", "12", "--gpus", "16", "--storage", "s3://b", "--dry-run", "--preflight",
                 "-o", "json"]) == 0
    rj = json.loads(capsys.readouterr().out)
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "LLMCTL_PREFLIGHT", "value": "1"} in head["env"]  # the driver (trainer.launch) runs it


def test_gpu_health_preflight_speed_is_judged_on_gpus_only():
    from trainer.preflight import judge

    rows = [{"rank": 0, "node": "cpu", "tflops": 0.01, "err": 0.0, "busbw": 1.0},
            {"rank": 1, "node": "cpu", "tflops": 0.2, "err": 0.0, "busbw": 1.0}]
    assert judge(rows, speed=False)["cpu"]["ok"] and not judge(rows)["cpu"]["ok"]

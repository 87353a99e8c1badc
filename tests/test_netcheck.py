"""trainer/netcheck.py, cli/netcheck.py and trainer/network.py: the all-reduce measurement on a real local Ray
cluster (gloo, 2 workers), the verdict and its likely causes, the check's RayJob strictly valid on every
supported KubeRay release, and the multi-node step model the planner uses."""

import pytest

from cli.cluster import ClusterConfig
from tests import schemas
from trainer import netcheck, network
from trainer.plan import RunSpec, plan


def test_gloo_all_reduce_bandwidth_on_local_ray(ray_cluster):
    out = netcheck.run_check(2, use_gpu=False, sizes=(netcheck.SMALL, 1 << 20), iters=3)
    assert out["backend"] == "gloo" and len(out["ranks"]) == 2
    small, big = out["results"]
    assert (small["bytes"], big["bytes"]) == (netcheck.SMALL, 1 << 20)
    for r in out["results"]:
        assert r["seconds"] > 0 and r["busbw"] == pytest.approx(r["algbw"] * 2 * (2 - 1) / 2)
    assert big["algbw"] > small["algbw"]  # bandwidth-bound at 1 MiB, latency-bound at 8 KiB
    ok, lines = netcheck.verdict(out["results"], expected_busbw=1e15, world=2, nodes=1, env={}, rdma=[],
                                 backend="gloo")
    assert not ok and lines[0].startswith("✗ all-reduce bus bandwidth") and "gloo is not NCCL" in lines[-1]


@pytest.mark.parametrize("env, rdma, nodes, cause", [
    ({"NCCL_IB_DISABLE": "1"}, ["mlx5_0"], 2, "TCP sockets"),
    ({}, [], 2, "no RDMA device"),
    ({}, [], 1, "one node only"),
    ({}, ["mlx5_0"], 2, "GPUDirect RDMA"),
])
def test_likely_causes(env, rdma, nodes, cause):
    results = [{"bytes": 8192, "seconds": 1e-3, "algbw": 8e6, "busbw": 1.5e7},
               {"bytes": 1 << 28, "seconds": 0.1, "algbw": 2.7e9, "busbw": 5e9}]
    ok, lines = netcheck.verdict(results, expected_busbw=300e9, world=16, nodes=nodes, env=env, rdma=rdma,
                                 backend="nccl")
    assert not ok and cause in lines[-1]
    ok, lines = netcheck.verdict(results, expected_busbw=6e9, world=16, nodes=2, env={}, rdma=[], backend="nccl")
    assert ok and lines[0].startswith("✓") and len(lines) == 2


@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
def test_netcheck_rayjob_validates_on_every_kuberay(release):
    from cli.netcheck import build_netcheck_rayjob

    rj = build_netcheck_rayjob(16, ClusterConfig(kuberay_version=release), namespace="team")
    schemas.validate(rj, {"kuberay": release})
    assert rj["spec"]["entrypoint"] == "python -m trainer.netcheck --gpus 16 --expect-gbs 300 --node-gpus 8"
    assert rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2  # the run's layout: 2 nodes
    one = build_netcheck_rayjob(8, ClusterConfig(kuberay_version=release), namespace="team", expect_gbs=420)
    assert "--expect-gbs 420" in one["spec"]["entrypoint"]


def test_doctor_network_dry_run_prints_the_rayjob_and_refuses_one_gpu(capsys, tmp_path, monkeypatch):
    import yaml

    from cli.main import main

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert main(["doctor", "--network", "--gpus", "16", "--dry-run", "-n", "team"]) == 0
    rj = yaml.safe_load(capsys.readouterr().out)
    assert rj["kind"] == "RayJob" and rj["spec"]["entrypoint"].startswith("python -m trainer.netcheck --gpus 16")
    assert main(["doctor", "--network", "--gpus", "1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpus must be at least 2" in err


def test_multi_node_steps_pay_for_the_fabric_and_one_node_does_not():
    one, four = plan(RunSpec(depth=26, gpus=8)), plan(RunSpec(depth=26, gpus=32))
    assert network.step_breakdown(one)["interconnect_seconds"] == 0
    b = network.step_breakdown(four)
    s = network.param_bytes(four.params)
    expect = (s * 2 * 31 / 32 / network.FABRIC_BUSBW + network.COLLECTIVES_PER_STEP * 2 * 5 * network.FABRIC_LATENCY
              - s * 2 * 7 / 8 / network.NVLINK_BUSBW)
    assert b["interconnect_seconds"] == pytest.approx(expect)
    # No longer linear: 4x the GPUs trains less than 4x as fast, and a TCP fallback costs far more.
    assert four.estimate.tokens_per_second < 4 * one.estimate.tokens_per_second
    tcp = plan(RunSpec(depth=26, gpus=32, interconnect_busbw_gbs=network.TCP_BUSBW / 1e9))
    assert network.step_breakdown(tcp)["interconnect_share"] > 0.5 > b["interconnect_share"]
    assert tcp.estimate.total_dollars > four.estimate.total_dollars


def test_plan_shows_the_interconnect_share(capsys):
    from cli.main import main

    assert main(["plan", "--depth", "26", "--gpus", "32"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("interconnect"))
    assert "% of each" in row and "GB/s bus bandwidth" in row
    assert main(["plan", "--depth", "26", "--gpus", "32", "--interconnect-gbs", "0"]) == 2

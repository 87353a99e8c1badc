"""trainer/netcheck.py, cli/netcheck.py and trainer/plan/interconnect.py: the all-reduce measurement on a real local Ray
cluster (gloo, 2 workers), the verdict and its likely causes, the check's RayJob strictly valid on every
supported KubeRay release, and the multi-node step model the planner uses."""

import pytest

from cli.kube.config import ClusterConfig
from tests import schemas
from trainer import netcheck
from trainer.plan import interconnect as network
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


# ---------------------------------------------------------------------------------------------
# `llmctl doctor --network` against the API stand-in: it waits for the RayJob, reads the result from the
# submitter's log, prints ✓/✗, and stores a ✓ figure in the cluster config, which `plan` and `submit` then use.

NAME = "netcheck-16gpu-a1b2c3"  # each check's name ends in 6 random hex digits; the fixture fixes them
RUNNING = [{"jobDeploymentStatus": "Initializing"},
           {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": f"{NAME}-raycluster"}]


def result_log(**fields) -> str:
    import json

    doc = {"ok": True, "busbw_gbs": 287.46, "latency_us": 41.2, "expected_gbs": 300.0, "world": 16, "nodes": 2,
           "backend": "nccl", "cause": None, "results": []}
    doc.update(fields)
    return "✓ all-reduce bus bandwidth (the check's own lines)\n" + json.dumps(doc) + "\n"


@pytest.fixture
def kube(tmp_path, monkeypatch):
    """The chart's objects and RBAC (user ada), a submitter pod whose log is set per test, fast polling."""
    from cli import console
    from cli.kube.pods import CONTAINERS
    from tests.kube_fake import FakeKube
    from tests.cli.test_doctor import chart, setup

    monkeypatch.setattr(console, "POLL_SECONDS", 0.01)
    monkeypatch.setattr("secrets.token_hex", lambda n=None: "a1b2c3")
    with FakeKube() as k:
        token = setup(k, chart())
        monkeypatch.setenv("KUBECONFIG", str(k.kubeconfig(tmp_path / "kc", token=token)))
        k.submitter = {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{NAME}-x7k2p", "labels": {"llmctl.dev/run": NAME, "llmctl.dev/role": "submitter"}},
            "spec": {"containers": [{"name": CONTAINERS["submitter"], "image": "x"}]}}
        yield k


def stored(kube) -> dict | None:
    import yaml

    text = (kube.get("configmaps", "team", "llmctl-config").get("data") or {}).get("interconnect.yaml")
    return None if text is None else yaml.safe_load(text)


def test_doctor_network_waits_prints_the_measurement_and_stores_it_for_plan(kube, capsys):
    import json

    from cli.main import main

    kube.add(kube.submitter, log=result_log())
    kube.status_script[("rayjobs", "team", NAME)] = [*RUNNING, {"jobDeploymentStatus": "Complete",
                                                                "jobStatus": "SUCCEEDED"}]
    assert main(["doctor", "--network", "--gpus", "16", "--timeout", "60"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["✓ all-reduce bus bandwidth 287.5 GB/s over 16 ranks on 2 node(s) (nccl); "
                                "expected ~300 GB/s", "  latency 41 us per small all-reduce"]
    assert f"{NAME}: starting" in err and f"{NAME}: running" in err and f"{NAME}: succeeded" in err
    assert "stored in ConfigMap llmctl-config (interconnect.yaml): 287.46 GB/s measured" in err
    doc = stored(kube)
    assert doc["busbwGBs"] == 287.46 and doc["gpus"] == 16 and doc["rayjob"] == NAME and doc["latencyUs"] == 41.2
    assert kube.get("configmaps", "team", "llmctl-config")["data"]["config.yaml"]  # the chart's key untouched
    assert "PATCH /api/v1/namespaces/team/configmaps/llmctl-config" in kube.lines()  # allowed by the chart's Role

    # The planner now prices multi-node runs at the measured figure and says so, with the date.
    assert main(["plan", "--depth", "26", "--gpus", "32", "--from-cluster"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("interconnect"))
    assert f"at 287 GB/s bus bandwidth, measured {doc['measuredAt'][:10]} by llmctl doctor --network over 16 GPUs" \
        in row
    assert main(["plan", "--depth", "26", "--gpus", "32", "--from-cluster", "-o", "json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["spec"]["interconnect_busbw_gbs"] == 287.46
    assert main(["plan", "--depth", "26", "--gpus", "32", "-o", "json"]) == 0  # offline: the default fabric
    default = json.loads(capsys.readouterr().out)
    assert default["spec"].get("interconnect_busbw_gbs") is None
    assert measured["estimate"]["total_hours"] > default["estimate"]["total_hours"]  # 287 < 300 GB/s: slower
    assert main(["plan", "--depth", "26", "--gpus", "32", "--from-cluster", "--interconnect-gbs", "100"]) == 0
    assert "100 GB/s bus bandwidth, given (--interconnect-gbs)" in capsys.readouterr().out  # the flag wins

    # A submit reads the same ConfigMap: its plan table and the run's plan carry the measured figure.
    assert main(["submit", "--depth", "12", "--gpus", "16", "--yes", "-o", "json"]) == 0
    out, err = capsys.readouterr()
    assert f"at 287 GB/s bus bandwidth, measured {doc['measuredAt'][:10]}" in err
    assert '"interconnect_busbw_gbs":287.46}' in json.loads(out)["spec"]["entrypoint"].replace("\\", "")


def test_doctor_network_failure_prints_the_cause_and_stores_nothing(kube, capsys):
    from cli.main import main

    cause = "no RDMA device in the worker pod (/sys/class/infiniband is empty): NCCL fell back to TCP \x1b[31msockets"
    kube.add(kube.submitter, log=result_log(ok=False, busbw_gbs=9.1, cause=cause))
    kube.status_script[("rayjobs", "team", NAME)] = [*RUNNING, {"jobDeploymentStatus": "Failed", "reason": "AppFailed"}]
    assert main(["doctor", "--network", "--gpus", "16"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("✗ all-reduce bus bandwidth 9.1 GB/s over 16 ranks")
    assert out.splitlines()[-1] == ("  likely cause: no RDMA device in the worker pod (/sys/class/infiniband is "
                                    "empty): NCCL fell back to TCP sockets")  # the escape sequence is gone
    assert "not stored in the cluster config" in err and "--interconnect-gbs 9.1" in err
    assert stored(kube) is None and not any(line.startswith("PATCH") for line in kube.lines())


def test_doctor_network_gives_up_at_its_timeout_and_refuses_bad_or_missing_results(kube, capsys):
    from cli.main import main

    kube.status_script[("rayjobs", "team", NAME)] = [RUNNING[-1]]  # running, and never ends
    assert main(["doctor", "--network", "--gpus", "16", "--timeout", "0.2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"the check did not finish within 0 s (--timeout); RayJob {NAME} is still running: "
                            f"llmctl status {NAME} -n team, llmctl logs {NAME}")
    assert stored(kube) is None

    kube.objects.pop(("rayjobs", "team", NAME))
    kube.add(kube.submitter, log=result_log(busbw_gbs=float("nan")))  # json.dumps writes NaN: not a figure
    kube.status_script[("rayjobs", "team", NAME)] = [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
    assert main(["doctor", "--network", "--gpus", "16"]) == 1
    err = capsys.readouterr().err
    assert "without a valid result line in its log" in err and stored(kube) is None

    assert main(["doctor", "--network", "--gpus", "16", "--timeout", "-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--timeout must be a number of seconds > 0" in err


def test_parse_result_takes_the_last_json_line_and_checks_it():
    from cli.netcheck import parse_result

    log = result_log(busbw_gbs=1.0) + "noise {not json\n" + result_log(busbw_gbs=2.0) + "trailing text\n"
    assert parse_result(log)["busbw_gbs"] == 2.0
    assert parse_result("no result here\n") is None
    assert parse_result(result_log(ok="yes")) is None and parse_result(result_log(latency_us=-1)) is None
    assert parse_result(result_log(world=True))["world"] is None  # a bool is not a count


def test_a_cluster_config_file_carries_a_measured_interconnect(tmp_path, capsys):
    from cli.main import main

    f = tmp_path / "cluster.yaml"
    f.write_text("storageRoot: s3://b\ninterconnect:\n  busbwGBs: 120\n  measuredAt: '2026-11-02T10:00:00Z'\n  gpus: 16\n")
    assert main(["plan", "--depth", "26", "--gpus", "32", "--cluster-config", str(f)]) == 0
    assert "120 GB/s bus bandwidth, measured 2026-11-02 by llmctl doctor --network over 16 GPUs" in capsys.readouterr().out
    f.write_text("interconnect:\n  busbwGBs: -3\n")
    assert main(["plan", "--depth", "26", "--gpus", "32", "--cluster-config", str(f)]) == 2
    assert "interconnect.busbwGBs: must be a number of GB/s > 0" in capsys.readouterr().err


def test_the_checks_result_line_is_what_doctor_reads_back():
    import json

    from cli.netcheck import parse_result, result_lines

    out = {"backend": "nccl", "results": [{"bytes": 8192, "seconds": 40e-6, "algbw": 2e8, "busbw": 3.8e8},
                                          {"bytes": 1 << 28, "seconds": 0.9e-3, "algbw": 1.5e11, "busbw": 2.8e11}]}
    line = netcheck.result_line(out, ok=True, expected_gbs=300, world=16, nodes=2, cause=None)
    back = parse_result("✓ ...\n" + json.dumps(line) + "\n")
    assert back["busbw_gbs"] == pytest.approx(280) and back["latency_us"] == pytest.approx(40)
    assert result_lines(back)[0] == "✓ all-reduce bus bandwidth 280.0 GB/s over 16 ranks on 2 node(s) (nccl); expected ~300 GB/s"

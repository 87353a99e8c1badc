"""Elastic and spot runs from the CLI's side: `plan --min-gpus --spot` (both prices, the preemption overhead,
Young/Daly), and the RayJob `submit --dry-run` renders (worker replica range, autoscaling, spot placement),
validated strictly against every supported KubeRay release; bad combinations refused in one line.

Run: .venv/bin/pytest tests/plan/test_spot.py
"""

from __future__ import annotations

import math

import pytest
import yaml

from cli.kube.config import ClusterConfig
from cli.errors import UsageError
from cli.main import main
from cli.kube.rayjob import build_rayjob
from tests import schemas
from trainer.plan import spot
from trainer.launch import worker_count
from trainer.plan import RunSpec, plan

STORAGE = "s3://llmctl-runs"


def _rayjob(cfg: ClusterConfig, **spec):
    p = plan(RunSpec(depth=26, gpus=16, storage_root=STORAGE, **spec))
    return p, build_rayjob(p, cfg, namespace="team")


def _workers(rj):
    return rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
@pytest.mark.parametrize("provider", ["gke", "eks", "label"])
def test_elastic_spot_rayjob_validates_against_every_kuberay(release, provider):
    cfg = ClusterConfig(kuberay_version=release, spot_provider=provider,
                        spot_node_selector={"pool": "spot"} if provider == "label" else {},
                        spot_tolerations=({"key": "spot", "operator": "Exists", "effect": "NoSchedule"},))
    p, rj = _rayjob(cfg, min_gpus=8, spot=True)
    schemas.validate(rj, {"kuberay": release})
    w = _workers(rj)
    assert (w["replicas"], w["minReplicas"], w["maxReplicas"]) == (2, 1, 2)
    assert rj["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    pod = w["template"]["spec"]
    want = {"gke": {"cloud.google.com/gke-spot": "true"}, "eks": {"eks.amazonaws.com/capacityType": "SPOT"},
            "label": {"pool": "spot"}}[provider]
    assert want.items() <= pod["nodeSelector"].items()
    keys = [t["key"] for t in pod["tolerations"]]
    assert "spot" in keys and ("cloud.google.com/gke-spot" in keys) == (provider == "gke")
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert not set(want) & set(head.get("nodeSelector", {}))  # the head stays on on-demand capacity
    assert worker_count(p) == (8, 16)  # Ray Train's elastic ScalingConfig(num_workers=(min, max))


def test_fixed_on_demand_rayjob_is_unchanged_by_the_elastic_code():
    p, rj = _rayjob(ClusterConfig())
    w = _workers(rj)
    assert (w["replicas"], w["minReplicas"], w["maxReplicas"]) == (2, 2, 2)
    assert rj["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is False
    assert "cloud.google.com/gke-spot" not in w["template"]["spec"].get("nodeSelector", {})
    assert worker_count(p) == 16
    assert p.name == plan(RunSpec(depth=26, gpus=16, storage_root=STORAGE, min_gpus=8, spot=True)).name


@pytest.mark.parametrize("data, message", [
    ({"spotProvider": "azure"}, "cluster config spotProvider: must be one of gke, eks, label, got 'azure'"),
    ({"spotProvider": "label"}, "cluster config spotNodeSelector: must name the spot nodes' label"),
    ({"spotPrices": {"h100": -1}}, "cluster config spotPrices.h100: must be >= 0, got -1"),
])
def test_spot_config_names_the_bad_key(data, message):
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        ClusterConfig.from_dict(data)


def test_spot_estimate_formulas():
    p = plan(RunSpec(depth=26, gpus=16, spot=True, preemptions_per_hour=0.5))
    x = spot.estimate(p)
    assert x.nodes == 2 and x.spot_price == 2.25
    assert x.expected_preemptions == pytest.approx(0.5 * 2 * p.estimate.total_hours)
    assert x.lost_hours_per_preemption == pytest.approx(x.checkpoint_interval_hours / 2 + spot.RESTART_HOURS)
    assert x.spot_dollars == pytest.approx((p.estimate.total_hours + x.expected_preemptions * x.lost_hours_per_preemption)
                                           * 16 * 2.25)
    assert x.young_daly_hours == pytest.approx(math.sqrt(2 * x.checkpoint_hours * 1 / (0.5 * 2)))
    assert spot.estimate(p, spot_price=1.0).spot_dollars < x.spot_dollars
    # a higher preemption rate asks for more frequent checkpoints
    assert spot.estimate(p, preemptions_per_hour=2.0).young_daly_hours < x.young_daly_hours


def test_plan_min_gpus_spot_shows_both_prices_and_the_preemption_overhead(capsys):
    assert main(["plan", "--depth", "26", "--gpus", "16", "--min-gpus", "8", "--spot"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip() and not line.startswith(" ")}
    assert "$3.00/GPU-h" in rows["on-demand"] and "$2.25/GPU-h" in rows["spot"]
    assert "lost each" in rows["preemption"] and "restart" in rows["preemption"]
    assert "Young/Daly" in rows["checkpoints"]
    assert "8-16 GPUs" in rows["elastic"] and "4 accum" in rows["elastic"]


@pytest.mark.parametrize("argv, message", [
    (["--min-gpus", "32"], "min_gpus: must be an integer from 1 to --gpus (16), got 32"),
    (["--min-gpus", "3"], "gpus: 1,048,576 tokens per step = 512 sequences of 2048, which 3 GPUs cannot share evenly; the recipe keeps the total batch fixed"),
    (["--preemptions-per-hour", "-1", "--spot"], "preemptions_per_hour: must be a positive rate"),
])
def test_elastic_bad_combinations_are_one_line_exit_2(capsys, argv, message):
    assert main(["plan", "--depth", "26", "--gpus", "16", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
def test_submit_dry_run_renders_the_elastic_spot_rayjob(capsys, release):
    assert main(["submit", "--depth", "26", "--gpus", "16", "--min-gpus", "8", "--spot", "--dry-run",
                 "--storage", STORAGE, "--kuberay-version", release]) == 0
    out, err = capsys.readouterr()
    rj = yaml.safe_load(out)
    schemas.validate(rj, {"kuberay": release})
    assert _workers(rj)["minReplicas"] == 1 and "spot" in err and "on-demand" in err

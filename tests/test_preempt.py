"""trainer/preempt.py: the grace period sized from the save, the refusal, the flag a SIGTERM sets, and the
preStop hook's worker discovery. The end-to-end SIGTERM test on local Ray is in tests/test_launch.py
(test_sigterm_preempt_...)."""

import os
import signal

import pytest

from trainer import preempt
from trainer.plan.pricing import CHECKPOINT_BANDWIDTH, checkpoint_bytes
from trainer.plan import RunSpec, plan


def test_grace_period_grows_with_depth_and_covers_step_plus_save():
    small, big = plan(RunSpec(depth=12, gpus=8)), plan(RunSpec(depth=26, gpus=8))
    assert preempt.save_seconds(big) == pytest.approx(checkpoint_bytes(big.params) / CHECKPOINT_BANDWIDTH)
    assert preempt.grace_seconds(big) > preempt.grace_seconds(small)
    g = preempt.grace_seconds(big)
    assert g >= preempt.step_seconds(big) + preempt.save_seconds(big) + preempt.GRACE_MARGIN_S
    assert preempt.check_grace(big, None) == g == preempt.check_grace(big, g)


def test_grace_period_over_the_clusters_limit_is_refused_in_one_line():
    p = plan(RunSpec(depth=26, gpus=8))
    with pytest.raises(ValueError, match=r"^lifecycle.maxGraceSeconds: an emergency checkpoint at depth 26 "
                                         r"needs ~\d+s") as e:
        preempt.check_grace(p, 30)
    assert "\n" not in str(e.value)


def test_sigterm_sets_the_flag_instead_of_exiting():
    old = signal.getsignal(signal.SIGTERM)
    try:
        preempt.install()  # the main thread here: installed directly
        assert not preempt.pending()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.pending() and preempt.reason() == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, old)
        preempt._flag.clear()
        preempt._reason.clear()


def test_prestop_hook_waits_within_the_grace_period():
    hook = preempt.prestop_hook(95)
    assert hook["exec"]["command"][-2:] == ["--wait", "93"]
    assert os.getpid() not in preempt.worker_pids()  # only Ray Train worker actors, by process title


def test_rayjob_pods_get_the_grace_period_and_the_prestop_save(tmp_path):
    from cli.kube.config import ClusterConfig
    from cli.kube.rayjob import build_rayjob
    from tests import schemas

    p = plan(RunSpec(depth=26, gpus=16, storage_root="s3://b/llmctl"))
    rj = build_rayjob(p, ClusterConfig(max_grace_seconds=120), namespace="team")
    cluster = rj["spec"]["rayClusterSpec"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == preempt.grace_seconds(p) <= 120
        hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:3] == ["python", "-m", "trainer.preempt"]
    schemas.validate(rj)  # strict: the pod fields exist where we put them


def test_submit_refuses_a_save_that_cannot_fit_the_clusters_grace_period(tmp_path, capsys, monkeypatch):
    from cli.main import main

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    cfg = tmp_path / "config.yaml"
    cfg.write_text("storageRoot: s3://b/llmctl\nlifecycle:\n  maxGraceSeconds: 30\n")
    code = main(["submit", "--depth", "26", "--gpus", "8", "--dry-run", "--cluster-config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs ~" in err and "over the 30s" in err, err

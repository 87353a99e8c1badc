"""trainer/watchdog.py: the bound, naming the stuck rank, the dump; and end to end on local Ray (gloo): one
rank sleeps inside a step, the watchdog fires and names it, the stacks land in storage, the LlmctlStepStale
alert fires in a real Prometheus naming that rank and its pod, and the run restarts and completes."""

import json
import os
import threading


from trainer.watchdog import FLOOR_S, STARTUP_S, Watchdog, hang_bound, stuck_ranks


def test_bound_is_ten_times_the_median_with_a_floor_and_a_startup_allowance():
    assert hang_bound([]) == STARTUP_S
    assert hang_bound([1.0, 2.0, 100.0]) == FLOOR_S  # one slow step does not move the median
    assert hang_bound([40.0] * 5) == 400.0
    assert hang_bound([0.1] * 5, floor=2.0) == 2.0


def test_stuck_ranks_are_the_ones_behind_at_the_collective():
    assert stuck_ranks({0: 9, 1: 8, 2: 9, 3: None}) == [1, 3]
    assert stuck_ranks({0: 9, 1: 9}) == []  # all arrived: stuck inside the collective, nobody to name
    assert stuck_ranks({}) == []


def test_a_hung_step_dumps_stacks_names_the_rank_and_calls_on_hang(tmp_path):
    import torch.distributed as dist

    store = dist.HashStore()  # the same Store API as the process group's TCPStore
    fired = threading.Event()
    dogs = [Watchdog(rank=r, world=2, hang_url=f"file://{tmp_path}/hangs", floor=0.5, startup=0.5, store=store,
                     on_hang=lambda v: fired.set()) for r in (0, 1)]
    try:
        for step in range(3):
            for d in dogs:
                d.begin(step)
                d.arrive(step)
                d.end(step, 0.01)
        dogs[0].begin(3)
        dogs[0].arrive(3)  # rank 0 waits at step 3's collective; rank 1 never gets there
        assert fired.wait(30), "the watchdog did not fire"
    finally:
        for d in dogs:
            d.close()
    verdict = json.load(open(tmp_path / "hangs" / "step000003_rank0.json"))
    assert verdict["stuck_ranks"] == [1] and verdict["arrivals"] == {"0": 3, "1": 2}
    assert "never reached step 3" in verdict["why"]
    stacks = (tmp_path / "hangs" / "step000003_rank0.txt").read_text()
    assert "llmctl-watchdog" in stacks or "_watch" in stacks  # faulthandler's dump of every thread
    assert dogs[1].fired is None  # rank 1 was between steps: not watched


def stale_rule_file(path, for_="2s"):
    """The shipped LlmctlStepStale rule alone, its expression unchanged, its `for` shortened to fit a test."""
    import yaml

    from tests.test_metrics import ALERTS

    shipped = next(r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
                   if r.get("alert") == "LlmctlStepStale")
    rule = dict(shipped, **{"for": for_})
    path.write_text(yaml.safe_dump({"groups": [{"name": "llmctl.test", "rules": [rule]}]}))
    assert yaml.safe_load(path.read_text())["groups"][0]["rules"][0]["expr"] == shipped["expr"]
    return path


def test_hang_watchdog_names_the_stuck_rank_alerts_and_the_run_restarts(ray_cluster, tiny_inputs, tmp_path):
    """The watchdog's bound is 20 s here (watchdog_floor_s); the alert's expression matches from half of it,
    and with `for: 2s` the alert fires from 12 s, well before the watchdog ends the attempt (20 s, then its
    3 s exit delay). 12 steps: the hang at step 9, the restart from the step-8 checkpoint, and steps to finish."""
    from tests import prom as promlib
    from tests.finished_run import tiny_plan
    from tests.test_metrics import _free_port_pair
    from tests.tools import ensure_prometheus
    from trainer.launch import run

    ensure_prometheus()
    p = tiny_plan(tiny_inputs, "hung", stages=("pretrain",), num_iterations=12)
    chaos = {"hang_at_step": 9, "rank": 1, "hang_seconds": 600, "watchdog_floor_s": 20,
             "marker": str(tmp_path / "hung")}
    base = _free_port_pair()
    targets = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    pods = {t: {"pod": f"hung-worker-{i}"} for i, t in enumerate(targets)}  # what the PodMonitor's relabeling adds
    rules = stale_rule_file(tmp_path / "stale.rules.yaml")
    seen: list = []
    with promlib.Prometheus(tmp_path / "prom", targets, rule_files=[rules], target_labels=pods) as prom:
        def watch():  # while the run is stalled, the alert must reach `firing` (not only match its expression)
            try:
                seen.extend(prom.wait_until(lambda: prom.alerts("LlmctlStepStale", "firing"),
                                            "LlmctlStepStale to fire", 240))
            except promlib.PrometheusError as e:
                seen.append(str(e))

        watcher = threading.Thread(target=watch)
        watcher.start()
        summary = run(p, storage_options={}, checkpoint_upload="sync", metrics_port_base=base, chaos=chaos)
        watcher.join()
    firing = [a for a in seen if isinstance(a, dict)]
    assert firing, seen
    assert [(a["labels"]["run"], a["labels"]["stage"], a["labels"]["rank"], a["labels"]["pod"]) for a in firing] \
        == [(p.name, "pretrain", "1", "hung-worker-1")], firing
    assert firing[0]["labels"]["severity"] == "critical"
    assert "rank 1 has not reached the collective" in firing[0]["annotations"]["summary"]
    assert "(pod hung-worker-1)" in firing[0]["annotations"]["description"]
    assert os.path.exists(chaos["marker"]), "the hang was not injected"
    assert summary["status"] == "completed" and summary["stages"]["pretrain"]["steps"] == 12
    hangs = f"{p.urls['run'][len('file://'):]}/pretrain/hangs"
    files = sorted(os.listdir(hangs))
    assert "step000009_rank0.json" in files and "step000009_rank0.txt" in files, files
    assert all(f.startswith("step000009_") for f in files), files  # one hang, no false alarm
    assert json.load(open(f"{hangs}/step000009_rank0.json"))["stuck_ranks"] == [1]  # rank 0 waited for rank 1
    for f in (f for f in files if f.endswith(".json")):  # rank 1's own view may lack rank 0's store (exited)
        assert json.load(open(f"{hangs}/{f}"))["stuck_ranks"] in ([1], []), f
    if "step000009_rank1.txt" in files:  # the stuck rank's own dump shows where it sleeps
        assert "_maybe_die" in open(f"{hangs}/step000009_rank1.txt").read()

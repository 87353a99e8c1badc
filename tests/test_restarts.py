"""trainer/restarts.py without Ray Train: what a restart leaves in the run's storage and how each surface reads it.

The real thing (a worker SIGKILLed between checkpoints on a local Ray cluster, every surface checked) is
tests/test_launch.py::test_worker_killed_between_checkpoints_resumes_exactly_and_the_restart_shows. Here the
clock is fake and the controller's errors are built by hand: the rules, the wording and the hostile files.
"""

import io
import json
from argparse import Namespace

import pytest
from rich.console import Console

from trainer import restarts
from trainer.progress import ProgressFile, StageBars
from trainer.restarts import Position, on_group_start, read_restarts
from trainer.storage import write_json


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _group(url, clock, *, attempt=1, world=2, start_step=0, loop_seconds=0.0, every=1):
    """A worker group's rank 0 resuming the pretrain stage: its position writer and the event it records."""
    pos = Position(url, "pretrain", attempt=attempt, world=world, started=clock(), every=every, clock=clock)
    return pos, on_group_start(pos, url, "pretrain", start_step=start_step, loop_seconds=loop_seconds)


def _controller_saw(url, clock, errors: dict):
    """What the Train controller's callback writes when a poll finds `errors` (rank -> exception)."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    built = {r: WorkerHealthCheckFailedError("A worker health check failed.", failure=RuntimeError("actor died"))
             if e == "died" else e for r, e in errors.items()}
    restarts.failure_recorder(url, "pretrain", clock=clock).after_exception(None, built)


def test_a_restart_in_the_same_attempt_names_the_dead_rank_and_the_work_lost(tmp_path):
    url, clock = f"file://{tmp_path}", Clock()
    pos, first = _group(url, clock)
    assert first is None and read_restarts(url) == []  # the stage's first group is no restart
    for step in range(1, 8):  # 2 s a step; a checkpoint at step 4 (8 s into the stage)
        clock.t += 2
        pos.write(step, 2.0 * step)
    clock.t += 1
    # Rank 1's process is gone; rank 0's all-reduce then failed on the closed connection.
    _controller_saw(url, clock, {0: RuntimeError("Connection closed by peer"), 1: "died"})
    clock.t += 20  # detection, the new group's start-up and restore
    _, event = _group(url, clock, start_step=4, loop_seconds=8.0)
    assert event["kind"] == "worker group" and (event["rank"], event["ranks"], event["cause"]) == (1, [1], "died")
    assert (event["reached"], event["resumed_from"], event["lost_steps"]) == (7, 4, 3)
    assert event["lost_seconds"] == 6.0 and event["restart_seconds"] == 21.0
    assert read_restarts(url) == [event]
    assert restarts.headline(event, 1) == (
        "[pretrain] worker group restart 1: rank 1 died at step 7; resumed from the step-4 checkpoint: 3 steps lost "
        "(6.0 s of training) and 21.0 s restarting")
    # The workers add one attempt, and this attempt's lost seconds; a restart of another attempt adds no seconds.
    assert restarts.totals_for_worker([event], attempt=1) == (1, 27.0)
    assert restarts.totals_for_worker([event], attempt=2) == (1, 0.0)
    assert restarts.counts(1, [event]) == {"attempts": 2, "restarts": 1}


def test_a_restart_before_the_first_step_loses_nothing_twice_and_an_old_failure_is_not_its(tmp_path):
    """The group that replaced the dead one dies while starting: the second restart loses no steps (the first
    already counted them) and, without a new failure record, names nobody (the old record predates it)."""
    url, clock = f"file://{tmp_path}", Clock()
    pos, _ = _group(url, clock)
    clock.t += 10
    pos.write(6, 10.0)
    clock.t += 1
    _controller_saw(url, clock, {0: "died"})
    clock.t += 5
    _, one = _group(url, clock, start_step=4, loop_seconds=7.0)
    clock.t += 30
    _, two = _group(url, clock, start_step=4, loop_seconds=7.0)
    assert (one["rank"], one["lost_steps"]) == (0, 2)
    assert (two["rank"], two["cause"], two["reached"], two["lost_steps"]) == (None, None, 4, 0)
    assert two["lost_seconds"] == 0.0
    assert two["restart_seconds"] == 30.0
    assert "the worker group was replaced at step 4" in restarts.describe(two)
    assert restarts.counts(1, read_restarts(url))["restarts"] == 2


def test_a_new_attempt_restart_is_the_ledgers_and_a_resize_says_so(tmp_path):
    url, clock = f"file://{tmp_path}", Clock()
    pos, _ = _group(url, clock, attempt=1)
    clock.t += 10
    pos.write(5, 10.0)
    clock.t += 100  # the RayJob's retry: a fresh cluster, the ledger's attempt 2
    pos2, relaunch = _group(url, clock, attempt=2, start_step=4, loop_seconds=8.0)
    assert relaunch["kind"] == "attempt" and relaunch["lost_steps"] == 1
    assert restarts.headline(relaunch, 1).startswith("[pretrain] new attempt, restart 1: a new attempt of the run "
                                                     "at step 5; resumed from the step-4 checkpoint")
    assert restarts.counts(2, [relaunch]) == {"attempts": 2, "restarts": 1}  # the ledger counted it already
    assert restarts.totals_for_worker([relaunch], attempt=2) == (0, 0.0)  # spend.py's lost seconds cover it
    clock.t += 10
    pos2.write(8, 16.0)
    clock.t += 10  # elastic: the controller grew the group, nobody failed
    _, grown = _group(url, clock, attempt=2, world=4, start_step=8, loop_seconds=16.0)
    assert grown["kind"] == "worker group" and grown["cause"] == "the group resized from 2 to 4 workers"
    assert grown["lost_steps"] == 0 and grown["rank"] is None


def test_a_hostile_restart_record_is_bounded_and_cleaned_before_any_surface_shows_it(tmp_path):
    url = f"file://{tmp_path}"
    good = {"stage": "pretrain", "kind": "worker group", "attempt": 1, "reached": 7, "resumed_from": 4,
            "lost_steps": 3, "lost_seconds": 1.5, "restart_seconds": 9.0, "rank": 1, "ranks": [1], "cause": "died"}
    write_json(f"{url}/restarts.json", {"restarts": [
        "not an event", {**good, "kind": "reboot"}, {**good, "lost_steps": -1}, {**good, "reached": 7.5},
        {**good, "lost_seconds": float("nan")}, {**good, "attempt": True},
        {**good, "stage": "pre\x1b[2Jtrain<script>", "cause": "[bold]died\n", "ranks": [1, "x", -2, 3.0]}]})
    (event,) = read_restarts(url)
    assert (event["stage"], event["cause"], event["ranks"]) == ("pretrainscript", "bolddied", [1])  # escapes whole
    with open(tmp_path / "restarts.json", "w") as f:
        f.write(" " * (restarts.MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(ValueError):
        read_restarts(url)
    write_json(f"{url}/pretrain/position.json", {"step": "seven", "time": 1.0, "seconds": 1.0, "attempt": 1})
    pos = Position(url, "pretrain", attempt=1, world=2, started=5.0, clock=lambda: 5.0)
    assert on_group_start(pos, url, "pretrain", start_step=0, loop_seconds=0.0) is None  # unreadable: no restart


def test_the_restart_line_prints_once_above_the_stage_bars_and_never_as_markup(tmp_path):
    path = str(tmp_path / "progress.jsonl")
    out = io.StringIO()
    with StageBars(path, [("pretrain", 30)], priced=False, console=Console(file=out, width=200)) as bars:
        ProgressFile(path).write(stage="pretrain", step=7, steps=30, loss=5.0)
        ProgressFile(path).write(stage="pretrain", restart="[pretrain] worker group restart 1: rank 1 died [red]x")
        bars.poll()
    lines = out.getvalue().splitlines()
    assert [x for x in lines if "restart" in x] == ["[pretrain] worker group restart 1: rank 1 died [red]x"]
    assert any(x.startswith("pretrain") and "7/30" in x for x in lines)


def _finished_run_with_a_restart(root) -> str:
    """A finished run's storage written by hand: plan, summary, ledger (one attempt) and one restart."""
    from tests.finished_run import tiny_plan
    from trainer.launch import summarize, write_plan

    p = tiny_plan(f"file://{root}", "hand", stages=("pretrain",))
    url = p.urls["run"]
    write_plan(p, {})
    stage = {"stage": "pretrain", "status": "completed", "steps": 30, "planned_steps": 30, "tokens": 15360,
             "seconds": 60.0, "dollars": 0.0, "val_bpb": 2.0, "val_history": [[30, 2.0]], "train_loss_ema": 5.0}
    write_json(f"{url}/pretrain/summary.json", stage)
    write_json(f"{url}/summary.json", summarize(p, {"pretrain": stage}))
    write_json(f"{url}/spend.json", {"schema": 1, "run": p.name, "price_per_gpu_hour": 0.0, "attempts": [
        {"start": "2026-12-01T10:00:00Z", "last": "2026-12-01T10:01:40Z", "gpus": 2, "seconds": 100.0,
         "state": "finished"}]})
    write_json(f"{url}/restarts.json", {"restarts": [
        {"stage": "pretrain", "kind": "worker group", "attempt": 1, "world": 2, "reached": 7, "resumed_from": 4,
         "lost_steps": 3, "lost_seconds": 6.0, "restart_seconds": 21.0, "rank": 1, "ranks": [1], "cause": "died",
         "time": "2026-12-01T10:00:40Z"}]})
    return url


def test_the_report_and_status_count_a_worker_group_restart(tmp_path, capsys):
    from cli.runview import cmd_status_local, local_summary
    from trainer.report import gather, render

    url = _finished_run_with_a_restart(tmp_path)
    d = gather(url)
    assert (d["spend"]["attempts"], d["spend"]["restarts"]) == (2, 1)
    text = render(d)
    assert "Paid across 2 attempt(s) (1 restart(s)" in text
    assert ("1. pretrain, worker group: rank 1 died at step 7; resumed from the step-4 checkpoint: 3 steps lost "
            "(6.0 s of training) and 21.0 s restarting") in text
    s = local_summary(url, None)
    assert s["attempts"] == 2 and s["restarts"][0]["resumed_from"] == 4
    assert cmd_status_local(Namespace(run=url, storage=None, output="table")) == 0
    out = capsys.readouterr().out
    assert "over 2 attempt(s)" in out and "restarts  2 attempt(s) (1 restart(s))" in out
    assert "pretrain: rank 1 died at step 7; resumed from the step-4 checkpoint" in out
    assert cmd_status_local(Namespace(run=url, storage=None, output="json")) == 0
    assert json.loads(capsys.readouterr().out)["restarts"][0]["rank"] == 1
    # The cluster's `llmctl status` (cli/jobs.py prints spend's attempts and restarts) reads the same storage.
    from cli.runview import add_storage_view

    k8s = add_storage_view({"storage": url, "gpus": 2, "price_per_gpu_hour": 0.0, "elapsed_hours": None})
    assert (k8s["spend"]["attempts"], k8s["spend"]["restarts"]) == (2, 1) and k8s["restarts"][0]["lost_steps"] == 3
    # A restart record that cannot be read hides the restarts, never the report or the status.
    with open(f"{tmp_path}/runs/hand/restarts.json", "w") as f:
        f.write("{not json")
    assert gather(url)["restarts"] == [] and "Restarts" not in render(gather(url))

"""A preempted run resumed on a different number of workers, through trainer/launch.py on a real local Ray
cluster (CPU workers, gloo): pretraining 2 -> 1 and 1 -> 2, and SFT 2 -> 1.

The first attempt loses a worker at step 7 with no restarts allowed (the whole group is gone, as when spot
nodes are reclaimed); the second attempt, on the other world size, resumes from the step-4 checkpoint, which
is re-sharded (trainer/reshard.py), and finishes. Against an uninterrupted 2-worker run: the same steps and
tokens, and a final val bpb and smoothed train loss within 5% (the data order after the resume differs only
by rank assignment; measured differences are printed by pytest on failure). The val pass scores the same
tokens at either size (trainer/worker.py ValPass): before it did not, and 2->1 read 4.99 against 4.34 while
the weights were as good (4.46 on the same tokens; 4.41 for an uninterrupted 1-worker run, the spread of data
orders at this size). The exactly-once audit of the documents is tests/test_reshard.py's (the same loader
code, every document traced).

Run: .venv/bin/pytest tests/test_preempt_resize.py
"""

from __future__ import annotations

import json
import os

import pytest

from tests.finished_run import tiny_plan
from trainer.spend import read_spend



@pytest.fixture(scope="module")
def baseline(finished_run):
    """An uninterrupted 2-worker pretraining of the tiny plan: the session's finished run's (tests/finished_run.py)."""
    return json.load(open(finished_run.urls["run"][len("file://"):] + "/pretrain/summary.json"))


def _world_sizes(run_url: str, stage: str = "pretrain") -> dict[int, int]:
    """{checkpoint step: world size that wrote it} under the run's directory of `stage`."""
    root = run_url[len("file://"):] + f"/{stage}"
    out = {}
    for d in os.listdir(root):
        meta = os.path.join(root, d, "meta.json")
        if os.path.exists(meta):
            m = json.load(open(meta))
            out[m["step"]] = m["world_size"]
    return out


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_preempt_resume_on_another_world_size_keeps_the_recipe_and_the_loss(ray_cluster, baseline, tiny_inputs,
                                                                             tmp_path, before, after):
    from trainer.launch import run

    p = tiny_plan(tiny_inputs, f"resize-{before}to{after}", stages=("pretrain",))
    chaos = {"kill_at_step": 7, "rank": 0, "marker": str(tmp_path / "killed")}
    with pytest.raises(Exception):  # noqa: B017 - Ray's TrainingFailedError: no restarts were allowed
        run(p, storage_options={}, checkpoint_upload="sync", chaos=chaos, workers=before, max_failures=0)
    assert os.path.exists(chaos["marker"])
    assert _world_sizes(p.urls["run"]) == {4: before}  # the last whole checkpoint of the lost attempt
    summary = run(p, storage_options={}, checkpoint_upload="sync", workers=after)["stages"]["pretrain"]
    assert summary["status"] == "completed" and summary["steps"] == baseline["steps"] == 30
    assert summary["tokens"] == baseline["tokens"]  # same total batch at either size
    sizes = _world_sizes(p.urls["run"])
    assert 30 in sizes and set(sizes.values()) == {after}, sizes  # the resumed attempt wrote every later one
    assert summary["val_bpb"] == pytest.approx(baseline["val_bpb"], rel=0.05)
    assert summary["train_loss_ema"] == pytest.approx(baseline["train_loss_ema"], rel=0.05)
    rows = read_spend(p.urls["run"])["attempts"]  # each attempt priced at the workers it had (trainer/spend.py)
    assert [(r["gpus"], r["state"]) for r in rows] == [(before, "failed"), (after, "finished")]
    # the stage's kept time is priced the same way: part of it on 1 worker, part on 2
    assert summary["seconds"] < summary["gpu_seconds"] < 2 * summary["seconds"]


def test_preempt_sft_resumes_on_fewer_workers(ray_cluster, finished_run, tiny_inputs, tmp_path):
    """SFT lost at step 5 on 2 workers resumes from its step-4 checkpoint on 1 (the conversation stream
    re-cut by trainer/reshard.py; its exactly-once audit is tests/test_reshard.py's) and finishes the stage:
    every planned step, the same total batch, and a val bpb below the one it started from (the val pass
    scores the same conversations at either size). Its pretraining is the finished run's (the same plan's
    stage, tests/finished_run.py), copied into this run: a completed stage is skipped, SFT starts from it."""
    import shutil

    from trainer.launch import run

    p = tiny_plan(tiny_inputs, "resize-sft", stages=("pretrain", "sft"))
    run_dir = p.urls["run"][len("file://"):]
    shutil.copytree(finished_run.urls["run"][len("file://"):] + "/pretrain", f"{run_dir}/pretrain")
    chaos = {"kill_at_step": 5, "rank": 0, "marker": str(tmp_path / "killed"), "stage": "sft"}
    with pytest.raises(Exception):  # noqa: B017 - Ray's TrainingFailedError: no restarts were allowed
        run(p, storage_options={}, checkpoint_upload="sync", chaos=chaos, workers=2, max_failures=0)
    assert os.path.exists(chaos["marker"])
    assert json.load(open(f"{run_dir}/pretrain/summary.json"))["status"] == "completed"
    assert _world_sizes(p.urls["run"], "sft") == {4: 2}
    summary = run(p, storage_options={}, checkpoint_upload="sync", workers=1)["stages"]["sft"]
    sft = p.stage("sft")
    assert summary["status"] == "completed" and summary["steps"] == sft.steps == 6, summary
    assert summary["tokens"] == sft.steps * p.total_batch_size
    assert _world_sizes(p.urls["run"], "sft") == {4: 2, 6: 1}
    (start, first), *_, (end, last) = summary["val_history"]
    assert (start, end) == (0, 6) and last < first, summary["val_history"]

"""trainer/plan/spec.py: a RunSpec refuses what no run may carry (hostile input).

Run: .venv/bin/pytest tests/plan/test_spec.py
"""

from __future__ import annotations

import pytest


def test_hostile_spec_refuses_credentials_in_its_urls():  # a plan built by a library call, or a plan.json
    from trainer.plan import PlanError, RunSpec

    with pytest.raises(PlanError, match="storage_root"):
        RunSpec(depth=4, storage_root="s3://bucket/x?token=ghp_" + "a1B2" * 9)
    with pytest.raises(PlanError, match="core_bundle"):
        RunSpec(depth=4, core_bundle="https://u:p@host/bundle")


def test_tracking_targets_are_checked_stored_and_left_out_of_the_run_name():
    """`track` (--track): parsed and refused by field (no credentials, known trackers, at most MAX_TRACKS, none
    twice); absent from the stored spec when empty (older plans load); the same run name with or without it."""
    from trainer.plan import PlanError, RunPlan, RunSpec, plan
    from trainer.plan.spec import MAX_TRACKS, parse_track

    assert parse_track("mlflow=http://127.0.0.1:5000") == ("mlflow", "http://127.0.0.1:5000")
    assert parse_track("mlflow=databricks") == ("mlflow", "databricks")
    assert parse_track("wandb") == ("wandb", None) and parse_track("wandb=team/llm") == ("wandb", "team/llm")
    tracked = RunSpec(depth=4, track=("mlflow=https://mlflow.example", "wandb=llm"))
    p = plan(tracked)
    assert p.name == plan(RunSpec(depth=4)).name
    assert RunPlan.from_json(p.to_json()).spec.track == tracked.track
    assert "track" not in RunSpec(depth=4).to_dict()
    for track, match in [(("wandb", "wandb"), "twice"), (("mlflow=https://u:p@h",), "user:password"),
                         (tuple(f"wandb=p{i}" for i in range(MAX_TRACKS + 1)), "at most"),
                         (("mlflow=http://h?token=ghp_" + "a1B2" * 9,), "GitHub token"), (("comet=x",), "not a tracker")]:
        with pytest.raises(PlanError, match=match):
            RunSpec(depth=4, track=track)

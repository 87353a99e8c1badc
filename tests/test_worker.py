"""trainer/worker.py, the parts that need no Ray worker: StageConfig validates itself and names the bad field,
and round-trips through the dict Ray Train carries; the stage summary prices the stage with the plan.

(worker_context, make_loader and the metrics start run inside every Ray test: tests/test_launch.py.)
Run: .venv/bin/pytest tests/test_worker.py
"""

from __future__ import annotations

import pytest

from tests.finished_run import tiny_plan
from trainer.worker import StageConfig, stage_summary


def test_stage_config_round_trips_and_validates():
    cfg = StageConfig(plan="{}", stage="pretrain", checkpoint_upload="sync", chaos={"nan_at_step": 3})
    assert StageConfig.from_dict(cfg.to_dict()) == cfg
    assert StageConfig.from_dict({"plan": "{}", "stage": "sft", "storage_options": None}).storage_options == {}
    with pytest.raises(ValueError, match="checkpoint_upload: must be async or sync"):
        StageConfig(plan="{}", stage="pretrain", checkpoint_upload="later")
    with pytest.raises(ValueError, match="log_every"):
        StageConfig(plan="{}", stage="pretrain", log_every=0)
    with pytest.raises(ValueError, match="unknown key.*plan_json"):
        StageConfig.from_dict({"plan": "{}", "stage": "pretrain", "plan_json": "{}"})


def test_stage_summary_prices_the_wall_time_with_the_plan(tmp_path):
    p = tiny_plan(f"file://{tmp_path}", "priced", gpu_type="cpu", price_per_gpu_hour=2.0)  # 2 workers
    s = stage_summary(p, "pretrain", status="completed", steps=30, planned_steps=30, tokens=15_360, seconds=1800.0,
                      val_bpb=1.5)
    assert s == {"stage": "pretrain", "status": "completed", "steps": 30, "planned_steps": 30, "tokens": 15_360,
                 "seconds": 1800.0, "dollars": pytest.approx(0.5 * 2 * 2.0), "val_bpb": 1.5}

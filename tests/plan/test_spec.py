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

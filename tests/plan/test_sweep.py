"""The sweep's grid (trainer/plan/sweep.py): budget cells whose steps meet their FLOP budget, impossible cells
dropped with their reasons, ratio grids, the stored definition, and depth + ratio chosen from a stored fit."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from trainer.plan import PlanError, RunSpec, plan
from trainer.plan import sweep as ps

BUDGETS = [1e18, 2.15e18, 4.64e18, 1e19]  # the reference's grid (runs/scaling_laws.sh)
DEPTHS = [10, 12, 14, 16, 18, 20]
BASE = RunSpec(depth=1, gpus=8)


@pytest.fixture(scope="module")
def reference_grid():
    return ps.grid(BASE, sweep="iso", flops=BUDGETS, depths=DEPTHS)


def test_sweep_budget_cells_meet_their_budget_within_one_step(reference_grid):
    assert len(reference_grid) == 24 and not any(c.dropped for c in reference_grid)  # the reference's 24 runs
    for c in reference_grid:
        p, st = c.plan, c.plan.stage("pretrain")
        assert [s.name for s in p.stages] == ["pretrain"]  # pretrain only: no SFT, no eval stage
        assert st.flops >= c.budget  # rounded up to whole steps ...
        assert st.flops - c.budget < p.flops_per_token * p.total_batch_size  # ... by less than one step
        assert st.steps == math.ceil(c.budget / p.flops_per_token / p.total_batch_size)
        d = c.to_dict()
        assert d["flops"] == st.flops and d["tokens"] == st.tokens == st.steps * p.total_batch_size
        assert d["ratio"] == pytest.approx(st.tokens / p.params.scaling) and 0 <= d["overshoot"] < 0.01
        assert p.spec.num_iterations == st.steps and p.spec.ratio == pytest.approx(d["ratio"])


def test_sweep_cell_ids_and_run_names_are_deterministic_and_dns_safe(reference_grid):
    ids = [c.id for c in reference_grid]
    assert ids[:2] == ["f1e18-d10", "f1e18-d12"] and "f2p15e18-d14" in ids and "f4p64e18-d20" in ids
    assert len(set(ids)) == len(ids)
    for c in reference_grid:
        assert c.plan.name == f"iso-{c.id}" and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", c.plan.name)
    again = ps.grid(BASE, sweep="iso", flops=BUDGETS, depths=DEPTHS)
    assert [c.plan.to_json() for c in again] == [c.plan.to_json() for c in reference_grid]
    assert ps.cell_id(12, ratio=2.5) == "r2p5-d12" and ps.cell_id(8, flops=3e19) == "f3e19-d8"
    assert ps.cell_id(1, flops=6e9) == "f6e9-d1" and ps.cell_id(1, ratio=1e-5) == "r1em5-d1"


def test_sweep_drops_impossible_cells_with_their_reasons():
    cells = {c.id: c for c in ps.grid(BASE, sweep="iso", flops=[1e16, 1e21], depths=[4, 20])}
    few = cells["f1e16-d20"]  # 1e16 FLOPs at d20: 3 steps of 2^20 tokens
    assert few.dropped and "under the 80 steps the LR schedule needs" in few.reason
    assert "tokens per parameter, outside 0.5-1000" in cells["f1e21-d4"].reason  # d4 for 1e21: ~1e5 x its params
    assert not cells["f1e21-d20"].dropped
    assert cells["f1e16-d20"].to_dict() == {"cell": "f1e16-d20", "depth": 20, "budget": 1e16, "ratio_asked": None,
                                           "dropped": few.reason}
    # a spec the planner refuses is a dropped cell too, with the planner's own line
    odd = ps.grid(dataclasses.replace(BASE, gpus=6), sweep="iso", flops=[1e19], depths=[12])[0]
    assert odd.dropped and "cannot share evenly" in odd.reason
    t = ps.totals(list(cells.values()))
    kept = [cells["f1e16-d4"].plan, cells["f1e21-d20"].plan]
    assert t["cells"] == 2 and t["dropped"] == 2 and t["dollars"] == sum(p.estimate.total_dollars for p in kept)


def test_sweep_ratio_grid_cells_are_the_plans_of_that_ratio():
    cells = ps.grid(BASE, sweep="rat", ratios=[4, 12], depths=[10, 14])
    assert [c.id for c in cells] == ["r4-d10", "r4-d14", "r12-d10", "r12-d14"]
    for c in cells:
        alone = plan(dataclasses.replace(BASE, depth=c.depth, ratio=c.ratio_asked, stages=("pretrain",)))
        assert c.plan.stage("pretrain").steps == alone.stage("pretrain").steps
        assert c.plan.target_tokens == alone.target_tokens
    tiny = ps.grid(BASE, sweep="rat", ratios=[0.01], depths=[10])[0]
    assert tiny.dropped and "under the 80 steps" in tiny.reason


@pytest.mark.parametrize("kw, msg", [
    (dict(flops=[1e18], ratios=[4], depths=[10]), "one of the two"),
    (dict(depths=[10]), "one of the two"),
    (dict(flops=[1e18], depths=[]), "at least one depth"),
    (dict(flops=[1e18, 1.0001e18], depths=[10]), "listed twice"),
    (dict(flops=[-1.0], depths=[10]), "flops"),
    (dict(flops=[math.inf], depths=[10]), "flops"),
    (dict(ratios=[4], depths=[0]), "depths"),
    (dict(flops=[1e18], depths=[10], min_steps=0), "min_steps"),
])
def test_sweep_grid_refuses_bad_axes(kw, msg):
    with pytest.raises(PlanError, match=msg):
        ps.grid(BASE, sweep="iso", **kw)


@pytest.mark.parametrize("name", ["Iso", "9iso", "iso-", "x" * 31, "a/b"])
def test_sweep_names_are_dns_labels_short_enough_for_their_runs(name):
    with pytest.raises(PlanError, match="sweep name"):
        ps.check_name(name)


def test_sweep_definition_round_trips_to_the_same_grid():
    defn = ps.definition(BASE, sweep="iso", flops=[1e18, 1e19], depths=[10, 20])
    base, kw = ps.grid_of(defn)
    assert [c.to_dict() for c in ps.grid(base, **kw)] == \
        [c.to_dict() for c in ps.grid(BASE, sweep="iso", flops=[1e18, 1e19], depths=[10, 20])]
    with pytest.raises(PlanError, match="schema"):
        ps.grid_of({**defn, "schema": "other"})
    with pytest.raises(PlanError):
        ps.grid_of({**defn, "spec": {**defn["spec"], "gpus": "eight"}})


def _fit_through(depth: int, flops: float, exponent: float = 0.5) -> dict:
    """A fit whose N_opt(flops) is exactly d`depth`'s scaling params (the dict trainer/sweep/fit.py writes)."""
    n = plan(dataclasses.replace(BASE, depth=depth)).params.scaling
    return {"n_opt": {"coef": n / flops ** exponent, "exponent": exponent, "ci95": [0.45, 0.55]},
            "d_opt": {"coef": 1.0, "exponent": 1 - exponent, "ci95": [0.45, 0.55]},
            "ratio": {"value": 11.0, "ci95": [9.0, 13.5]}, "budgets": [], "parametric": None, "dropped": []}


def test_sweep_fit_chooses_depth_and_ratio_for_a_flop_budget():
    fit = _fit_through(20, 3e19)
    spec = ps.for_flops(fit, BASE, 3e19)
    p = plan(spec)
    assert spec.depth == 20 and p.stage("pretrain").flops == pytest.approx(3e19, rel=0.01)  # the budget, at d20
    assert spec.ratio == pytest.approx(3e19 / p.flops_per_token / p.params.scaling)
    assert ps.for_flops(fit, BASE, 3e19 * 30).depth > 20  # a larger budget, a larger model (exponent 0.5)
    lines = ps.assumptions(fit, "iso", spec, 3e19)
    assert "sweep iso's fit" in lines[0] and "d20" in lines[0] and "11 (95% CI 9-13.5)" in lines[0]
    for bad in ({}, {"n_opt": {"coef": -1, "exponent": 0.5}}, {"n_opt": {"coef": 1, "exponent": math.nan}}):
        with pytest.raises(PlanError, match="no usable n_opt"):
            ps.for_flops(bad, BASE, 3e19)


def test_sweep_fit_chooses_the_largest_run_a_dollar_budget_pays_for():
    fit = _fit_through(20, 3e19)
    spec, flops = ps.for_dollars(fit, BASE, 500.0)
    cost = plan(spec).estimate.total_dollars
    assert cost <= 500.0 and cost > 0.98 * 500.0  # the largest: a little more compute would go over
    assert plan(ps.for_flops(fit, BASE, flops * 1.05)).estimate.total_dollars > 500.0
    assert "at most $500.00" in ps.assumptions(fit, "iso", spec, flops, 500.0)[1]
    with pytest.raises(PlanError, match="does not pay"):
        ps.for_dollars(fit, BASE, 0.01)

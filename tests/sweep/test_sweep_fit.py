"""trainer/sweep/fit.py on synthetic sweeps whose losses come from a known law (tests/sweep/synthetic.py): the
IsoFLOP minima, the power laws and the parametric law recover it; the bootstrap interval holds the truth;
budgets whose minimum the depths do not bracket are dropped with a reason; bad input is one FitError sentence.

Run: .venv/bin/pytest tests/sweep/test_sweep_fit.py
"""

from __future__ import annotations

import json
import math

import pytest

from tests.sweep import synthetic as S
from trainer.sweep.fit import FitError, fit_sweep, optimum

WIDE = {c: S.nearest_depths(c) for c in (1e17, 1e18, 1e19, 1e20)}  # 3 decades, 6 depths centred on each optimum
REFERENCE = {c: list(range(8, 22, 2)) for c in S.REFERENCE_BUDGETS}  # nanochat's grid shape: d8-d20 at every budget


@pytest.fixture(scope="module")
def wide_fit():
    """Seed noise of 0.03% of val bpb over 3 decades of compute: the law should come back within ~1%."""
    return fit_sweep(S.cells(WIDE, noise=3e-4, seed=0), n_boot=100)


@pytest.fixture(scope="module")
def noisy_fit():
    """The reference's grid with 0.2% seed noise (about nanochat's run-to-run spread of val bpb)."""
    return fit_sweep(S.cells(REFERENCE, noise=2e-3, seed=3), parametric=False)


def test_sweep_fit_recovers_the_exponents_of_a_known_law(wide_fit):
    assert wide_fit["params_kind"] == "scaling" and wide_fit["version"] == 1 and not wide_fit["dropped"]
    assert wide_fit["n_opt"]["exponent"] == pytest.approx(S.A_EXP, rel=0.03)  # a = β/(α+β) = 0.452
    assert wide_fit["d_opt"]["exponent"] == pytest.approx(S.B_EXP, rel=0.03)  # b = α/(α+β) = 0.548
    for b in wide_fit["budgets"]:  # each IsoFLOP vertex is the law's optimum at that budget
        assert b["n_opt"] == pytest.approx(S.n_opt(b["flops"]), rel=0.05), b["flops"]
        assert b["d_opt"] == pytest.approx(b["flops"] / 6 / b["n_opt"], rel=0.01)  # on the budget's tokens line
        assert b["cells"] == [f"c{b['flops']:.3g}-d{d}" for d in b["depths"]] and len(b["coef"]) == 3
    r = wide_fit["ratio"]
    assert r["at_flops"] == pytest.approx(math.sqrt(math.sqrt(1e17 * 1e20) * math.sqrt(1e18 * 1e19)))  # 3.16e18
    assert r["value"] == pytest.approx(S.ratio_opt(r["at_flops"]), rel=0.05)
    n, d = optimum(wide_fit, r["at_flops"])
    assert d / n == pytest.approx(r["value"])


def test_sweep_fit_parametric_law_recovers_alpha_and_beta(wide_fit):
    p = wide_fit["parametric"]
    assert p["alpha"] == pytest.approx(S.ALPHA, rel=0.05) and p["beta"] == pytest.approx(S.BETA, rel=0.05)
    assert p["E"] == pytest.approx(S.E, rel=0.05)
    assert p["n_opt_exponent"] == pytest.approx(S.A_EXP, rel=0.05) and p["starts"] == 4500
    assert wide_fit["parametric_skipped"] is None


def test_sweep_bootstrap_interval_contains_the_truth(noisy_fit):
    for key, truth in (("n_opt", S.A_EXP), ("d_opt", S.B_EXP)):
        lo, hi = noisy_fit[key]["ci95"]
        assert lo < noisy_fit[key]["exponent"] < hi and lo < truth < hi, (key, lo, hi)
        assert hi - lo < 0.25  # an interval that says something
    r = noisy_fit["ratio"]
    assert r["ci95"][0] < S.ratio_opt(r["at_flops"]) < r["ci95"][1]
    boot = noisy_fit["bootstrap"]
    assert boot["method"] == "residuals" and boot["n"] + boot["failed"] == boot["requested"] == 200
    band = noisy_fit["band"]  # the frontier band: around the fitted law at every budget drawn
    for c, (lo, hi) in zip(band["flops"], band["n_opt"]):
        assert lo < optimum(noisy_fit, c)[0] < hi


def test_sweep_fit_is_json_and_repeatable_for_a_seed(noisy_fit, wide_fit):
    for fit in (noisy_fit, wide_fit):  # without and with the parametric law
        assert json.loads(json.dumps(fit, allow_nan=False)) == fit
    cells = S.cells(REFERENCE, noise=2e-3, seed=3)
    assert fit_sweep(cells, parametric=False) == noisy_fit  # same seed, same intervals
    assert fit_sweep(cells, parametric=False, seed=1)["n_opt"]["ci95"] != noisy_fit["n_opt"]["ci95"]


def test_sweep_fit_drops_a_budget_whose_minimum_is_at_the_edge():
    grid = dict(WIDE)
    grid[1e20] = [8, 10, 12, 14]  # all far smaller than the optimum (~1e9 params): bpb still falling at d14
    fit = fit_sweep(S.cells(grid), n_boot=0, parametric=False)
    assert [b["flops"] for b in fit["budgets"]] == [1e17, 1e18, 1e19]
    (dropped,) = fit["dropped"]
    assert dropped["flops"] == 1e20 and "above the largest model sampled" in dropped["reason"]
    assert "add larger depths" in dropped["reason"] and len(dropped["cells"]) == 4
    # Only one bracketed budget left: no power law, and the reasons say why.
    with pytest.raises(FitError, match=r"1 budget\(s\) with an IsoFLOP minimum .* add larger depths") as e:
        fit_sweep(S.cells({1e19: WIDE[1e19], 1e20: [8, 10, 12, 14]}), n_boot=0)
    assert "\n" not in str(e.value)
    small = fit_sweep(S.cells({**WIDE, 1e17: [18, 20, 22]}), n_boot=0, parametric=False)
    assert "below the smallest model sampled" in small["dropped"][0]["reason"]


def test_sweep_fit_drops_a_parabola_that_opens_downward():
    cells = S.cells(WIDE)
    for c in cells:
        if c["flops"] == 1e17:
            c["val_bpb"] = 2.0 - (c["depth"] - 9) ** 2 / 100  # a hump: no minimum
    fit = fit_sweep(cells, n_boot=0, parametric=False)
    assert fit["dropped"][0]["flops"] == 1e17 and "opens downward" in fit["dropped"][0]["reason"]


def test_sweep_fit_needs_three_depths_per_budget_and_two_budgets():
    with pytest.raises(FitError, match="no finished cells"):
        fit_sweep([])
    two = {c: d[:2] for c, d in WIDE.items()}
    with pytest.raises(FitError, match=r"2 distinct depth\(s\) \(d4, d6\); a parabola needs 3"):
        fit_sweep(S.cells(two))
    one = r"^1 budget\(s\) with an IsoFLOP minimum inside their depths, 2 needed for a power law$"
    with pytest.raises(FitError, match=one):
        fit_sweep(S.cells({1e18: WIDE[1e18]}))
    repeats = S.cells({1e18: [12, 12, 12, 14, 14]})  # repeats of two depths are still two depths
    with pytest.raises(FitError, match=r"2 distinct depth"):
        fit_sweep(repeats + S.cells({1e19: WIDE[1e19]}))


@pytest.mark.parametrize("field, value", [("val_bpb", float("nan")), ("val_bpb", -1.0), ("params", "110M"),
                                          ("tokens", 1.5), ("flops", True), ("depth", None)])
def test_sweep_fit_refuses_a_malformed_cell_in_one_sentence(field, value):
    cells = S.cells(WIDE)
    cells[3][field] = value
    with pytest.raises(FitError) as e:
        fit_sweep(cells, n_boot=0)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg and field in msg and cells[3]["cell"] in msg


def test_sweep_fit_with_no_residuals_has_no_interval_and_says_why():
    three = {c: d[1:4] for c, d in WIDE.items()}  # 3 points per budget: the parabola passes through each
    fit = fit_sweep(S.cells(three, noise=1e-3), parametric=False)
    assert fit["n_opt"]["ci95"] is None and fit["ratio"]["ci95"] is None and fit["band"]["n_opt"] is None
    assert fit["bootstrap"]["n"] == 0 and "exactly 3 points" in fit["bootstrap"]["skipped"]
    assert math.isfinite(fit["n_opt"]["exponent"])


def test_sweep_fit_parametric_is_optional_and_needs_enough_cells():
    assert fit_sweep(S.cells(WIDE), n_boot=0, parametric=False)["parametric_skipped"] == "not asked for"
    few = fit_sweep(S.cells({c: d[1:4] for c, d in list(WIDE.items())[:3]}), n_boot=0)  # 9 cells, 5 parameters
    assert few["parametric"] is None and "9 cells for 5 parameters" in few["parametric_skipped"]


def test_sweep_fit_parametric_law_escapes_the_plateaus_of_its_grid_on_the_reference_grid():
    """nanochat's grid (d10-d20 at 1e18-1e19), noiseless: the lowest grid starts include plateaus where one term
    has vanished (α = 1.5 left A/N^α nil); L-BFGS from 8 or 16 of them stopped there with α = 1.5 or 1.0."""
    fit = fit_sweep(S.cells({c: list(range(10, 22, 2)) for c in S.REFERENCE_BUDGETS}), n_boot=0)
    p = fit["parametric"]
    assert p["alpha"] == pytest.approx(S.ALPHA, rel=1e-3) and p["beta"] == pytest.approx(S.BETA, rel=1e-3)
    assert p["huber_loss"] < 1e-12

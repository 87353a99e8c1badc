"""Scaling-law sweeps, planned: an IsoFLOP grid (FLOP budgets x depths) or a ratio grid (tokens:params x depths)
as pretrain-only RunPlans, and the way back: a stored fit choosing depth and ratio for a FLOP or dollar budget.

- `grid(base, sweep=..., flops=..., ratios=..., depths=...)`: one `Cell` per grid point. A budget cell trains
  T = C / flops_per_token(depth) tokens in steps = ceil(T / batch) steps of the plan's own batch (Power Lines,
  batch.py), so the achieved FLOPs are C rounded *up* to whole steps: at most one step over, a share of
  batch / T (recorded per cell as `overshoot`). A ratio cell is exactly `llmctl plan --depth D --ratio R
  --stages pretrain`. A cell the budget cannot train at that depth is kept, dropped, with its reason (`Cell.reason`):
  fewer steps than the schedule needs (MIN_STEPS), a tokens:params ratio outside SANE_RATIO, or a spec the
  planner refuses (GPU count, memory).
- `definition(...)`: the sweep's stored definition (`<root>/sweeps/<name>/sweep.json`); the same command gives
  the same definition, which is how a re-run is recognised as a resume.
- `choose(fit, base, flops=... | dollars=...)`: depth and ratio from a fitted N_opt(C) = coef x C^exponent (the
  JSON the fit writes, `fit.json`), and the assumption lines `llmctl plan --sweep` shows.

Parameters are the recipe's scaling parameters (matrices + lm_head, shape.py `ParamCounts.scaling`), the count the
recipe's --ratio is defined on, so a fitted ratio plugs straight back into `RunSpec.ratio`. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from trainer.plan.recipe import WARMUP_STEPS
from trainer.plan.runplan import RunPlan, plan
from trainer.plan.shape import architecture, flops_per_token, param_counts
from trainer.plan.spec import MAX_DEPTH, MAX_RATIO, MAX_STEPS, PlanError, RunSpec

SWEEP_SCHEMA = "llmctl.sweep/v1"

# A cell must train at least this many steps: the LR warm-up (40 steps) at most half the run, so that the flat
# phase and the 65% warm-down exist (recipe.py WARMUP_STEPS, WARMDOWN_RATIO). Shorter cells measure the schedule,
# not the model. The local grid (CPU, its own 10%-of-steps warm-up) passes a smaller floor.
MIN_STEPS = 2 * WARMUP_STEPS
# Tokens per scaling parameter a cell may train at. Below 0.5 the model sees fewer than half as many tokens as it has
# weights (the reference grid's smallest is d20 at 1e18 FLOPs, 0.8); above 1,000 it is ~50-100x past every
# compute-optimal ratio reported (Chinchilla ~20, arXiv 2203.15556; nanochat 8-12, docs/sweeps.md). Either end sits
# far out on an IsoFLOP parabola's flank, where it only bends the fit. The local CPU grid, whose models are all
# far below the optimum a 2-core budget allows, passes its own range.
SANE_RATIO = (0.5, 1000.0)
MAX_CELLS = 400  # grid points per sweep: the reference's sweep is 24; beyond this a typo, not a sweep
MAX_FLOPS = 1e30  # a budget beyond any run (a d64 at ratio 10,000 is ~1e25)
MAX_SWEEP_NAME = 30  # <sweep>-<cell> is a run and RayJob name: DNS-1035, at most 47 chars (spec.py), cells <= 16
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class Cell:
    """One grid point: its id, what was asked (a budget or a ratio at a depth), and its plan, or why not."""

    id: str
    depth: int
    budget: float | None  # FLOPs asked for (budget grids), else None
    ratio_asked: float | None  # tokens:params asked for (ratio grids), else None
    plan: RunPlan | None
    reason: str | None = None  # why the cell is dropped (plan is None)

    @property
    def dropped(self) -> bool:
        return self.plan is None

    def to_dict(self) -> dict:
        """The cell as the sweep stores and shows it (and as trainer/sweep/fit.py takes it, once it has val_bpb)."""
        d = {"cell": self.id, "depth": self.depth, "budget": self.budget, "ratio_asked": self.ratio_asked}
        if self.plan is None:
            return {**d, "dropped": self.reason}
        p, st = self.plan, self.plan.stage("pretrain")
        return {**d, "run": p.name, "params": p.params.scaling, "flops_per_token": p.flops_per_token,
                "steps": st.steps, "tokens": st.tokens, "flops": st.flops, "ratio": st.tokens / p.params.scaling,
                "overshoot": st.flops / self.budget - 1 if self.budget else None,
                "hours": p.estimate.total_hours, "dollars": p.estimate.total_dollars}


def _short(x: float) -> str:
    """3 significant digits, DNS-safe: 2.15e18 -> 2p15e18, 6e9 -> 6e9, 2.5 -> 2p5, 1e-05 -> 1em5."""
    text = f"{x:.3g}".replace(".", "p")
    return re.sub(r"e([+-])0*(\d)", lambda m: ("e" if m[1] == "+" else "em") + m[2], text)


def cell_id(depth: int, *, flops: float | None = None, ratio: float | None = None) -> str:
    """Deterministic, DNS-safe: `f1e18-d10`, `f2p15e18-d12` (3 significant digits), `r12-d10`, `r2p5-d10`."""
    return (f"f{_short(flops)}" if flops is not None else f"r{_short(ratio)}") + f"-d{depth}"


def check_name(name: str) -> str:
    """A sweep name: a DNS-1035 label of at most MAX_SWEEP_NAME chars (its runs are named `<sweep>-<cell>`)."""
    if not isinstance(name, str) or len(name) > MAX_SWEEP_NAME or not _NAME.fullmatch(name):
        raise PlanError(f"sweep name: must be a DNS-1035 label (a-z, 0-9, '-', starting with a letter) of at most "
                        f"{MAX_SWEEP_NAME} chars, got {name!r:.60}")
    return name


def _check_axes(flops, ratios, depths) -> None:
    if bool(flops) == bool(ratios):
        raise PlanError("sweep: give FLOP budgets (--flops) or tokens:params ratios (--ratios), one of the two")
    if not depths:
        raise PlanError("depths: give at least one depth")
    for d in depths:
        if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= MAX_DEPTH:
            raise PlanError(f"depths: each must be an integer from 1 to {MAX_DEPTH}, got {d!r}")
    for c in flops:
        if not (isinstance(c, (int, float)) and math.isfinite(c) and 0 < c <= MAX_FLOPS):
            raise PlanError(f"flops: each budget must be a positive number of FLOPs up to {MAX_FLOPS:g}, got {c!r}")
    for r in ratios:
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0 < r <= MAX_RATIO):
            raise PlanError(f"ratios: each must be a positive number up to {MAX_RATIO:g}, got {r!r}")
    axis = [cell_id(1, flops=c) for c in flops] or [cell_id(1, ratio=r) for r in ratios]
    if len(set(axis)) != len(axis) or len(set(depths)) != len(depths):
        raise PlanError("sweep: a budget, ratio or depth is listed twice (budgets and ratios count to 3 digits)")
    if len(axis) * len(depths) > MAX_CELLS:
        raise PlanError(f"sweep: {len(axis) * len(depths)} cells; at most {MAX_CELLS}")


def _pretrain_spec(base: RunSpec, sweep: str, cid: str, depth: int, **fields) -> RunSpec:
    return dataclasses.replace(base, depth=depth, stages=("pretrain",), name=f"{sweep}-{cid}", budget_cap=None,
                               **fields)


def budget_cell(base: RunSpec, sweep: str, depth: int, flops: float, min_steps: int = MIN_STEPS,
                sane_ratio: tuple[float, float] = SANE_RATIO) -> Cell:
    """The cell training `flops` at `depth`: whole steps of the plan's batch, at least the budget."""
    cid = cell_id(depth, flops=flops)
    try:
        probe = plan(_pretrain_spec(base, sweep, cid, depth, num_iterations=1))
        tokens = flops / probe.flops_per_token
        steps = math.ceil(tokens / probe.total_batch_size)
        ratio = steps * probe.total_batch_size / probe.params.scaling
        why = _why_not(steps, ratio, min_steps, sane_ratio, f"{flops:.3g} FLOPs at {probe.flops_per_token:.3g} FLOPs/token "
                                                f"are {tokens:,.0f} tokens, {tokens / probe.total_batch_size:,.1f} "
                                                f"steps of {probe.total_batch_size:,}")
        if why:
            return Cell(cid, depth, flops, None, None, why)
        # ratio: the achieved one, so the plan's target tokens (and its name's hash) say what the cell trains
        return Cell(cid, depth, flops, None, plan(_pretrain_spec(base, sweep, cid, depth, num_iterations=steps,
                                                                 ratio=ratio)))
    except PlanError as e:
        return Cell(cid, depth, flops, None, None, str(e))


def ratio_cell(base: RunSpec, sweep: str, depth: int, ratio: float, min_steps: int = MIN_STEPS,
               sane_ratio: tuple[float, float] = SANE_RATIO) -> Cell:
    """The cell training `ratio` tokens per scaling parameter at `depth`: the planner's own rule, pretrain only."""
    cid = cell_id(depth, ratio=ratio)
    try:
        p = plan(_pretrain_spec(base, sweep, cid, depth, num_iterations=None, ratio=ratio))
        st = p.stage("pretrain")
        why = _why_not(st.steps if p.target_tokens >= p.total_batch_size else 0, ratio, min_steps, sane_ratio,
                       f"ratio {ratio:g} x {p.params.scaling:,} params are {p.target_tokens:,} tokens, "
                       f"{p.target_tokens / p.total_batch_size:,.1f} steps of {p.total_batch_size:,}")
        return Cell(cid, depth, None, ratio, None if why else p, why)
    except PlanError as e:
        return Cell(cid, depth, None, ratio, None, str(e))


def _why_not(steps: int, ratio: float, min_steps: int, sane_ratio: tuple[float, float], what: str) -> str | None:
    if steps < min_steps:
        return f"{what}: under the {min_steps} steps the LR schedule needs (warm-up at most half the run)"
    if steps > MAX_STEPS:
        return f"{what}: over {MAX_STEPS:,} steps"
    lo, hi = sane_ratio
    if not lo <= ratio <= hi:
        return f"{what}: {ratio:,.3g} tokens per parameter, outside {lo:g}-{hi:g}"
    return None


def grid(base: RunSpec, *, sweep: str, depths, flops=(), ratios=(), min_steps: int = MIN_STEPS,
         sane_ratio: tuple[float, float] = SANE_RATIO) -> list[Cell]:
    """Every cell of the grid, budget (or ratio) major, depth minor; dropped cells included, with reasons."""
    check_name(sweep)
    flops, ratios, depths = list(flops), list(ratios), list(depths)
    _check_axes(flops, ratios, depths)
    lo, hi = sane_ratio
    if not 0 < lo < hi <= MAX_RATIO or not isinstance(min_steps, int) or not 1 <= min_steps <= MAX_STEPS:
        raise PlanError(f"sweep: min_steps {min_steps!r} or ratio range {sane_ratio!r} out of bounds")
    if flops:
        return [budget_cell(base, sweep, d, c, min_steps, tuple(sane_ratio)) for c in flops for d in depths]
    return [ratio_cell(base, sweep, d, r, min_steps, tuple(sane_ratio)) for r in ratios for d in depths]


def definition(base: RunSpec, *, sweep: str, depths, flops=(), ratios=(), min_steps: int = MIN_STEPS,
               sane_ratio: tuple[float, float] = SANE_RATIO, local: bool = False) -> dict:
    """What sweep.json stores: the axes and the base spec (what every cell is trained and priced with)."""
    spec = base.to_dict()
    for k in ("depth", "stages", "name", "budget_cap", "num_iterations", "ratio"):  # set per cell
        spec.pop(k, None)
    return {"schema": SWEEP_SCHEMA, "name": sweep, "flops": [float(c) for c in flops],
            "ratios": [float(r) for r in ratios], "depths": list(depths), "min_steps": min_steps,
            "sane_ratio": [float(x) for x in sane_ratio], "local": local,
            "spec": spec}


def grid_of(defn: dict) -> tuple[RunSpec, dict]:
    """(base spec, grid() keywords) from a stored definition (untrusted: a PlanError when it is not one)."""
    if not isinstance(defn, dict) or defn.get("schema") != SWEEP_SCHEMA:
        raise PlanError(f"sweep definition: expected schema {SWEEP_SCHEMA}")
    spec = dict(defn.get("spec") or {}, depth=1)
    base = RunSpec.from_dict(spec)
    kw = dict(sweep=defn.get("name"), depths=defn.get("depths") or [], flops=defn.get("flops") or [],
              ratios=defn.get("ratios") or [], min_steps=defn.get("min_steps", MIN_STEPS),
              sane_ratio=defn.get("sane_ratio", list(SANE_RATIO)))
    for axis in ("depths", "flops", "ratios"):
        if not isinstance(kw[axis], list):
            raise PlanError(f"sweep definition: {axis} must be a list")
    r = kw["sane_ratio"]
    if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, (int, float)) for x in r)):
        raise PlanError("sweep definition: sane_ratio must be two numbers")
    kw["sane_ratio"] = tuple(r)
    return base, kw  # grid() checks the values


def totals(cells: list[Cell]) -> dict:
    """The sweep's hours (GPU-hours summed over cells: they may run side by side) and dollars, planned cells only."""
    kept = [c.plan for c in cells if c.plan is not None]
    return {"cells": len(kept), "dropped": len(cells) - len(kept),
            "hours": sum(p.estimate.total_hours for p in kept),
            "gpu_hours": sum(p.estimate.total_hours * p.spec.gpus for p in kept),
            "dollars": sum(p.estimate.total_dollars for p in kept),
            "flops": sum(p.total_flops for p in kept)}


# ---------------------------------------------------------------------------------------------
# Back into planning: a fitted law chooses depth and ratio


def _law(fit: dict, key: str) -> tuple[float, float]:
    law = fit.get(key) if isinstance(fit, dict) else None
    coef, exp = (law or {}).get("coef"), (law or {}).get("exponent")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (coef, exp)) \
            or coef <= 0 or not 0 < exp < 2:
        raise PlanError(f"sweep fit: no usable {key} law (coef > 0, exponent in (0, 2)) in the stored fit")
    return float(coef), float(exp)


def depth_for(n_opt: float, base: RunSpec) -> int:
    """The even depth whose scaling parameters are nearest N_opt in log space (the recipe is tuned on even depths)."""
    shape = dict(vocab_size=base.vocab_size, seq_len=base.seq_len, head_dim=base.head_dim,
                 window_pattern=base.window_pattern)
    return min(range(2, MAX_DEPTH + 1, 2),
               key=lambda d: abs(math.log(param_counts(architecture(d, **shape)).scaling / n_opt)))


def for_flops(fit: dict, base: RunSpec, flops: float) -> RunSpec:
    """The spec training `flops` FLOPs at the fitted optimum: depth nearest N_opt(C), ratio = C / fpt / N there."""
    if not (isinstance(flops, (int, float)) and math.isfinite(flops) and 0 < flops <= MAX_FLOPS):
        raise PlanError(f"flops: must be a positive number of FLOPs up to {MAX_FLOPS:g}, got {flops!r}")
    coef, exp = _law(fit, "n_opt")
    d = depth_for(coef * flops ** exp, base)
    a = architecture(d, vocab_size=base.vocab_size, seq_len=base.seq_len, head_dim=base.head_dim,
                     window_pattern=base.window_pattern)
    p = param_counts(a)
    ratio = flops / flops_per_token(a, p) / p.scaling
    if not 0 < ratio <= MAX_RATIO:
        raise PlanError(f"flops: {flops:.3g} FLOPs at d{d} is a ratio of {ratio:.3g}, outside 0-{MAX_RATIO:g}")
    return dataclasses.replace(base, depth=d, ratio=ratio, num_iterations=None)


def for_dollars(fit: dict, base: RunSpec, budget: float) -> tuple[RunSpec, float]:
    """(spec, FLOPs): the largest compute-optimal run whose whole plan (every stage asked for, overheads
    included) costs at most `budget` dollars, found by bisection on log FLOPs (the price rises with C)."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise PlanError(f"budget: must be a positive number of dollars, got {budget!r}")

    def cost(c: float) -> float:
        try:
            return plan(for_flops(fit, base, c)).estimate.total_dollars
        except PlanError:
            return math.inf

    lo, hi = 1e12, MAX_FLOPS  # log-bisection: 1e12 FLOPs costs well under a cent on any catalog GPU
    if cost(lo) > budget:
        raise PlanError(f"budget: ${budget:,.2f} does not pay for the smallest run (its fixed overheads alone cost "
                        f"more)")
    for _ in range(60):  # 60 halvings of 18 decades: C to ~1e-16 relative
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return for_flops(fit, base, lo), lo


def assumptions(fit: dict, sweep: str, spec: RunSpec, flops: float, budget: float | None = None) -> list[str]:
    """What `llmctl plan --sweep` adds to the plan's assumptions: where depth and ratio came from."""
    coef, exp = _law(fit, "n_opt")
    n_opt = coef * flops ** exp
    ratio = (fit.get("ratio") or {}) if isinstance(fit, dict) else {}
    ci = ratio.get("ci95") if isinstance(ratio.get("ci95"), list) and len(ratio["ci95"]) == 2 else None
    fitted = (f"; the sweep's ratio {ratio['value']:.3g}" + (f" (95% CI {ci[0]:.3g}-{ci[1]:.3g})" if ci else "")
              if isinstance(ratio.get("value"), (int, float)) else "")
    lines = [f"depth and ratio from sweep {sweep}'s fit: N_opt = {coef:.3g} x C^{exp:.3f} = {n_opt:,.0f} scaling "
             f"params at C = {flops:.3g} FLOPs -> d{spec.depth}, ratio {spec.ratio:.3g}{fitted}"]
    if budget is not None:
        lines.append(f"C chosen as the largest compute-optimal budget whose plan costs at most ${budget:,.2f}")
    return lines

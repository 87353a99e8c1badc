"""The scaling-law fit of a finished sweep: IsoFLOP parabolas, compute-optimal power laws, the tokens:params
ratio with bootstrap intervals, and optionally the parametric law L(N, D) = E + A/N^α + B/D^β.

`fit_sweep(cells)` takes the sweep's done cells, each {"cell", "flops" (the budget C), "depth", "params" (N, the
recipe's scaling params: trainer/plan/shape.py ParamCounts.scaling), "tokens" (D trained), "val_bpb"}, and
returns one JSON-serialisable dict (docs/sweeps.md, "Reading the fit"):

1. Per budget, the IsoFLOP parabola val_bpb = a2·x² + a1·x + a0 over x = log10 N (Chinchilla's approach 2,
   Hoffmann et al. 2022, arXiv 2203.15556). Its vertex is N_opt; D_opt is the budget's own cells' tokens at
   N_opt, read off the straight line log10 D = m·log10 N + c through them (m = -1 when C = 6ND; the recipe's
   FLOPs per token add attention, so the line is fitted, not assumed). A budget needs MIN_DEPTHS distinct
   depths, an upward parabola, and its vertex inside the sampled params, else it is dropped with the reason:
   the fit never extrapolates a minimum it did not bracket.
2. Across the surviving budgets (at least MIN_BUDGETS), N_opt = k·C^a and D_opt = k'·C^b, straight lines in
   log-log space (numpy.polyfit).
3. The ratio: D_opt/N_opt of those two power laws at the geometric mean of the fitted budgets (the middle of
   the sampled range in log C, where the laws are pinned best; when a = b it is the same at every C).
4. Bootstrap (residuals): each budget's parabola residuals, scaled for the 3 fitted coefficients and pooled over
   the budgets, are resampled with numpy's Generator(seed) onto the fitted curves; everything above is refitted
   and the 2.5 and 97.5 percentiles are the 95% intervals. Resampling residuals keeps each budget's depths (a
   case resample of 6 cells often keeps fewer than 3 depths). With no residual left over (every budget has
   exactly 3 points, which a parabola passes through) nothing measures the noise: the intervals are None.
5. Parametric: the Huber fit in log space of Besiroglu et al. 2024 (arXiv 2404.10102, "Chinchilla Scaling: A
   replication attempt"): log L = LSE(a - α·log N, b - β·log D, e), E = e^e, A = e^a, B = e^b, Huber δ = 1e-3,
   L-BFGS (scipy.optimize.minimize) from their grid of starts.

Too few cells, or nothing fittable, raises FitError (a ValueError) with one sentence saying why.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

FIT_VERSION = 1
MIN_DEPTHS = 3  # a parabola has 3 coefficients: fewer distinct depths cannot place a minimum
MIN_BUDGETS = 2  # a power law has 2 coefficients
CI = (2.5, 97.5)  # percentile bootstrap, 95%
BUDGET_DIGITS = 6  # cells' budgets equal to 6 significant digits are one budget (1e18 and 1.0000000001e18)
BAND_POINTS = 25  # the frontier band is evaluated at this many budgets (log-spaced, 2x beyond each end)

# Parametric fit (Besiroglu et al. 2024, section 3 and appendix): Huber δ and the grid of initialisations
# α, β ∈ {0, 0.5, ..., 2}, e ∈ {-1, -0.5, ..., 1}, a, b ∈ {0, 5, ..., 25}: 4,500 starts. The objective is
# evaluated on all of them at once and L-BFGS runs from the PARAMETRIC_STARTS lowest (all 4,500 cost minutes).
# 64, not fewer: the lowest starts include plateaus where one term has vanished (α = 2 makes A/N^α nil and its
# gradient zero); on the reference's grid (d10-d20) the lowest 16 all stopped on such a plateau.
HUBER_DELTA = 1e-3
GRID_ALPHA = GRID_BETA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_A = GRID_B = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
PARAMETRIC_STARTS = 64
PARAMETRIC_PARAMS = 5  # E, A, α, B, β
PARAMETRIC_MIN_CELLS = 2 * PARAMETRIC_PARAMS  # two cells per parameter, else the law is not pinned


class FitError(ValueError):
    """The cells cannot be fitted; the message is one sentence saying why (the CLI exits 2 with it)."""


# -------------------------------------------------------------------------------------------- input


def _number(cell: dict, key: str, *, integer: bool = False) -> float:
    v = cell.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 \
            or (integer and v != int(v)):
        name = str(cell.get("cell", "?"))[:60]
        raise FitError(f"cell {name!r}: {key} must be a positive {'integer' if integer else 'number'}, "
                       f"got {v!r:.60}")
    return float(v)


def _rows(cells: list[dict]) -> dict[float, list[dict]]:
    """{budget: [cells]} with every field checked: a malformed cell stops the fit rather than bending it."""
    if not isinstance(cells, list) or not cells:
        raise FitError("no finished cells to fit: a sweep needs val bpb from at least "
                       f"{MIN_DEPTHS} depths in each of {MIN_BUDGETS} budgets")
    budgets: dict[float, list[dict]] = {}
    for c in cells:
        if not isinstance(c, dict):
            raise FitError(f"a cell must be a mapping, got {type(c).__name__}")
        row = {"cell": str(c.get("cell", "?")), "flops": _number(c, "flops"),
               "depth": int(_number(c, "depth", integer=True)), "params": _number(c, "params", integer=True),
               "tokens": _number(c, "tokens", integer=True), "val_bpb": _number(c, "val_bpb")}
        budgets.setdefault(float(f"{row['flops']:.{BUDGET_DIGITS}g}"), []).append(row)
    return dict(sorted(budgets.items()))


# -------------------------------------------------------------------------------------------- IsoFLOP


def _vertex(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float | None, str | None]:
    """(parabola coefficients [a2, a1, a0], vertex x or None, why there is none)."""
    coef = np.polyfit(x, y, 2)
    if coef[0] <= 0:
        return coef, None, "val bpb has no minimum over these params (the parabola opens downward)"
    xv = -coef[1] / (2 * coef[0])
    if xv < x.min():
        return coef, None, (f"the parabola's minimum (N = {10 ** xv:.3g}) lies below the smallest model sampled "
                            f"(N = {10 ** x.min():.3g}); add smaller depths")
    if xv > x.max():
        return coef, None, (f"the parabola's minimum (N = {10 ** xv:.3g}) lies above the largest model sampled "
                            f"(N = {10 ** x.max():.3g}); add larger depths")
    return coef, float(xv), None


def _isoflop(budgets: dict[float, list[dict]]):
    """Per budget: (kept entries, dropped entries, design {flops: (x, y, yhat, token line)})."""
    kept, dropped, design = [], [], {}
    for flops, rows in budgets.items():
        ids = [r["cell"] for r in rows]
        depths = sorted({r["depth"] for r in rows})
        if len(depths) < MIN_DEPTHS:
            dropped.append({"flops": flops, "cells": ids, "reason": f"{len(depths)} distinct depth(s) "
                            f"({', '.join(f'd{d}' for d in depths)}); a parabola needs {MIN_DEPTHS}"})
            continue
        x = np.log10([r["params"] for r in rows])
        y = np.array([r["val_bpb"] for r in rows])
        if np.ptp(x) == 0:
            dropped.append({"flops": flops, "cells": ids, "reason": "every depth has the same params"})
            continue
        coef, xv, why = _vertex(x, y)
        if why:
            dropped.append({"flops": flops, "cells": ids, "reason": why})
            continue
        line = np.polyfit(x, np.log10([r["tokens"] for r in rows]), 1)
        n_opt, d_opt = 10 ** xv, 10 ** float(np.polyval(line, xv))
        kept.append({"flops": flops, "n_opt": n_opt, "d_opt": d_opt, "ratio": d_opt / n_opt,
                     "bpb_min": float(np.polyval(coef, xv)), "coef": [float(v) for v in coef],
                     "tokens_line": [float(v) for v in line], "depths": depths, "cells": ids})
        design[flops] = (x, y, np.polyval(coef, x), line)
    return kept, dropped, design


def _power_laws(flops, n_opt, d_opt) -> tuple[float, float, float, float]:
    """(log10 k_N, a, log10 k_D, b) of N_opt = k_N·C^a, D_opt = k_D·C^b."""
    lc = np.log10(flops)
    a, kn = np.polyfit(lc, np.log10(n_opt), 1)
    b, kd = np.polyfit(lc, np.log10(d_opt), 1)
    return float(kn), float(a), float(kd), float(b)


def _ratio_at(laws, c: float) -> float:
    kn, a, kd, b = laws
    return 10 ** (kd + b * math.log10(c) - kn - a * math.log10(c))


# -------------------------------------------------------------------------------------------- bootstrap


def _bootstrap(design: dict, n_boot: int, seed: int, c_mid: float, band_c: np.ndarray) -> dict:
    """Residual bootstrap of the IsoFLOP vertices and the power laws through them (module docstring, 4)."""
    pool = []
    for x, y, yhat, _ in design.values():
        dof = len(x) - 3
        if dof > 0:
            pool.append((y - yhat) * math.sqrt(len(x) / dof))
    if n_boot <= 0 or not pool:
        why = ("n_boot is 0" if n_boot <= 0 else
               f"every budget has exactly {MIN_DEPTHS} points, which the parabola passes through: no residual is "
               "left to measure the noise (add depths or repeat cells)")
        return {"method": "residuals", "n": 0, "failed": 0, "skipped": why}
    pool = np.concatenate(pool)
    pool = pool - pool.mean()
    rng = np.random.default_rng(seed)
    laws, failed = [], 0
    for _ in range(n_boot):
        fl, ns, ds = [], [], []
        for flops, (x, _y, yhat, line) in design.items():
            _, xv, why = _vertex(x, yhat + rng.choice(pool, size=len(x), replace=True))
            if why is None:
                fl.append(flops)
                ns.append(10 ** xv)
                ds.append(10 ** float(np.polyval(line, xv)))
        if len(fl) < MIN_BUDGETS:
            failed += 1
            continue
        laws.append(_power_laws(fl, ns, ds))
    if not laws:
        return {"method": "residuals", "n": 0, "failed": failed,
                "skipped": "no resample kept two budgets with a minimum inside their depths"}
    arr = np.array(laws)
    lc = np.log10(band_c)
    n_band = 10 ** (arr[:, :1] + arr[:, 1:2] * lc)
    d_band = 10 ** (arr[:, 2:3] + arr[:, 3:4] * lc)

    def ci(v) -> list[float]:
        return [float(q) for q in np.percentile(v, CI)]

    return {"method": "residuals", "n": len(laws), "failed": failed, "skipped": None,
            "a": ci(arr[:, 1]), "b": ci(arr[:, 3]), "ratio": ci([_ratio_at(l, c_mid) for l in laws]),
            "n_band": [ci(n_band[:, i]) for i in range(len(lc))], "d_band": [ci(d_band[:, i]) for i in range(len(lc))]}


# -------------------------------------------------------------------------------------------- parametric


def _lse_terms(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray) -> np.ndarray:
    """(starts, cells, 3): a - α log N, b - β log D, e for each row θ = (a, α, b, β, e) of `theta`."""
    a, alpha, b, beta, e = (theta[:, i:i + 1] for i in range(5))
    first = a - alpha * logn
    return np.stack([first, b - beta * logd, np.broadcast_to(e, first.shape)], axis=-1)


def _huber(r: np.ndarray) -> np.ndarray:
    """Huber loss of residuals (scipy.special.huber(HUBER_DELTA, r), without its per-call overhead)."""
    ar = np.abs(r)
    return np.where(ar <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (ar - 0.5 * HUBER_DELTA))


def _huber_objective(theta, logn, logd, logl):
    """Σ Huber_δ(LSE(a - α log N, b - β log D, e) - log L) and its gradient in θ = (a, α, b, β, e)."""
    a, alpha, b, beta, e = theta
    t1, t2 = a - alpha * logn, b - beta * logd
    m = np.maximum(np.maximum(t1, t2), e)  # the LSE's shift, so no exp overflows
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = x1 + x2 + x3
    r = m + np.log(s) - logl
    g = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / s  # Huber's derivative times the softmax's denominator
    grad = np.array([(g * x1).sum(), -(g * x1 * logn).sum(), (g * x2).sum(), -(g * x2 * logd).sum(), (g * x3).sum()])
    return float(_huber(r).sum()), grad


def fit_parametric(n, d, loss) -> dict:
    """The parametric law through (N, D, loss) points: {E, A, alpha, B, beta, huber_loss, starts, implied a/b}."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    grid = np.array(list(itertools.product(GRID_A, GRID_ALPHA, GRID_B, GRID_BETA, GRID_E)))
    objective = _huber(logsumexp(_lse_terms(grid, logn, logd), axis=-1) - logl).sum(axis=-1)
    best = None
    for i in np.argsort(objective, kind="stable")[:PARAMETRIC_STARTS]:
        res = minimize(_huber_objective, grid[i], args=(logn, logd, logl), jac=True, method="L-BFGS-B",
                       options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    a, alpha, b, beta, e = (float(v) for v in best.x)
    out = {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta,
           "huber_loss": float(best.fun), "starts": len(grid), "refined": PARAMETRIC_STARTS}
    # Minimising E + A/N^α + B/D^β under C ∝ N·D gives N_opt ∝ C^(β/(α+β)), D_opt ∝ C^(α/(α+β)).
    out["n_opt_exponent"] = beta / (alpha + beta) if alpha + beta > 0 else None
    out["d_opt_exponent"] = alpha / (alpha + beta) if alpha + beta > 0 else None
    return out


# -------------------------------------------------------------------------------------------- the fit


def fit_sweep(cells: list[dict], *, n_boot: int = 200, seed: int = 0, parametric: bool = True) -> dict:
    """The sweep's fit from its done cells (module docstring); raises FitError when nothing can be fitted.

    BLAS runs on one thread here: every matrix is a few dozen numbers, and OpenBLAS's thread pool spinning on a
    busy machine made each L-BFGS step 20x slower (5 ms instead of 0.25 ms, measured on 2 shared cores). scipy
    brings its own OpenBLAS: it is loaded first, so the limit reaches it too."""
    import scipy.optimize  # noqa: F401  (loads scipy's OpenBLAS before the limit is set)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_sweep(cells, n_boot=n_boot, seed=seed, parametric=parametric)


def _fit_sweep(cells: list[dict], *, n_boot: int, seed: int, parametric: bool) -> dict:
    budgets = _rows(cells)
    kept, dropped, design = _isoflop(budgets)
    if len(kept) < MIN_BUDGETS:
        why = "; ".join(f"{d['flops']:.3g} FLOPs: {d['reason']}" for d in dropped)
        raise FitError(f"{len(kept)} budget(s) with an IsoFLOP minimum inside their depths, {MIN_BUDGETS} needed "
                       f"for a power law" + (f" ({why})" if why else ""))
    flops = np.array([k["flops"] for k in kept])
    laws = _power_laws(flops, [k["n_opt"] for k in kept], [k["d_opt"] for k in kept])
    kn, a, kd, b = laws
    c_mid = float(10 ** np.log10(flops).mean())
    band_c = np.logspace(math.log10(flops.min() / 2), math.log10(flops.max() * 2), BAND_POINTS)
    boot = _bootstrap(design, n_boot, seed, c_mid, band_c)
    ok = boot["n"] > 0

    rows = [r for rs in budgets.values() for r in rs]
    param, param_skipped = None, None
    if not parametric:
        param_skipped = "not asked for"
    elif len(rows) < PARAMETRIC_MIN_CELLS:
        param_skipped = (f"{len(rows)} cells for {PARAMETRIC_PARAMS} parameters; the law needs "
                         f"{PARAMETRIC_MIN_CELLS}")
    else:
        param = fit_parametric(np.array([r["params"] for r in rows]), np.array([r["tokens"] for r in rows]),
                               np.array([r["val_bpb"] for r in rows]))
    return {
        "version": FIT_VERSION,
        "params_kind": "scaling",  # N = transformer matrices + lm_head (trainer/plan/shape.py ParamCounts.scaling)
        "budgets": kept,
        "dropped": dropped,
        "n_opt": {"coef": 10 ** kn, "exponent": a, "ci95": boot["a"] if ok else None},
        "d_opt": {"coef": 10 ** kd, "exponent": b, "ci95": boot["b"] if ok else None},
        "ratio": {"value": _ratio_at(laws, c_mid), "ci95": boot["ratio"] if ok else None, "at_flops": c_mid,
                  "how": "D_opt/N_opt of the two power laws at the geometric mean of the fitted budgets"},
        "band": {"flops": [float(c) for c in band_c], "n_opt": boot.get("n_band"), "d_opt": boot.get("d_band")},
        "bootstrap": {k: boot[k] for k in ("method", "n", "failed", "skipped")} | {"requested": n_boot, "seed": seed},
        "parametric": param,
        "parametric_skipped": param_skipped,
        "cells_used": len(rows),
    }


def optimum(fit: dict, flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) the fitted power laws give at a budget of `flops`."""
    return (fit["n_opt"]["coef"] * flops ** fit["n_opt"]["exponent"],
            fit["d_opt"]["coef"] * flops ** fit["d_opt"]["exponent"])

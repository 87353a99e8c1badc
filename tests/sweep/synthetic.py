"""Sweep cells whose losses come from a known law, for the fit's and the report's tests.

L(N, D) = E + A/N^α + B/D^β with Chinchilla-like exponents (α = 0.34, β = 0.28: Hoffmann et al. 2022's fit)
and A, B chosen so the compute-optimal tokens:params is about 12 near 1e18 FLOPs, the recipe's regime. N is the
recipe's scaling params of each depth (trainer/plan/shape.py), D = C / (6·N): the budget is 6·N·D, so the law's
optimum is exactly N_opt = G·(C/6)^a with a = β/(α+β), D_opt = (C/6)/N_opt, b = α/(α+β).
"""

from __future__ import annotations

import numpy as np

from trainer.plan.shape import architecture, param_counts

E, A, ALPHA, B, BETA = 0.7, 160.0, 0.34, 126.0, 0.28
A_EXP, B_EXP = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)  # N_opt ∝ C^a, D_opt ∝ C^b
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
REFERENCE_BUDGETS = (1e18, 2.15e18, 4.64e18, 1e19)  # nanochat runs/scaling_laws.sh
DEPTHS = tuple(range(4, 33, 2))


def scaling_params(depth: int) -> int:
    return param_counts(architecture(depth)).scaling


def loss(n, d):
    return E + A / np.asarray(n, float) ** ALPHA + B / np.asarray(d, float) ** BETA


def n_opt(c: float) -> float:
    return G * (c / 6) ** A_EXP


def ratio_opt(c: float) -> float:
    """D_opt/N_opt of the law at budget c."""
    return (c / 6) / n_opt(c) ** 2


def nearest_depths(c: float, k: int = 6) -> list[int]:
    """The k even depths whose params are nearest the law's optimum at c (a grid centred on it)."""
    return sorted(sorted(DEPTHS, key=lambda d: abs(np.log(scaling_params(d) / n_opt(c))))[:k])


def cells(grid: dict[float, list[int]], *, noise: float = 0.0, seed: int = 0, status: str | None = None) -> list[dict]:
    """{budget: depths} as done cells, val bpb from the law times (1 + noise·N(0, 1))."""
    rng = np.random.default_rng(seed)
    out = []
    for c, depths in grid.items():
        for depth in depths:
            n = scaling_params(depth)
            d = int(c / (6 * n))
            cell = {"cell": f"c{c:.3g}-d{depth}", "flops": c, "depth": depth, "params": n, "tokens": d,
                    "val_bpb": float(loss(n, d) * (1 + noise * rng.standard_normal()))}
            if status:
                cell["status"] = status
            out.append(cell)
    return out

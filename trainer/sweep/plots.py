"""The sweep's pictures, drawn from its cells and its fit (trainer/sweep/fit.py) in the house style of
trainer/plots.py (`figure`, `title`, `png`):

    isoflop.png    val bpb against params (log axis), one colour per budget: the cells, each budget's fitted
                   parabola over the params it sampled, its minimum marked; dropped budgets' cells as hollow marks;
    frontier.png   N_opt and D_opt against the budget C (log-log): each budget's optimum, the fitted power laws
                   N = k·C^a and D = k'·C^b, and their 95% bootstrap band;
    law.png        the parametric law L(N, D) = E + A/N^α + B/D^β (in the title): each budget's cells against the
                   law's prediction along that budget's tokens line (only when the law was fitted).

`render_sweep_plots` returns {file name: PNG bytes}; the report writes them and embeds them in report.html.
"""

from __future__ import annotations

import numpy as np

from trainer.plots import figure, png, title

FRONTIER_FIGSIZE = (7.0, 6.4)  # two stacked panels of the house width


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.1 + 0.75 * i / max(n - 1, 1)) for i in range(n)]


def _by_budget(cells: list[dict]) -> dict[float, list[dict]]:
    from trainer.sweep.fit import BUDGET_DIGITS

    out: dict[float, list[dict]] = {}
    for c in cells:
        out.setdefault(float(f"{c['flops']:.{BUDGET_DIGITS}g}"), []).append(c)
    return dict(sorted(out.items()))


def _bpb_by_params(fig, ax, heading: str) -> bytes:
    """The axes of val bpb against params (log x), titled, as PNG bytes."""
    ax.set_xscale("log")
    ax.set_xlabel("params N (scaling: transformer matrices + lm_head)")
    ax.set_ylabel("final val bits per byte")
    title(ax, heading)  # holds the sweep's name: stored text
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return png(fig)


def _isoflop(name: str, cells: list[dict], fit: dict) -> bytes:
    fig = figure()
    ax = fig.add_subplot()
    groups = _by_budget(cells)
    kept = {b["flops"]: b for b in fit["budgets"]}
    for colour, (flops, rows) in zip(_colours(len(groups)), groups.items()):
        x = np.array([r["params"] for r in rows], dtype=float)
        y = np.array([r["val_bpb"] for r in rows], dtype=float)
        b = kept.get(flops)
        label = f"{flops:.3g} FLOPs" + ("" if b else " (dropped)")
        ax.scatter(x, y, s=18, color=colour, facecolors=colour if b else "none", label=label, zorder=3)
        if b:
            xs = np.linspace(np.log10(x.min()), np.log10(x.max()), 60)
            ax.plot(10 ** xs, np.polyval(b["coef"], xs), color=colour, linewidth=1.2)
            ax.scatter([b["n_opt"]], [b["bpb_min"]], marker="*", s=120, color=colour, edgecolors="black",
                       linewidths=0.6, zorder=4)
    return _bpb_by_params(fig, ax, f"IsoFLOP curves (★ = fitted minimum): {name}")


def _frontier(name: str, fit: dict) -> bytes:
    fig = figure(FRONTIER_FIGSIZE)
    band = fit["band"]
    cs = np.array(band["flops"])
    for i, (key, label, colour) in enumerate((("n_opt", "params N_opt", "tab:blue"),
                                             ("d_opt", "tokens D_opt", "tab:orange"))):
        ax = fig.add_subplot(2, 1, i + 1)
        law = fit[key]
        ax.scatter([b["flops"] for b in fit["budgets"]], [b[key] for b in fit["budgets"]], color=colour,
                   zorder=3, label="IsoFLOP minima")
        ci = law["ci95"]
        ci_text = f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else ""
        ax.plot(cs, law["coef"] * cs ** law["exponent"], color=colour,
                label=f"{label} = {law['coef']:.3g}·C^{law['exponent']:.3f}{ci_text}")
        if band[key]:
            lo, hi = np.array(band[key]).T
            ax.fill_between(cs, lo, hi, color=colour, alpha=0.2, linewidth=0, label="95% bootstrap band")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        if i == 0:
            r = fit["ratio"]
            rci = f", 95% CI {r['ci95'][0]:.1f}–{r['ci95'][1]:.1f}" if r["ci95"] else ""
            title(ax, f"Compute-optimal frontier: {name} (tokens:params {r['value']:.1f}{rci})")
        else:
            ax.set_xlabel("training FLOPs C")
    return png(fig)


def _law(name: str, cells: list[dict], fit: dict) -> bytes:
    p = fit["parametric"]
    fig = figure()
    ax = fig.add_subplot()
    groups = _by_budget(cells)
    for colour, (flops, rows) in zip(_colours(len(groups)), groups.items()):
        x = np.array([r["params"] for r in rows], dtype=float)
        d = np.array([r["tokens"] for r in rows], dtype=float)
        ax.scatter(x, [r["val_bpb"] for r in rows], s=18, color=colour, label=f"{flops:.3g} FLOPs", zorder=3)
        if np.ptp(x) == 0:
            continue
        xs = np.linspace(np.log10(x.min()), np.log10(x.max()), 60)
        ds = 10 ** np.polyval(np.polyfit(np.log10(x), np.log10(d), 1), xs)  # the budget's tokens at each N
        ns = 10 ** xs
        ax.plot(ns, p["E"] + p["A"] / ns ** p["alpha"] + p["B"] / ds ** p["beta"], color=colour, linewidth=1.2)
    return _bpb_by_params(fig, ax, f"L = {p['E']:.3f} + {p['A']:.3g}/N^{p['alpha']:.3f} + "
                                   f"{p['B']:.3g}/D^{p['beta']:.3f}: {name}")


def render_sweep_plots(name: str, cells: list[dict], fit: dict) -> dict[str, bytes]:
    """{file name: PNG bytes}: isoflop.png and frontier.png, law.png when the parametric law was fitted.
    `cells` are the fitted (done) cells; `name` is stored text, shown as plain text."""
    files = {"isoflop.png": _isoflop(name, cells, fit), "frontier.png": _frontier(name, fit)}
    if fit.get("parametric"):
        files["law.png"] = _law(name, cells, fit)
    return files

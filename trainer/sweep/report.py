"""The sweep's report: its grid, its fit beside the reference's published sweeps, and its pictures.

`write_report(sweep_url, definition, cells, fit)` writes, under the sweep's directory (`<root>/sweeps/<name>/`)
through trainer/storage.py:

    isoflop.png, frontier.png, law.png    the pictures (trainer/sweep/plots.py)
    report.md                             the grid, the fit and the pictures linked, for people
    report.html                           the same page, self-contained (PNGs inlined), rendered by the run
                                          report's `to_html` (trainer/report.py: one renderer, one CSP)

`definition` (the stored sweep definition) and `cells` (every cell, done or not, with its status) are stored
text: cleaned (trainer/text.py) and Markdown-escaped (trainer/report.py `_md`, `_cell`) before they reach the
page. `fit` is trainer/sweep/fit.py's dict as computed from the done cells.
"""

from __future__ import annotations

import math

from trainer.plan.recipe import RATIO
from trainer.report import _cell, _md, to_html
from trainer.storage import write_text
from trainer.text import clean

# The reference's published sweep (karpathy/nanochat dev/LOG.md, 2026-01-27; runs/scaling_laws.sh's grid:
# budgets 1e18, 2.15e18, 4.64e18, 1e19 x depths 10-20): Kaplan-style (scaling) params, compute-optimal
# tokens:params per budget and the power laws through them. Its Mar 24 2026 re-run set today's default, 12
# (base_train.py --target-param-data-ratio, "per recent scaling laws re-run"; trainer/plan/recipe.py RATIO).
REFERENCE_SWEEP = {"source": "nanochat dev/LOG.md, 2026-01-27", "budgets": (1e18, 2.15e18, 4.64e18, 1e19),
                   "ratios": (11.2, 10.7, 10.8, 10.3), "n_exponent": 0.54, "d_exponent": 0.49}
TEXT_LIMIT = 120  # characters of one stored value shown in a cell or a definition line
PICTURES = {"isoflop.png": "IsoFLOP curves: val bpb against params, per budget, minima marked",
            "frontier.png": "Compute-optimal frontier: N_opt and D_opt against FLOPs with the power laws",
            "law.png": "The parametric law L(N, D) against the cells"}


def _text(value) -> str:
    """Stored text for a table cell: controls stripped, bounded, Markdown escaped."""
    return _cell(clean(value, limit=TEXT_LIMIT))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value, spec: str) -> str:
    """A stored number formatted, or '–' when absent; anything else shown as (escaped) text."""
    if value is None:
        return "–"
    return format(value, spec) if _is_number(value) else _text(value)


def _ci(ci, spec: str) -> str:
    return f"95% CI {format(ci[0], spec)}–{format(ci[1], spec)}" if ci else "no interval (see the bootstrap note)"


def _definition_lines(definition: dict) -> list[str]:
    out = []
    for key, value in (definition or {}).items():
        if key == "name":
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(clean(v, limit=TEXT_LIMIT) for v in value[:50]) + (" …" if len(value) > 50 else "")
        elif isinstance(value, dict):
            continue  # nested documents (cell plans, prices) are the CLI's to show
        out.append(f"- {_md(clean(key, limit=40))}: {_md(clean(value, limit=TEXT_LIMIT * 2))}")
    return out


def _sort_key(c: dict):
    f, d = c.get("flops"), c.get("depth")
    return (f if isinstance(f, (int, float)) else math.inf, d if isinstance(d, (int, float)) else math.inf,
            str(c.get("cell")))


def _grid(cells: list[dict]) -> list[str]:
    out = ["| cell | depth | budget (FLOPs) | params N | tokens D | D:N | val bpb | CORE | $ | status |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=_sort_key):
        n, d = c.get("params"), c.get("tokens")
        ratio = d / n if _is_number(n) and _is_number(d) and n else None
        out.append(f"| {_text(c.get('cell', '?'))} | {_num(c.get('depth'), '.0f')} | {_num(c.get('flops'), '.3g')} | "
                   f"{_num(n, ',.0f')} | {_num(d, ',.0f')} | {_num(ratio, '.1f')} | {_num(c.get('val_bpb'), '.4f')} | "
                   f"{_num(c.get('core'), '.4f')} | {_num(c.get('cost_usd'), ',.2f')} | "
                   f"{_text(c.get('status', '–'))} |")
    done = sum(1 for c in cells if c.get("status", "done") == "done")
    cost = sum(c["cost_usd"] for c in cells if _is_number(c.get("cost_usd")))
    out += ["", f"{len(cells)} cells, {done} done" + (f"; ${cost:,.2f} spent so far." if cost else ".")]
    return out


def _fit(fit: dict) -> list[str]:
    out = ["| budget (FLOPs) | depths | N_opt | D_opt | D:N | min val bpb | cells |", "|---|---|---|---|---|---|---|"]
    for b in fit["budgets"]:
        out.append(f"| {b['flops']:.3g} | {', '.join(f'd{d}' for d in b['depths'])} | {b['n_opt']:,.0f} | "
                   f"{b['d_opt']:,.0f} | {b['ratio']:.1f} | {b['bpb_min']:.4f} | {len(b['cells'])} |")
    if fit["dropped"]:
        out += ["", "Budgets left out of the power laws (the fit does not extrapolate a minimum it did not bracket):",
                ""]
        out += [f"- {d['flops']:.3g} FLOPs: {_md(d['reason'])}" for d in fit["dropped"]]
    n, d, r = fit["n_opt"], fit["d_opt"], fit["ratio"]
    ref = REFERENCE_SWEEP
    ref_ratios = ", ".join(f"{x:g}" for x in ref["ratios"])
    out += ["", f"- **N_opt = {n['coef']:.3g} · C^{n['exponent']:.3f}** ({_ci(n['ci95'], '.3f')}); "
                f"the reference: C^{ref['n_exponent']}",
            f"- **D_opt = {d['coef']:.3g} · C^{d['exponent']:.3f}** ({_ci(d['ci95'], '.3f')}); "
            f"the reference: C^{ref['d_exponent']}",
            f"- **tokens:params = {r['value']:.1f}** ({_ci(r['ci95'], '.1f')}), {_md(r['how'])} "
            f"(C = {r['at_flops']:.3g}). The recipe trains at {RATIO:g} (the reference's default since its "
            f"Mar 24 2026 re-run); the reference's sweep ({ref['source']}) found {ref_ratios} at "
            f"{', '.join(f'{c:.3g}' for c in ref['budgets'])} FLOPs.",
            f"- exponents a + b = {n['exponent'] + d['exponent']:.3f} (1 when every budget's C is proportional "
            "to N·D)."]
    boot = fit["bootstrap"]
    out += ["", f"Intervals: {boot['n']} of {boot['requested']} residual-bootstrap refits (seed {boot['seed']})"
                + (f", {boot['failed']} left fewer than 2 budgets with a minimum inside their depths" if boot["failed"]
                   else "") + "." + (f" No interval: {_md(boot['skipped'])}." if boot["skipped"] else "")]
    p = fit.get("parametric")
    out += ["", "### Parametric law", ""]
    if p:
        out += [f"L(N, D) = **{p['E']:.4f} + {p['A']:.4g} / N^{p['alpha']:.3f} + {p['B']:.4g} / D^{p['beta']:.3f}** "
                f"(Huber δ = 1e-3 on log L, L-BFGS from {p['starts']:,} starts), implying N_opt ∝ "
                f"C^{p['n_opt_exponent']:.3f} and D_opt ∝ C^{p['d_opt_exponent']:.3f} when C ∝ N·D. "
                f"E is the loss no model size or data removes."]
    else:
        out.append(f"Not fitted: {_md(fit.get('parametric_skipped') or 'no law')}.")
    return out


def render_sweep(definition: dict, cells: list[dict], fit: dict | None, pictures=(),
                 fit_error: str | None = None) -> str:
    """report.md from the sweep's definition, its cells, its fit (None with `fit_error` when it had none) and the
    PNG files beside it."""
    name = clean((definition or {}).get("name", "sweep"), limit=TEXT_LIMIT)
    out = [f"# Sweep report: {_md(name)}", ""] + _definition_lines(definition) + ["", "## Grid", ""] + _grid(cells)
    out += ["", "## Fit", "", "N is the recipe's scaling params (transformer matrices + lm_head; embeddings and "
            "value embeddings are lookups, not compute), the N the recipe's tokens:params ratio multiplies. "
            "How to read each figure: docs/sweeps.md, \"Reading the fit\".", ""]
    out += _fit(fit) if fit else [f"No fit yet: {_md(fit_error or 'no finished cells')}"]
    if pictures:
        out += ["", "## Pictures"] + [line for p in pictures for line in ("", f"![{PICTURES.get(p, p)}]({p})")]
    return "\n".join(out).rstrip() + "\n"


def _fitted_cells(cells: list[dict], fit: dict) -> list[dict]:
    """The done cells the fit used, each with valid numbers (a stored cell can claim anything)."""
    from trainer.sweep.fit import FitError, _rows

    ids = {i for b in fit["budgets"] + fit["dropped"] for i in b["cells"]}
    out = []
    for c in cells:
        if isinstance(c, dict) and str(c.get("cell")) in ids and c.get("status", "done") == "done":
            try:
                out += [r for rows in _rows([c]).values() for r in rows]
            except FitError:
                continue
    return out


def write_report(sweep_url: str, definition: dict, cells: list[dict], fit: dict | None, *,
                 storage_options: dict | None = None, fit_error: str | None = None) -> list[str]:
    """Write the pictures, report.md and the self-contained report.html under `sweep_url`; return their URLs.
    `fit` None (with `fit_error`, the FitError's sentence) writes the grid alone."""
    from trainer.plots import write_pngs
    from trainer.sweep.plots import render_sweep_plots

    url = sweep_url.rstrip("/")
    cells = [c for c in cells if isinstance(c, dict)]
    name = clean((definition or {}).get("name", "sweep"), limit=TEXT_LIMIT)
    images = render_sweep_plots(name, _fitted_cells(cells, fit), fit) if fit else {}
    written = write_pngs(url, images, storage_options)
    text = render_sweep(definition, cells, fit, pictures=list(images), fit_error=fit_error)
    for fname, body in (("report.md", text), ("report.html", to_html(text, images, f"Sweep report: {name}"))):
        write_text(f"{url}/{fname}", body, storage_options)
        written.append(f"{url}/{fname}")
    return written

"""The run's curves as PNG files in its directory, drawn with matplotlib (Agg: no display, no network).

`write_curves(run_url, d)` takes the report's gathered dict (trainer/report.py `gather`) and writes:

    loss.png   training loss (the debiased EMA the loop logs, trainer/loop.py) by step, pretraining then SFT
               on one step axis (SFT's steps continue after pretraining's), the stage boundary marked;
    bpb.png    val bits per byte at each eval of each training stage, with the eval stage's unigram baseline
               of the same tokens as a dashed line per model when it has been measured.

A curve with no points is not drawn; a stage that logged nothing is left out. Returns the file names written
(relative to the run directory), so report.md can link them and report.html embed them.

`figure`, `title`, `png` and `write_pngs` are the house style every plot of the project uses (the sweep's
pictures too: trainer/sweep/plots.py).
"""

from __future__ import annotations

import io

from trainer.storage import write_bytes

CURVES = ("loss.png", "bpb.png")
FIGSIZE, DPI = (7.0, 3.6), 110  # ~770 x 400 px: readable in a browser and in a markdown viewer
STAGE_COLORS = {"pretrain": "tab:blue", "sft": "tab:orange"}


def _series(d: dict) -> dict:
    """{stage: (offset, loss points, bpb points)} of the training stages that logged anything; SFT's steps
    are offset by pretraining's so both share one step axis."""
    out, offset = {}, 0
    for name in ("pretrain", "sft"):
        m = (d["stages"].get(name) or {}).get("measured") or {}
        loss, bpb = m.get("loss_history") or [], m.get("val_history") or []
        if loss or bpb:
            out[name] = (offset, loss, bpb)
        offset += m.get("steps") or 0
    return out


def figure(figsize: tuple[float, float] = FIGSIZE):
    """A new matplotlib Figure in the house style (Agg, the object API: no pyplot global state, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI)


def title(ax, text: str) -> None:
    """A plot title holding stored text (a run or sweep name): plain text, never mathtext (nested
    `$\\sqrt{...}$` recursed until RecursionError) nor TeX."""
    ax.set_title(text, fontsize=10, parse_math=False, usetex=False)


def png(fig) -> bytes:
    """The finished figure as PNG bytes (tight layout)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_curves(d: dict) -> dict[str, bytes]:
    """{file name: PNG bytes} of the curves that have points."""
    series = _series(d)
    models = (d.get("eval") or {}).get("models", {})
    files = {}
    for fname, idx, ylabel, heading in (("loss.png", 1, "train loss (EMA, nats/token)", "Training loss"),
                                        ("bpb.png", 2, "val bits per byte", "Validation bits per byte")):
        if not any(s[idx] for s in series.values()):
            continue
        fig = figure()
        ax = fig.add_subplot()
        for name, s in series.items():
            offset, pts = s[0], s[idx]
            if pts:
                xs, ys = [offset + p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, marker="o" if idx == 2 else None, markersize=3, color=STAGE_COLORS[name], label=name)
            if offset:
                ax.axvline(offset, color="grey", linewidth=0.8, linestyle=":")
        if idx == 2:
            for model, stage in (("base", "pretrain"), ("chat", "sft")):
                uni = models.get(model, {}).get("unigram_bpb")
                if uni is not None and stage in series:
                    ax.axhline(uni, color=STAGE_COLORS[stage], linestyle="--", linewidth=1,
                               label=f"unigram baseline ({model} val tokens)")
        ax.set_xlabel("step (SFT continues after pretraining)" if "sft" in series and len(series) > 1 else "step")
        ax.set_ylabel(ylabel)
        title(ax, f"{heading}: {d['run']}")  # the run name is stored text
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        files[fname] = png(fig)
    return files


def write_pngs(url: str, files: dict[str, bytes], storage_options: dict | None = None) -> list[str]:
    """Write {file name: PNG bytes} into the directory `url`; return the URLs written."""
    out = []
    for name, data in files.items():
        out.append(f"{url.rstrip('/')}/{name}")
        write_bytes(out[-1], data, storage_options)  # atomic, never through a planted link
    return out


def write_curves(run_url: str, d: dict, storage_options: dict | None = None) -> dict[str, bytes]:
    """Write the curves into the run directory; return {file name: PNG bytes} (for report.html)."""
    files = render_curves(d)
    write_pngs(run_url, files, storage_options)
    return files

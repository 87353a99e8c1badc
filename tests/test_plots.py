"""trainer/plots.py with hostile input: a run name that matplotlib would parse as mathtext, and a planted link
where a curve's PNG is written.

Run: .venv/bin/pytest tests/test_plots.py
"""

from __future__ import annotations

import os

import pytest

from trainer.plots import render_curves, write_curves
from trainer.storage import UnsafeFile


def _d(run: str) -> dict:
    measured = {"steps": 3, "loss_history": [[1, 3.0], [2, 2.5], [3, 2.0]], "val_history": [[0, 2.0], [3, 1.5]]}
    return {"run": run, "stages": {"pretrain": {"measured": measured}}, "eval": None}


@pytest.mark.parametrize("name", ["$" + "\\sqrt{" * 100 + "x" + "}" * 100 + "$",  # RecursionError in mathtext
                                  "$\\frac$ and $x^$",  # a mathtext syntax error
                                  "$a_b^c \\alpha$ costs $5"])
def test_hostile_run_name_is_plain_text_in_plot_titles(name):
    # `$` pairs, `\`, `^` and `_` in a run name are text, never parsed as mathtext.
    files = render_curves(_d(name))
    assert set(files) == {"loss.png", "bpb.png"} and all(png[:4] == b"\x89PNG" for png in files.values())


def test_hostile_curves_are_not_written_through_a_planted_link(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "loss.png")
    with pytest.raises(UnsafeFile):
        write_curves(f"file://{run}", _d("r"))
    assert victim.read_text() == "precious\n"

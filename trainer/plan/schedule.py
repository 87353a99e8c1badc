"""Learning rates, weight decay and momentum: their scaling with batch and width, and their schedules by step.

`optimization()` scales the reference's d12 learning rates and weight decay to a run's batch and width
(square-root batch scaling; the T_epoch rule for weight decay); `lr_multiplier`, `muon_momentum` and
`muon_weight_decay` are pure functions of the step (and, for SFT, of the share of the data consumed), so a
resumed run continues on exactly the same curve. Formulas and sources: docs/recipe.md, "schedules".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from trainer.plan.recipe import (B_REF, EMBEDDING_LR, LR_WIDTH_REF, MATRIX_LR, RESID_LR_FRAC, SCALAR_LR, SMEAR_LR,
                                 UNEMBEDDING_LR, VALUE_EMBED_LR_FRAC, WEIGHT_DECAY_REF)
from trainer.plan.shape import Architecture

# The schedules take a runplan.StagePlan `s` (steps, warm-up/warm-down, momentum points, peak weight decay);
# runplan imports this module, so the type is named in the annotations only.


@dataclass(frozen=True)
class Optimization:
    """Learning rates and weight decay after batch and width scaling, per optimizer group."""

    lr_lm_head: float
    lr_wte: float
    lr_value_embeds: float
    lr_resid: float
    lr_x0: float
    lr_smear: float
    lr_matrix: float  # Muon; c_fc gets x2 from the per-shape multiplier sqrt(max(1, rows/cols))
    weight_decay: float  # Muon peak weight decay (cosine to 0 over the run)
    batch_lr_scale: float


def optimization(a: Architecture, batch: int, scaling: int, scaling_ref: int) -> Optimization:
    s = math.sqrt(batch / B_REF)  # LR x sqrt(B/B_REF): the AdamW folklore rule, applied to Muon too
    w = (a.n_embd / LR_WIDTH_REF) ** -0.5  # AdamW embedding/unembedding width scaling
    return Optimization(
        lr_lm_head=UNEMBEDDING_LR * s * w,
        lr_wte=EMBEDDING_LR * s * w,
        lr_value_embeds=VALUE_EMBED_LR_FRAC * EMBEDDING_LR * s * w,
        lr_resid=RESID_LR_FRAC * SCALAR_LR * s,
        lr_x0=SCALAR_LR * s,
        lr_smear=SMEAR_LR,
        lr_matrix=MATRIX_LR * s,
        # T_epoch rule (Wang & Aitchison, arXiv 2405.13698): keep B/(lr * wd * D) fixed, with lr ∝ sqrt(B):
        # wd = 0.28 * sqrt(B/B_REF) * D_REF/D, and D_REF/D = N_ref/N at equal ratio.
        weight_decay=WEIGHT_DECAY_REF * s * scaling_ref / scaling,
        batch_lr_scale=s,
    )


def lr_multiplier(s: StagePlan, step: int, progress: float | None = None) -> float:
    """Multiplier on every group's initial LR (base_train.get_lr_multiplier; chat_sft's progress rule).

    Pretraining: linear warm-up over `warmup_steps`, flat, then linear over the last `warmdown_steps` to
    `final_lr_frac`. SFT runs one epoch of unknown length, so it follows `progress` (data consumed, 0..1):
    flat to 50%, then linear to 0. Both scale by the stage's `lr_frac`.
    """
    if s.name == "sft":
        frac = s.steps and step / s.steps if progress is None else progress
        cut = 1 - s.warmdown_steps / s.steps if s.steps else 0.5
        m = 1.0 if frac < cut else max(0.0, (1 - frac) / (1 - cut)) * (1 - s.final_lr_frac) + s.final_lr_frac
        return s.lr_frac * m
    if step < s.warmup_steps:
        return s.lr_frac * (step + 1) / s.warmup_steps
    if step <= s.steps - s.warmdown_steps:
        return s.lr_frac
    p = (s.steps - step) / s.warmdown_steps
    return s.lr_frac * (p + (1 - p) * s.final_lr_frac)


def muon_momentum(s: StagePlan, step: int) -> float:
    """Muon momentum (base_train.get_muon_momentum; docs/recipe.md, schedules): start -> peak linearly over
    `momentum_warmup_steps`, and a step inside that ramp gets the ramp's value even when it falls in the LR
    warm-down (short runs). Pretraining, from then on: the peak until the warm-down starts, then linearly to
    the end value at the last step (0.85 -> 0.97 over 400 steps; 0.97 -> 0.90 over the warm-down)."""
    start, peak = s.momentum[0], s.momentum[1]
    if step < s.momentum_warmup_steps:
        frac = step / s.momentum_warmup_steps
        return (1 - frac) * start + frac * peak
    warmdown_start = s.steps - s.warmdown_steps
    if len(s.momentum) > 2 and s.warmdown_steps and step > warmdown_start:
        p = min((step - warmdown_start) / s.warmdown_steps, 1.0)
        return (1 - p) * peak + p * s.momentum[2]
    return peak


def muon_weight_decay(s: StagePlan, step: int) -> float:
    """Muon weight decay: cosine from the stage's peak to 0 over the run (base_train: λ·½(1+cos(π·t/N)))."""
    return s.weight_decay * 0.5 * (1 + math.cos(math.pi * min(step, s.steps) / s.steps))

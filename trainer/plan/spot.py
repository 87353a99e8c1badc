"""Spot economics of a plan: spot vs on-demand dollars, the expected cost of preemptions, and the checkpoint
interval that minimises it (Young/Daly). Stdlib only (the CLI imports it at start-up).

Formulas (docs/recipe.md, "Spot and elastic runs"):
- preemptions expected over the run:  n = rate_per_node_hour x nodes x hours, nodes = ceil(gpus / 8);
- work lost per preemption:  L = I / 2 + R, with I the checkpoint interval (hours of training between saves;
  on average the failure lands half-way through one) and R the restart (rescheduling, image pull, Ray start,
  compile, checkpoint load; the costs.py overheads, or a measured figure from bench/preemption.py);
- spot dollars = (hours + n x L) x gpus x spot price;
- Young/Daly interval (Young, CACM 1974; Daly, FGCS 2006, first order):  I* = sqrt(2 x C x M), with C the time
  one checkpoint costs (bytes / storage bandwidth, costs.CHECKPOINT_BANDWIDTH) and M = 1 / (rate x nodes)
  the whole job's mean time between preemptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.plan.pricing import CHECKPOINT_BANDWIDTH, COMPILE_HOURS, RAY_START_HOURS, SCHEDULING_HOURS

GPUS_PER_NODE = 8  # one worker pod = one 8-GPU node (cli/kube/rayjob.py)

# Spot price per GPU-hour by catalog GPU type: (price, source and date).
SPOT_PRICES: dict[str, tuple[float, str]] = {
    "h100": (2.25, "GCP A3-High spot ~$2.25/GPU-h, AWS P5 spot ~$2.00-2.50 (costnimbus.com listing, March 2026)"),
    "h100-pcie": (1.43, "assumption: 50% of on-demand (spot discounts of 50-65% reported for Q1 2026)"),
    "h200": (2.85, "assumption: the H100 spot price x the on-demand H200/H100 ratio (3.80 / 3.00)"),
    "a100": (0.90, "assumption: 50% of on-demand (spot discounts of 50-65% reported for Q1 2026)"),
    "cpu": (0.0, "local machine: no charge"),
}
# Preemptions per node-hour when none is given: an assumption. Reports for H100 spot in early 2026 range from
# a few percent interrupted per month (AWS Spot Instance Advisor buckets) to 2-4 hour windows in peak regions;
# 0.1 (one per 10 node-hours) sits between. Give --preemptions-per-hour for your provider and region.
PREEMPTIONS_PER_NODE_HOUR = 0.1
RESTART_HOURS = SCHEDULING_HOURS + RAY_START_HOURS + COMPILE_HOURS  # until no bench figure replaces it


@dataclass(frozen=True)
class SpotEstimate:
    on_demand_dollars: float  # the plan's total at the on-demand price (no preemptions)
    spot_price: float
    spot_price_source: str
    preemptions_per_node_hour: float
    nodes: int
    expected_preemptions: float
    checkpoint_interval_hours: float  # the plan's, for pretraining
    restart_hours: float
    lost_hours_per_preemption: float  # I / 2 + R
    overhead_dollars_per_preemption: float  # at the spot price, all GPUs
    spot_dollars: float  # (hours + n L) x gpus x spot price
    checkpoint_hours: float  # C: one checkpoint's cost
    young_daly_hours: float  # I* = sqrt(2 C M)
    young_daly_steps: int


def young_daly(checkpoint_hours: float, mtbf_hours: float) -> float:
    """The first-order optimal interval between checkpoints: sqrt(2 x C x M)."""
    return math.sqrt(2 * checkpoint_hours * mtbf_hours)


def checkpoint_bytes(plan) -> float:
    """One whole checkpoint (model + moments, all ranks), as trainer/plan/runplan.py counts it for the upload overhead."""
    p = plan.params
    return 3 * (4 * p.transformer_matrices + 2 * (p.wte + p.value_embeds) + 4 * p.lm_head)


def estimate(plan, *, spot_price: float | None = None, preemptions_per_hour: float | None = None,
             restart_hours: float | None = None) -> SpotEstimate:
    """Spot vs on-demand for `plan`; rates per node-hour, prices per GPU-hour (None: the defaults above)."""
    s, e = plan.spec, plan.estimate
    price, source = SPOT_PRICES.get(s.gpu_type, (e.price_per_gpu_hour, "no spot price known: on-demand"))
    if spot_price is not None:
        price, source = spot_price, "given (cluster config or --spot-price)"
    rate = preemptions_per_hour if preemptions_per_hour is not None else (
        s.preemptions_per_hour if s.preemptions_per_hour is not None else PREEMPTIONS_PER_NODE_HOUR)
    nodes = max(1, math.ceil(s.gpus / GPUS_PER_NODE))
    restart = RESTART_HOURS if restart_hours is None else restart_hours
    train = next((st for st in plan.stages if st.name == "pretrain"), plan.stages[0])
    step_hours = plan.total_batch_size / e.tokens_per_second / 3600
    interval = train.checkpoint_every * step_hours
    lost = interval / 2 + restart
    n = rate * nodes * e.total_hours
    c = checkpoint_bytes(plan) / CHECKPOINT_BANDWIDTH / 3600
    yd = young_daly(c, 1 / (rate * nodes))
    return SpotEstimate(
        on_demand_dollars=e.total_dollars, spot_price=price, spot_price_source=source,
        preemptions_per_node_hour=rate, nodes=nodes, expected_preemptions=n, checkpoint_interval_hours=interval,
        restart_hours=restart, lost_hours_per_preemption=lost, overhead_dollars_per_preemption=lost * s.gpus * price,
        spot_dollars=(e.total_hours + n * lost) * s.gpus * price, checkpoint_hours=c, young_daly_hours=yd,
        young_daly_steps=max(1, round(yd / step_hours)))


def rows(plan, **kw) -> list[tuple[str, str]]:
    """The plan table's spot rows."""
    x = estimate(plan, **kw)
    mins = lambda h: f"{h * 60:.1f} min"  # noqa: E731
    return [
        ("on-demand", f"${x.on_demand_dollars:,.2f} at ${plan.estimate.price_per_gpu_hour:.2f}/GPU-h"),
        ("spot", f"${x.spot_dollars:,.2f} at ${x.spot_price:.2f}/GPU-h, with {x.expected_preemptions:.1f} expected "
                 f"preemptions ({x.preemptions_per_node_hour:g}/node-h x {x.nodes} nodes)"),
        ("preemption", f"~{mins(x.lost_hours_per_preemption)} lost each (half the {mins(x.checkpoint_interval_hours)} "
                       f"checkpoint interval + {mins(x.restart_hours)} restart) = ${x.overhead_dollars_per_preemption:,.2f}"),
        ("checkpoints", f"Young/Daly suggests every {x.young_daly_steps:,} steps ({mins(x.young_daly_hours)}): "
                        f"sqrt(2 x {x.checkpoint_hours * 3600:.0f} s per checkpoint x "
                        f"{1 / (x.preemptions_per_node_hour * x.nodes):.1f} h between preemptions)"),
        ("", f"spot price: {x.spot_price_source}"),
    ]

"""A run's plan as the commands show it: the spec from the flags (`spec_from_args`, flags in cli/flags.py), the
plan checked (`plan_checked`), the cluster's interconnect figure (`cluster_interconnect`) and the human table
(`render_table`), so `plan`, `submit` and `submit --local` show the same numbers the same way.

Imported by those commands when they run, never at parser-building time (it imports the planner).
"""

from __future__ import annotations

import argparse
import dataclasses

from cli.console import fmt_hours
from trainer.plan import PlanError, RunPlan, RunSpec, plan
from trainer.plan.catalog import GPUS


def spec_from_args(args: argparse.Namespace, **overrides) -> RunSpec:
    fields = dict(
        depth=args.depth, gpus=args.gpus, gpu_type=args.gpu_type,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
        ratio=args.ratio, seq_len=args.seq_len, device_batch_size=args.device_batch_size,
        total_batch_size=args.total_batch_size, num_iterations=args.num_iterations, precision=args.precision,
        price_per_gpu_hour=args.price, budget_cap=args.max_cost, storage_root=args.storage, name=args.name,
        core_bundle=args.core_bundle, core_max_per_task=args.core_max_per_task, lm_eval=getattr(args, "lm_eval", None),
        interconnect_busbw_gbs=getattr(args, "interconnect_gbs", None),
        min_gpus=getattr(args, "min_gpus", None), spot=bool(getattr(args, "spot", False)),
        preemptions_per_hour=getattr(args, "preemptions_per_hour", None),
    )
    fields.update(overrides)
    return RunSpec(**fields)


def fmt_count(x: float) -> str:
    """Human number: 1.38B, 729.8M, 4.78e9 FLOPs kept readable."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:g}"


def _flops(x: float) -> str:
    return f"{x / 1e12:,.0f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.0f} GFLOP/s"


def _capacity_rows(p: RunPlan, spot_price: float | None) -> list[tuple[str, str]]:
    """Elastic range and spot economics (trainer/reshard.py, trainer/plan/spot.py), when asked for."""
    s, rows = p.spec, []
    if s.min_gpus and s.min_gpus < s.gpus:
        from trainer.plan.batch import for_world

        low = for_world(p, s.min_gpus)
        rows.append(("elastic", f"{s.min_gpus}-{s.gpus} GPUs, same {p.total_batch_size:,} tokens/step: at {s.min_gpus} "
                                f"GPUs {low.device_batch_size} seq x {low.grad_accum} accum"))
    if s.spot and not GPUS[s.gpu_type].local:
        from trainer.plan.spot import rows as spot_rows

        rows += spot_rows(p, spot_price=spot_price)
    return rows


def render_table(p: RunPlan, spot_price: float | None = None, interconnect_note: str | None = None,
                 assumptions: tuple[str, ...] = ()) -> str:
    """The plan as a two-column table. interconnect_note: where the interconnect figure came from when it is
    the cluster's measured one (ClusterConfig.interconnect_note); assumptions: more lines for the assumptions
    (`plan --sweep`: depth and ratio chosen by a sweep's fit)."""
    a, s, e = p.arch, p.spec, p.estimate
    rows = [
        ("run", p.name),
        ("model", f"d{a.n_layer}: {a.n_embd} wide, {a.n_head} heads of {a.head_dim}, vocab {a.vocab_size:,}, "
                  f"context {a.seq_len}, windows {a.window_pattern}"),
        ("parameters", f"{p.params.total:,} total, {p.params.scaling:,} scaling (matrices + lm_head)"),
        ("FLOPs/token", f"{p.flops_per_token:.4g} (6 x matmul params + attention)"),
        ("batch", f"{p.total_batch_size:,} tokens/step = {p.device_batch_size} seq x {a.seq_len} x "
                  f"{s.gpus} GPU x {p.grad_accum} accum"),
        ("learning rates", f"matrix {p.optim.lr_matrix:.4g}, embed {p.optim.lr_wte:.3g}, "
                           f"head {p.optim.lr_lm_head:.3g}; weight decay {p.optim.weight_decay:.4g}"),
    ]
    for st in p.stages:
        what = f"{st.steps} models scored (bpb, CORE)" if st.name == "eval" else f"{st.steps:,} steps"
        rows.append((st.name, f"{what}, {fmt_count(st.tokens)} tokens, {st.flops:.3g} FLOPs, "
                              f"{fmt_hours(st.hours)}, ${st.dollars:,.2f}"))
    rows += _precision_rows(p)
    m = p.memory
    if m and m.get("capacity"):
        rows.append(("memory", f"~{m['peak_gib']:.0f} GiB per GPU predicted at {p.device_batch_size} x {a.seq_len} "
                               f"tokens ({s.precision}) of {m['capacity_gib']:.0f} usable on {s.gpu_type}: params "
                               f"{m['params'] / 2**30:.1f}, grads {m['grads'] / 2**30:.1f}, optimizer "
                               f"{m['optimizer'] / 2**30:.1f}, activations {m['activations'] / 2**30:.1f}, "
                               f"workspace {m['workspace'] / 2**30:.0f}"))
    rows += [
        ("throughput", f"{fmt_count(e.tokens_per_second)} tok/s on {s.gpus} x {s.gpu_type} at {e.mfu:.0%} MFU "
                       f"(peak {_flops(e.peak_flops_per_gpu)})"),
        _interconnect_row(p, interconnect_note),
        ("overheads", ", ".join(f"{k.replace('_', ' ')} {fmt_hours(v)}" for k, v in e.overhead_hours.items() if v)
         or "none"),
        ("time", f"{fmt_hours(e.total_hours)} ({fmt_hours(e.train_hours)} training + "
                 f"{fmt_hours(e.total_hours - e.train_hours)} overheads)"),
        ("cost", f"${e.total_dollars:,.2f} (${e.train_dollars:,.2f} training + ${e.overhead_dollars:,.2f} overheads) "
                 f"at ${e.price_per_gpu_hour:.2f}/GPU-h"),
    ]
    rows += _capacity_rows(p, spot_price)
    if s.budget_cap is not None:
        rows.append(("budget cap", f"${s.budget_cap:,.2f}: " + ("within" if e.within_budget else "EXCEEDED")))
    rows += [
        ("assumptions", f"MFU prior: {e.mfu_source}"),
        ("", f"price: {e.price_source}"),
        *(("", a) for a in assumptions),
    ]
    if any(st.name == "sft" for st in p.stages):
        rows.append(("", f"SFT: {e.sft_cost_source}"))
    rows += [("warning", w) for w in p.warnings]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _interconnect_row(p: RunPlan, note: str | None = None) -> tuple[str, str]:
    """The plan's interconnect breakdown (RunPlan.interconnect, the same figures `-o json` carries)."""
    b = p.interconnect
    if b["link"] == "local":
        return ("interconnect", f"local: {p.spec.gpus} worker process(es) on this machine (gloo), not modelled "
                                f"({b['step_seconds']:.1f} s/step)")
    if b["link"] == "nvlink":
        return ("interconnect", f"one node: NVLink, inside the MFU prior ({b['step_seconds'] * 1e3:.0f} ms/step)")
    source = note or ("given (--interconnect-gbs)" if b["busbw_source"] == "given" else
                      f"{b['busbw_source']}; llmctl doctor --network measures it")
    return ("interconnect", f"{b['interconnect_share']:.1%} of each {b['step_seconds'] * 1e3:.0f} ms step "
                            f"({b['interconnect_seconds'] * 1e3:.0f} ms: {b['bytes_per_step'] / 1e9:.2f} GB "
                            f"all-reduced at {b['busbw'] / 1e9:.0f} GB/s bus bandwidth, {source}; docs/recipe.md)")


def cluster_interconnect(args, cfg) -> tuple[float | None, str | None]:
    """(GB/s, note) for the plan: --interconnect-gbs when given, else the cluster config's measured figure."""
    given = getattr(args, "interconnect_gbs", None)
    if given is not None or cfg is None or cfg.interconnect_busbw_gbs is None:
        gbs, note = given, None
    else:
        gbs, note = cfg.interconnect_busbw_gbs, cfg.interconnect_note()
    return spread_interconnect(args, cfg, gbs, note)


def spread_interconnect(args, cfg, gbs: float | None, note: str | None) -> tuple[float | None, str | None]:
    """The bus bandwidth of a run whose workers may span more than one topology domain (cli/kube/topology.py):
    the fabric's figure divided by the oversubscription of the widest level crossed, and a note saying so."""
    if cfg is None or not getattr(cfg, "topology", None) or not getattr(args, "gpus", None):
        return gbs, note
    from cli.kube.topology import choose
    from trainer.plan.interconnect import FABRIC_BUSBW

    placement = choose(-(-args.gpus // cfg.gpus_per_node), cfg.topology)
    if placement.mode is None:
        return gbs, note
    if placement.busbw_factor > 1:
        gbs = (gbs if gbs is not None else FABRIC_BUSBW / 1e9) / placement.busbw_factor
    return gbs, "; ".join(n for n in (note, placement.note()) if n)


def _precision_rows(p: RunPlan) -> list[tuple[str, str]]:
    """Training time and dollars in bf16 and in fp8, side by side (the other precision planned alike)."""
    s = p.spec
    if GPUS[s.gpu_type].local:
        return []
    other = "fp8" if s.precision == "bf16" else "bf16"
    plans = {s.precision: p}
    try:
        plans[other] = plan(dataclasses.replace(s, precision=other))
    except PlanError as e:  # e.g. a given device batch that fits in fp8 but not in bf16
        plans[other] = str(e)
    rows = []
    for prec in ("bf16", "fp8"):
        q = plans[prec]
        if isinstance(q, str):
            rows.append((prec, f"does not plan: {q}"))
            continue
        e = q.estimate
        ratio = e.tokens_per_second / plans["bf16"].estimate.tokens_per_second if prec == "fp8" and not isinstance(
            plans["bf16"], str) else None
        rows.append((prec, f"{fmt_hours(e.train_hours)} training, {fmt_hours(e.total_hours)} in all, "
                           f"${e.train_dollars:,.2f} training, ${e.total_dollars:,.2f} in all"
                           + (f" ({ratio:.2f}x bf16 tok/s)" if ratio else "")
                           + (" <- this plan" if prec == s.precision else "")))
    return rows


def plan_checked(spec: RunSpec) -> RunPlan:
    """plan(spec), refusing an elastic range the recipe cannot run at its low end (one line)."""
    from trainer.plan.batch import check_elastic

    p = plan(spec)
    check_elastic(p, spec.min_gpus)
    return p

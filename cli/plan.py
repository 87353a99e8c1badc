"""`llmctl plan`: show what a depth costs before anything runs (shape, tokens, steps, time, dollars).

Also home of the spec flags shared by `plan` and `submit` (`add_spec_args`, `spec_from_args`) and of the
human table (`render_table`), so both commands show the same numbers the same way.
"""

from __future__ import annotations

import argparse
import json

import dataclasses

from trainer.plan.catalog import GPUS
from trainer.plan.recipe import STAGES
from trainer.plan import PlanError, RunPlan, RunSpec, plan


def add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--depth", type=int, required=True, help="transformer layers; sets every other hyperparameter")
    g.add_argument("--ratio", type=float, default=12.0, help="training tokens per scaling parameter (default 12)")
    g.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp8"), help="matmul precision (default bf16)")
    g.add_argument("--fp8", action="store_const", const="fp8", dest="precision",
                   help="train with fp8 matmuls (tensorwise scaling, Hopper GPUs): same as --precision fp8")
    g.add_argument("--seq-len", type=int, default=2048, help="context length in tokens (default 2048)")
    g.add_argument("--device-batch-size", type=int,
                   help="sequences per GPU per micro-step (default: the largest power of two that fits in memory)")
    g.add_argument("--total-batch-size", type=int, help="tokens per optimizer step (default: Power-Lines rule)")
    g.add_argument("--num-iterations", type=int, help="fix the step count instead of using --ratio")
    g.add_argument("--core-bundle", help="CORE eval bundle URL (core.yaml, eval_data/, eval_meta_data.csv); "
                   "default <storage>/eval_bundle")
    g.add_argument("--core-max-per-task", type=int, help="CORE examples per task in the eval stage (default all)")
    g = p.add_argument_group("where and at what price")
    g.add_argument("--gpus", type=int, default=1, help="GPUs in total (8 per worker pod)")
    g.add_argument("--gpu-type", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    g.add_argument("--price", type=float, help="$ per GPU-hour (default: the GPU type's catalog price)")
    g.add_argument("--min-gpus", type=int, help="elastic: go on with as few as this many GPUs when pods are lost "
                   "(same total batch; the checkpoint is re-sharded)")
    g.add_argument("--spot", action="store_true", help="run on spot/preemptible nodes; shows spot vs on-demand cost")
    g.add_argument("--preemptions-per-hour", type=float,
                   help="expected preemptions per node-hour (default: the catalog's prior, trainer/plan/spot.py)")
    g.add_argument("--max-cost", type=float, help="budget cap in $: refuse plans above it; the run stops there")
    g.add_argument("--interconnect-gbs", type=float, metavar="GB/S",
                   help="inter-node all-reduce bus bandwidth per GPU (llmctl doctor --network measures it; "
                        "default: 8x400G InfiniBand/EFA, 300)")
    g.add_argument("--storage", default="file://~/.cache/llmctl", help="storage root URL (s3://bucket/prefix)")
    g.add_argument("--name", help="run name (default: derived from the spec, stable across retries)")


def spec_from_args(args: argparse.Namespace, **overrides) -> RunSpec:
    fields = dict(
        depth=args.depth, gpus=args.gpus, gpu_type=args.gpu_type,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
        ratio=args.ratio, seq_len=args.seq_len, device_batch_size=args.device_batch_size,
        total_batch_size=args.total_batch_size, num_iterations=args.num_iterations, precision=args.precision,
        price_per_gpu_hour=args.price, budget_cap=args.max_cost, storage_root=args.storage, name=args.name,
        core_bundle=args.core_bundle, core_max_per_task=args.core_max_per_task,
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


def fmt_hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.2f} h"


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


def render_table(p: RunPlan, spot_price: float | None = None, interconnect_note: str | None = None) -> str:
    """The plan as a two-column table. interconnect_note: where the interconnect figure came from when it is
    the cluster's measured one (ClusterConfig.interconnect_note)."""
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
    ]
    rows += [("warning", w) for w in p.warnings]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _interconnect_row(p: RunPlan, note: str | None = None) -> tuple[str, str]:
    from trainer.plan.interconnect import NODE_GPUS, step_breakdown

    b = step_breakdown(p)
    if p.spec.gpus <= NODE_GPUS:
        return ("interconnect", f"one node: NVLink, inside the MFU prior ({b['step_seconds'] * 1e3:.0f} ms/step)")
    source = note or ("given (--interconnect-gbs)" if p.spec.interconnect_busbw_gbs else
                      "assumed: 8x400G InfiniBand/EFA; llmctl doctor --network measures it")
    return ("interconnect", f"{b['interconnect_share']:.1%} of each {b['step_seconds'] * 1e3:.0f} ms step "
                            f"({b['interconnect_seconds'] * 1e3:.0f} ms: {b['bytes_per_step'] / 1e9:.2f} GB "
                            f"all-reduced at {b['busbw'] / 1e9:.0f} GB/s bus bandwidth, {source}; docs/recipe.md)")


def cluster_interconnect(args, cfg) -> tuple[float | None, str | None]:
    """(GB/s, note) for the plan: --interconnect-gbs when given, else the cluster config's measured figure."""
    given = getattr(args, "interconnect_gbs", None)
    if given is not None or cfg is None or cfg.interconnect_busbw_gbs is None:
        return given, None
    return cfg.interconnect_busbw_gbs, cfg.interconnect_note()


def _plan_cluster_config(args):
    """The cluster config `plan` prices with: --cluster-config FILE, --from-cluster (the namespace's ConfigMap),
    else None (catalog prices, the default fabric). Warnings go to stderr."""
    if not (args.cluster_config or args.from_cluster):
        return None
    import sys

    from cli.cluster import connect, load_config_file, read_configmap

    if args.cluster_config:
        cfg, warnings = load_config_file(args.cluster_config)
    else:
        cfg, warnings = read_configmap(connect(args))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return cfg


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


def dump(p: RunPlan, fmt: str) -> str:
    if fmt == "json":
        return p.to_json()
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(json.loads(p.to_json()), sort_keys=False)
    return render_table(p)


def plan_checked(spec: RunSpec) -> RunPlan:
    """plan(spec), refusing an elastic range the recipe cannot run at its low end (one line)."""
    from trainer.plan.batch import check_elastic

    p = plan(spec)
    check_elastic(p, spec.min_gpus)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _plan_cluster_config(args)
    gbs, note = cluster_interconnect(args, cfg)
    price = args.price if args.price is not None or cfg is None else cfg.prices.get(args.gpu_type)
    p = plan_checked(spec_from_args(args, interconnect_busbw_gbs=gbs, price_per_gpu_hour=price))
    print(render_table(p, interconnect_note=note) if args.output == "table" else dump(p, args.output))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="derive a run from --depth and show its time and price",
                       description="Derive every hyperparameter from --depth (nanochat's recipe) and estimate "
                       "time and dollars. Nothing is created.",
                       epilog="Example: llmctl plan --depth 26 --gpus 8 -o json")
    add_spec_args(p)
    p.add_argument("-o", "--output", default="table", choices=("table", "json", "yaml"), help="output format")
    g = p.add_argument_group("cluster (optional: its prices and measured interconnect)")
    g.add_argument("--cluster-config", metavar="FILE", help="price with this cluster config file (the ConfigMap's "
                   "config.yaml shape; an `interconnect:` mapping is the measured figure)")
    g.add_argument("--from-cluster", action="store_true", help="read the namespace's llmctl-config ConfigMap: its "
                   "prices and the interconnect `llmctl doctor --network` measured")
    from cli.cluster import add_cluster_args

    add_cluster_args(p)
    p.set_defaults(func=cmd_plan)

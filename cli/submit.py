"""`llmctl submit`: plan a run, show its price, and start it on Kubernetes as a KubeRay RayJob (or `--local`).

Order of events, so that refusals create nothing (and make no request when the flags alone decide): flags
and plan checked -> (dry-run: print and stop) -> cluster config read from the `llmctl-config` ConfigMap ->
budget re-checked at the cluster's price -> plan table + confirmation -> one POST. The RayJob is rendered by
cli/kube/rayjob.py; `--local` hands over to `cli.local.run_local` (the laptop run), imported only then. The
created RayJob goes to stdout; the plan table, warnings and next steps to stderr.
"""

from __future__ import annotations

import argparse

from cli.console import confirm, dump_objects, fmt_hours, require_yes, say
from cli.errors import UsageError
from cli.flags import add_cluster_args, add_spec_args, add_version_args, apply_flags

LOCAL_STORAGE = "file://~/.cache/llmctl"  # RunSpec.storage_root's default (tests/cli/test_jobs.py checks they agree)


def render(args, cfg, namespace: str, extra_env: dict[str, str]):
    """(plan, RayJob) for these flags on this cluster config; bad input raises UsageError/PlanError."""
    from cli.kube.layout import LayoutError
    from cli.kube.rayjob import build_rayjob
    from cli.planning import cluster_interconnect, plan_checked, spec_from_args

    price = args.price if args.price is not None else cfg.prices.get(args.gpu_type)
    spec = spec_from_args(args, storage_root=args.storage or cfg.storage_root, price_per_gpu_hour=price,
                          namespace=namespace, image=cfg.image, queue=cfg.queue,
                          interconnect_busbw_gbs=cluster_interconnect(args, cfg)[0], track=tuple(args.track or ()))
    p = plan_checked(spec)
    try:
        return p, build_rayjob(p, cfg, namespace=namespace, extra_env=extra_env, ray_cluster=args.ray_cluster)
    except (LayoutError, ValueError) as e:
        raise UsageError(str(e)) from None


def tracking_warnings(p, cfg) -> list[str]:
    """`--track` on a cluster whose config names no trackingSecret: the pods get no tracker credentials (fine for
    an MLflow server without authentication; W&B needs WANDB_API_KEY)."""
    if not p.spec.track or cfg.tracking_secret:
        return []
    return ["--track: the cluster config names no trackingSecret, so the pods get no MLFLOW_TRACKING_TOKEN/"
            "WANDB_API_KEY (see docs/tracking.md); a tracker that refuses them is skipped, training goes on"]


def check_budget(p) -> None:
    e, s = p.estimate, p.spec
    if s.budget_cap is not None and not e.within_budget:
        raise UsageError(
            f"estimate ${e.total_dollars:,.2f} ({fmt_hours(e.total_hours)} on {s.gpus} x {s.gpu_type} at "
            f"${e.price_per_gpu_hour:.2f}/GPU-h) exceeds --max-cost ${s.budget_cap:,.2f}; nothing was submitted "
            f"(raise --max-cost, or lower --depth or --ratio)")


def cmd_submit(args) -> int:
    if args.local:
        from cli.local import run_local

        args.storage = args.storage or LOCAL_STORAGE
        return run_local(args)
    from cli.kube.client import connect, read_config, resolve_namespace
    from cli.kube.config import ClusterConfig, load_config_file, parse_env
    from cli.kube.runs import create_run
    from cli.planning import cluster_interconnect, render_table

    if args.depth is None:
        raise UsageError("submit: --depth is required (or --local for the small run on this machine)")
    extra_env = parse_env(args.env)
    if args.preflight:  # each node's GPUs and NVLink checked before the stages (trainer/preflight.py)
        extra_env["LLMCTL_PREFLIGHT"] = "1"
    if not args.dry_run:
        require_yes(args, "submit")
    file_cfg, warnings = load_config_file(args.cluster_config) if args.cluster_config else (None, [])
    namespace = resolve_namespace(args)

    # Everything the flags alone decide, before any request.
    cfg = apply_flags(file_cfg or ClusterConfig(), args)
    p, rayjob = render(args, cfg, namespace, extra_env)
    warnings = [*warnings, *tracking_warnings(p, cfg)]
    if args.dry_run or args.price is not None or file_cfg is not None:
        check_budget(p)  # otherwise the price may still come from the cluster's ConfigMap
    if args.dry_run:
        say(*(f"warning: {w}" for w in warnings), render_table(p, spot_price=cfg.spot_prices.get(p.spec.gpu_type),
                                                            interconnect_note=cluster_interconnect(args, cfg)[1]), "",
             f"dry run: nothing was sent; the RayJob for namespace {namespace} follows")
        print(dump_objects([rayjob], args.output or "yaml"))
        return 0

    kube = connect(args)
    if file_cfg is None:
        cluster_cfg, warnings = read_config(kube)
        cfg = apply_flags(cluster_cfg, args)
        p, rayjob = render(args, cfg, kube.namespace, extra_env)
        warnings = [*warnings, *tracking_warnings(p, cfg)]
        check_budget(p)
    if args.avoid_bad_nodes and "rayClusterSpec" in rayjob["spec"]:  # keep off nodes its GPUs failed on
        from cli.gpuhealth import keep_off_bad_nodes

        warnings = [*warnings, *keep_off_bad_nodes(p, rayjob)]
    say(*(f"warning: {w}" for w in warnings), render_table(p, spot_price=cfg.spot_prices.get(p.spec.gpu_type),
                                                            interconnect_note=cluster_interconnect(args, cfg)[1]), "")
    e = p.estimate
    if not args.yes and not confirm(f"Submit {p.name} to namespace {kube.namespace}: {p.spec.gpus} x "
                                     f"{p.spec.gpu_type} for about {fmt_hours(e.total_hours)}, "
                                     f"${e.total_dollars:,.2f}?"):
        say("not submitted; nothing was created")
        return 1
    created = create_run(kube, p.name, rayjob)
    if "rayClusterSpec" in rayjob["spec"]:  # its own cluster: guard the head against drains (cli/kube/guards.py)
        from cli.kube.guards import create_head_pdb

        if warning := create_head_pdb(kube, created):
            say(f"warning: {warning}")
    if args.output:
        print(dump_objects([created], args.output))
    else:
        print(f"rayjob.ray.io/{p.name} created in namespace {kube.namespace}")
    ns = f" -n {kube.namespace}"
    say(f"next: llmctl status {p.name}{ns}   llmctl logs {p.name}{ns} -f   llmctl cancel {p.name}{ns}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "submit", help="plan a run, show its price, and start it on Kubernetes (or --local)",
        description="Plan a run from --depth, show the plan and its price, and create a KubeRay RayJob for it. "
        "Cluster defaults come from the llmctl-config ConfigMap in the namespace; flags override them.",
        epilog="Examples:\n  llmctl submit --depth 26 --gpus 8\n  llmctl submit --depth 26 --gpus 8 --dry-run -o yaml\n"
        "  llmctl submit --depth 20 --gpus 16 --max-cost 200 --yes\n  llmctl submit --local\n"
        "  llmctl submit --local --track mlflow=http://127.0.0.1:5000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p)
    for action in p._actions:  # adapt the shared spec flags to submit
        if action.dest == "depth":
            action.required = False  # --local plans its own small model
        elif action.dest == "storage":
            action.help = f"storage root URL (default: the cluster config's storageRoot; --local: {LOCAL_STORAGE})"
        elif action.dest == "price":
            action.help = "$ per GPU-hour (default: the cluster config's prices, else the GPU type's catalog price)"
    p.set_defaults(storage=None)
    g = p.add_argument_group("submission")
    g.add_argument("--local", action="store_true", help="run the small end-to-end pipeline on this machine instead")
    g.add_argument("--steps", type=int, help="with --local: pretraining steps (default: the local run's own)")
    g.add_argument("--preset", choices=("quick", "demo"), help="with --local: quick (default, a few minutes: "
                   "`make run`) or demo (~30-40 min on 2 cores; text that reads like its corpus)")
    g.add_argument("--verbose", action="store_true", help="with --local: Ray's own log lines on the console too")
    g.add_argument("--dry-run", action="store_true", help="print the objects; send nothing (no cluster needed)")
    g.add_argument("-o", "--output", choices=("yaml", "json"), help="print objects in this format "
                   "(with --dry-run: default yaml; otherwise the created RayJob)")
    g.add_argument("-y", "--yes", action="store_true", help="submit without asking (required off a terminal)")
    g.add_argument("--image", help="trainer image (default: the cluster config's)")
    g.add_argument("--queue", help="Kueue LocalQueue (default: the cluster config's; '' for none)")
    g.add_argument("--track", action="append", metavar="mlflow=URI|wandb[=PROJECT]",
                   help="also log the run to an experiment tracker: its plan, per-step loss, val bpb, MFU, tokens/s "
                   "and dollars, and the report (repeatable; credentials from the environment or, on a cluster, the "
                   "config's trackingSecret; docs/tracking.md)")
    g.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="extra environment on Ray containers, e.g. NCCL_DEBUG=INFO (repeatable; no secrets)")
    g.add_argument("--preflight", action="store_true", help="before training, check each node (a GPU matmul "
                   "against a float32 reference and an all-reduce among its GPUs); results in <run>/preflight.json, "
                   "a failing node is recorded in bad-nodes.json and the attempt stops")
    g.add_argument("--avoid-bad-nodes", action="store_true", help="read the nodes this run's ranks recorded as "
                   "failing (GPU/NCCL errors, <run>/bad-nodes.json) and keep its workers off them")
    g.add_argument("--ray-cluster", help="run on this existing RayCluster (e.g. the chart's warm cluster) "
                   "instead of a new one per run")
    g.add_argument("--cluster-config", metavar="FILE",
                   help="cluster config file (the ConfigMap's config.yaml shape) used instead of the ConfigMap")
    add_version_args(g)
    add_cluster_args(p)
    p.set_defaults(func=cmd_submit)

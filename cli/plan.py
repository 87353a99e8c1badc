"""`llmctl plan`: show what a depth costs before anything runs (shape, tokens, steps, time, dollars).

Priced at the catalog's prices, or at a cluster config's (`--cluster-config FILE`, `--from-cluster`), with
the interconnect that cluster measured (`llmctl doctor --network`). Nothing is created. The table and the
spec flags are shared with `submit` (cli/planning.py, cli/flags.py).
"""

from __future__ import annotations

import argparse
import json

from cli.flags import add_cluster_args, add_spec_args


def _plan_cluster_config(args):
    """The cluster config `plan` prices with: --cluster-config FILE, --from-cluster (the namespace's ConfigMap),
    else None (catalog prices, the default fabric). Warnings go to stderr."""
    if not (args.cluster_config or args.from_cluster):
        return None
    import sys

    from cli.kube.client import connect, read_configmap
    from cli.kube.config import load_config_file

    if args.cluster_config:
        cfg, warnings = load_config_file(args.cluster_config)
    else:
        cfg, warnings = read_configmap(connect(args))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return cfg


def dump(p, fmt: str) -> str:
    """A RunPlan as `-o json` (the contract: trainer/plan/runplan.py SCHEMA) or `-o yaml` (the same tree)."""
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(json.loads(p.to_json()), sort_keys=False)
    return p.to_json()


def _from_sweep(args, spec):
    """(spec, assumption lines): depth and ratio chosen by a stored sweep fit for --flops or --budget
    (trainer/plan/sweep.py `for_flops` / `for_dollars`; the fit is read from <storage>/sweeps/NAME/fit.json)."""
    from cli.errors import UsageError
    from cli.runview import storage_options_for_cli
    from cli.sweepstate import read_fit, sweep_url
    from trainer.plan import sweep as plansweep
    from trainer.storage import expand

    if args.depth is not None:
        raise UsageError("plan: --sweep chooses --depth and --ratio from the fit; leave --depth out")
    if (args.flops is None) == (args.budget is None):
        raise UsageError("plan: --sweep needs --flops C or --budget USD (one of the two)")
    url = sweep_url(expand(args.storage), plansweep.check_name(args.sweep))
    fit = read_fit(url, storage_options_for_cli(url))
    if args.flops is not None:
        spec, flops = plansweep.for_flops(fit, spec, args.flops), args.flops
    else:
        spec, flops = plansweep.for_dollars(fit, spec, args.budget)
    return spec, plansweep.assumptions(fit, args.sweep, spec, flops, args.budget)


def cmd_plan(args: argparse.Namespace) -> int:
    from cli.errors import UsageError
    from cli.planning import cluster_interconnect, plan_checked, render_table, spec_from_args

    if args.sweep is None and (args.flops is not None or args.budget is not None):
        raise UsageError("plan: --flops and --budget choose a run from a sweep's fit; give --sweep NAME")
    if args.sweep is None and args.depth is None:
        raise UsageError("plan: the following arguments are required: --depth (or --sweep NAME with --flops/--budget)")
    cfg = _plan_cluster_config(args)
    gbs, note = cluster_interconnect(args, cfg)
    price = args.price if args.price is not None or cfg is None else cfg.prices.get(args.gpu_type)
    spec = spec_from_args(args, interconnect_busbw_gbs=gbs, price_per_gpu_hour=price,
                          **({"depth": 1} if args.sweep else {}))
    assumptions = ()
    if args.sweep:
        spec, assumptions = _from_sweep(args, spec)
    p = plan_checked(spec)
    if args.output == "table":
        print(render_table(p, interconnect_note=note, assumptions=tuple(assumptions)))
    else:
        if assumptions:
            import sys

            print("\n".join(f"assumption: {a}" for a in assumptions), file=sys.stderr)
        print(dump(p, args.output))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="derive a run from --depth and show its time and price",
                       description="Derive every hyperparameter from --depth (nanochat's recipe) and estimate "
                       "time and dollars. Nothing is created.",
                       epilog="Examples:\n  llmctl plan --depth 26 --gpus 8 -o json\n"
                       "  llmctl plan --sweep iso --flops 3e19 --gpus 8",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p)
    for action in p._actions:
        if action.dest == "depth":
            action.required = False  # --sweep chooses it
            action.help += " (required unless --sweep)"
    g = p.add_argument_group("from a sweep's fit (llmctl sweep)")
    g.add_argument("--sweep", metavar="NAME", help="choose --depth and --ratio from this sweep's fitted law "
                   "(<storage>/sweeps/NAME/fit.json) for --flops or --budget")
    g.add_argument("--flops", type=float, metavar="C", help="with --sweep: training FLOPs to spend (e.g. 3e19)")
    g.add_argument("--budget", type=float, metavar="USD", help="with --sweep: dollars for the whole plan; the "
                   "largest compute-optimal run within them")
    p.add_argument("-o", "--output", default="table", choices=("table", "json", "yaml"), help="output format")
    g = p.add_argument_group("cluster (optional: its prices and measured interconnect)")
    g.add_argument("--cluster-config", metavar="FILE", help="price with this cluster config file (the ConfigMap's "
                   "config.yaml shape; an `interconnect:` mapping is the measured figure)")
    g.add_argument("--from-cluster", action="store_true", help="read the namespace's llmctl-config ConfigMap: its "
                   "prices and the interconnect `llmctl doctor --network` measured")
    add_cluster_args(p)
    p.set_defaults(func=cmd_plan)

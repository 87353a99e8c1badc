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


def cmd_plan(args: argparse.Namespace) -> int:
    from cli.planning import cluster_interconnect, plan_checked, render_table, spec_from_args

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
    add_cluster_args(p)
    p.set_defaults(func=cmd_plan)

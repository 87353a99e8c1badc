"""`llmctl sweep`: a scaling-law sweep as one command — plan an IsoFLOP (or ratio) grid, price it, submit every
cell as a RayJob into the Kueue queue (or run it here with `--local`), follow it, fit it.

    llmctl sweep --flops 1e18,2.15e18,4.64e18,1e19 --depths 10,12,14,16,18,20 --gpus 8 [--max-cost USD]
    llmctl sweep status NAME      the grid: queued/running/done/failed, val bpb, CORE, dollars; the fit
    llmctl sweep fit NAME         fit the done cells, store fit.json and the report (PNGs, report.html)
    llmctl sweep cancel NAME

The grid is trainer/plan/sweep.py's; state, resume and the local runner are cli/sweepstate.py's; RayJobs are
rendered, submitted, read and cancelled by cli/kube/sweep.py; the fit and report are trainer/sweep/'s. Refusals
(bad flags, over --max-cost, another definition under the same name) create nothing and exit 2.
"""

from __future__ import annotations

import argparse
import json

from cli.console import confirm, dump_json, dump_objects, fmt_hours, require_yes, say
from cli.errors import CLIError, UsageError
from cli.flags import add_cluster_args, add_version_args, apply_flags

LOCAL_STORAGE = "file://~/.cache/llmctl"  # RunSpec.storage_root's default, as `submit --local` uses
# The local grid: 15 min whole, measured on the loaded 2-core sandbox (docs/sweeps.md, "Our measured ratio", with
# its results and why its fit is not a measurement). Models of 1-3 layers, 64 wide per layer, a 512-token vocabulary
# (d1: 82K scaling params, the smallest the depth dial makes) and a 256-token context, 4,096 tokens a step on 2
# workers (the quick local run's shape, cli/local.py); budgets a factor 2 apart. Even d1 is past the compute-optimal
# size of such budgets, so the cells sit at ratios far from the recipe's and the grid accepts 0.05-1,000 tokens per
# parameter and 20-step cells (its warm-up is a tenth of the run: runplan.py).
LOCAL_GRID = dict(flops=(8e11, 1.6e12, 3.2e12), depths=(1, 2, 3), min_steps=20, sane_ratio=(0.05, 1000.0))
LOCAL_SPEC = dict(gpus=2, gpu_type="cpu", vocab_size=512, seq_len=256, head_dim=64, device_batch_size=8,
                  total_batch_size=2 * 8 * 256, eval_tokens=2 * 8 * 256 * 16, dataset="sample-demo",
                  tokenizer="sample-demo-512", sft_dataset="sample-demo-sft")
LOCAL_INPUTS = dict(mb=24, conversations=300)  # the demo corpus, ~6M tokens: the largest cell reads ~2.9M


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: a comma-separated list of numbers, got {text!r:.60}") from None


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: a comma-separated list of integers, got {text!r:.60}") from None


# ---------------------------------------------------------------------------------------------
# The grid from the flags


def _base_spec(args, **fields):
    from trainer.plan import RunSpec

    spec = dict(LOCAL_SPEC) if args.local else {}
    spec.update({k: v for k, v in dict(gpus=args.gpus, gpu_type=args.gpu_type, seq_len=args.seq_len,
                                        precision=args.precision, price_per_gpu_hour=args.price).items()
                 if v is not None})
    spec.update(fields)
    return RunSpec(depth=1, **spec)


def _axes(args) -> dict:
    grid = dict(LOCAL_GRID) if args.local else {}  # --local: its floors, and its axes unless given
    if args.flops or args.ratios:
        grid.pop("flops", None)
    if args.flops:
        grid["flops"] = _floats(args.flops, "--flops")
    if args.ratios:
        grid["ratios"] = _floats(args.ratios, "--ratios")
    if args.depths:
        grid["depths"] = _ints(args.depths, "--depths")
    if args.min_steps is not None:
        grid["min_steps"] = args.min_steps
    if not (grid.get("flops") or grid.get("ratios")) or not grid.get("depths"):
        raise UsageError("sweep: give --flops (or --ratios) and --depths, e.g. --flops 1e18,2.15e18 --depths 10,12,14"
                         " (or --local for the small grid on this machine)")
    return grid


def _name(args, defn: dict) -> str:
    """--name, else `sweep-<hash of what is trained>`: the same command names the same sweep (a resume), on any
    storage and at any price."""
    if args.name:
        return args.name
    import hashlib  # here: the parser need not pay for it

    trained = {**defn, "name": None, "spec": {k: v for k, v in defn["spec"].items() if k != "storage_root"}}
    return f"sweep-{hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:8]}"


# Spec fields left out of the stored definition: where the cells run and their price change nothing trained, so a
# resume from another namespace, image or price list is still the same sweep.
NOT_DEFINING = ("namespace", "image", "queue", "price_per_gpu_hour")


def planned(args, **spec_fields):
    """(definition, cells) for these flags; bad input raises UsageError/PlanError before anything is touched."""
    from trainer.plan import RunSpec
    from trainer.plan import sweep as plansweep

    base = _base_spec(args, **spec_fields)
    axes = _axes(args)
    defining = RunSpec.from_dict({k: v for k, v in base.to_dict().items() if k not in NOT_DEFINING})
    name = plansweep.check_name(_name(args, plansweep.definition(defining, sweep="-", local=args.local, **axes)))
    return (plansweep.definition(defining, sweep=name, local=args.local, **axes),
            plansweep.grid(base, sweep=name, **axes))


def render_grid(defn: dict, rows: list[dict], *, results: bool = False) -> str:
    """The sweep as one table: a row per cell (steps, tokens, ratio, FLOPs, hours, dollars; with `results`, its
    state, val bpb, CORE and dollars so far), the total, then the dropped cells and why."""
    from cli.planning import fmt_count

    head = ["cell", "depth", "params", "steps", "tokens", "ratio", "FLOPs", "hours", "$ est"]
    if results:
        head += ["state", "val bpb", "CORE", "$ spent"]
    table, dropped = [head], []
    for r in rows:
        if r.get("dropped"):
            dropped.append(f"  {r['cell']}: {r['dropped']}")
            continue
        line = [r["cell"], f"d{r['depth']}", fmt_count(r["params"]), f"{r['steps']:,}", fmt_count(r["tokens"]),
                f"{r['ratio']:.3g}", f"{r['flops']:.3g}", fmt_hours(r["hours"]),
                f"{r['dollars']:,.2f}"]
        if results:
            line += [r.get("state", ""), _f(r.get("val_bpb"), ".4f"), _f(r.get("core"), ".4f"),
                     _f(r.get("dollars_spent"), ",.2f")]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    kept = [r for r in rows if not r.get("dropped")]
    hours, dollars = sum(r["hours"] for r in kept), sum(r["dollars"] for r in kept)
    spec = defn["spec"]
    lines.append(f"total: {len(kept)} cells, {hours:.2f} run-hours on {spec['gpus']} x {spec['gpu_type']} each "
                 f"({hours * spec['gpus']:.1f} GPU-hours), ${dollars:,.2f}; achieved FLOPs are each budget rounded "
                 f"up to whole steps (at most one step over)")
    if results:
        spent = sum(r.get("dollars_spent") or 0.0 for r in kept)
        counts = {s: sum(r.get("state") == s for r in kept) for s in ("done", "running", "queued", "failed")}
        lines.append(f"state: {', '.join(f'{v} {k}' for k, v in counts.items())}, "
                     f"{len(kept) - sum(counts.values())} other; ${spent:,.2f} spent so far")
    if dropped:
        lines += [f"dropped ({len(dropped)}):", *dropped]
    return "\n".join(lines)


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _check_cost(defn: dict, cells, cap: float | None) -> None:
    from trainer.plan.sweep import totals

    t = totals(cells)
    if cap is not None and t["dollars"] > cap:
        raise UsageError(f"sweep {defn['name']}: {t['cells']} cells estimated at ${t['dollars']:,.2f}, over --max-cost "
                         f"${cap:,.2f}; nothing was created (drop budgets or depths, or raise --max-cost)")


# ---------------------------------------------------------------------------------------------
# Commands


def _cluster(args):
    """(kube, cluster config, warnings): the namespace's llmctl-config, with --image/--queue/--kuberay-version."""
    from cli.kube.client import connect, read_config

    kube = connect(args)
    cfg, warnings = read_config(kube)
    return kube, apply_flags(cfg, args), warnings


def _cluster_spec(args, cfg, namespace: str) -> dict:
    price = args.price if args.price is not None else cfg.prices.get(args.gpu_type or "h100")
    return dict(storage_root=args.storage or cfg.storage_root, price_per_gpu_hour=price, namespace=namespace,
                image=cfg.image, queue=cfg.queue)


def _render(render_cells, defn: dict, cells, cfg, namespace: str) -> list[dict]:
    """Each cell's RayJob (cli/kube/sweep.py); what the renderer refuses (a layout, a label) is a UsageError."""
    from cli.kube.layout import LayoutError

    try:
        return render_cells(defn["name"], [(c.id, c.plan) for c in cells], cfg, namespace=namespace)
    except (LayoutError, ValueError) as e:
        raise UsageError(str(e)) from None


def cmd_sweep(args) -> int:
    from cli import sweepstate
    from cli.runview import storage_options_for_cli

    if args.local:
        return _local(args)
    from cli.kube.client import resolve_namespace
    from cli.kube.config import ClusterConfig, load_config_file

    if not args.dry_run:
        require_yes(args, "sweep")
    file_cfg, warnings = load_config_file(args.cluster_config) if args.cluster_config else (None, [])
    namespace = resolve_namespace(args)
    cfg = apply_flags(file_cfg or ClusterConfig(), args)
    defn, cells = planned(args, **_cluster_spec(args, cfg, namespace))
    rows = [c.to_dict() for c in cells]
    if args.dry_run or file_cfg is not None or args.price is not None:
        _check_cost(defn, cells, args.max_cost)
    if args.dry_run:
        say(*(f"warning: {w}" for w in warnings))
        table = render_grid(defn, rows)
        if not args.output:
            print(table)
            say(f"dry run: nothing was created; -o yaml prints the {len(rows) - sum(c.dropped for c in cells)} RayJobs")
            return 0
        from cli.kube.sweep import render_cells

        say(table, "", f"dry run: nothing was sent; the RayJobs for namespace {namespace} follow")
        objs = _render(render_cells, defn, [c for c in cells if not c.dropped], cfg, namespace)
        print(dump_objects(objs, args.output))
        return 0

    from cli.kube.sweep import cell_states, render_cells, submit_cells

    kube, cluster_cfg, warnings = _cluster(args)
    if file_cfg is None:
        cfg = cluster_cfg
        defn, cells = planned(args, **_cluster_spec(args, cfg, kube.namespace))
        rows = [c.to_dict() for c in cells]
        _check_cost(defn, cells, args.max_cost)
    url = sweepstate.sweep_url(defn["spec"]["storage_root"], defn["name"])
    opts = storage_options_for_cli(url)
    resuming = sweepstate.check_definition(url, defn, opts)
    states = cell_states(kube, kube.namespace, defn["name"]) if resuming else {}
    submit, retry, skipped = sweepstate.cluster_work(cells, url, opts, states)
    say(*(f"warning: {w}" for w in warnings), render_grid(defn, rows), "")
    if resuming:
        say(f"resuming sweep {defn['name']}: {len(skipped)} cells done or on the cluster, {len(retry)} failed to "
            f"retry, {len(submit)} to submit")
    ids = {c.id for c in submit + retry}
    todo = [c for c in cells if c.id in ids]  # in grid order
    if not todo:
        say(f"nothing to submit: every cell is done or on the cluster (llmctl sweep status {defn['name']})")
        return 0
    dollars = sum(c.plan.estimate.total_dollars for c in todo)
    if not args.yes and not confirm(f"Submit {len(todo)} cells of sweep {defn['name']} to namespace {kube.namespace} "
                                    f"(${dollars:,.2f} estimated)?"):
        say("not submitted; nothing was created")
        return 1
    sweepstate.store_definition(url, defn, opts)
    objs = _render(render_cells, defn, todo, cfg, kube.namespace)
    by_cell = dict(zip((c.id for c in todo), objs))
    for c in retry:
        sweepstate.delete_and_wait(kube, by_cell[c.id]["metadata"]["name"])
    for c in todo:  # recorded before the POST: a crash between them shows "submitted", and the name guards the rest
        sweepstate.update_record(url, c.id, opts, status="submitted", run=c.plan.name,
                                 rayjob=by_cell[c.id]["metadata"]["name"])
    created = submit_cells(kube, objs)
    print(f"{len(created)} RayJobs created in namespace {kube.namespace} for sweep {defn['name']}"
          + (f" ({len(todo) - len(created)} were there already)" if len(created) < len(todo) else ""))
    say(f"next: llmctl sweep status {defn['name']}   llmctl sweep cancel {defn['name']}")
    return 0


def _local(args) -> int:
    from cli import sweepstate
    from trainer.storage import expand

    storage = expand(args.storage or LOCAL_STORAGE)
    defn, cells = planned(args, storage_root=storage)
    _check_cost(defn, cells, args.max_cost)
    rows = [c.to_dict() for c in cells]
    url = sweepstate.sweep_url(storage, defn["name"])
    print(render_grid(defn, rows), flush=True)
    if args.dry_run:
        say("dry run: nothing was run")
        return 0
    resuming = sweepstate.check_definition(url, defn, {})
    sweepstate.store_definition(url, defn, {})
    if resuming:
        say(f"resuming sweep {defn['name']}: cells done are skipped")
    import time

    t0 = time.perf_counter()
    states = sweepstate.run_local(cells, url, num_cpus=args.num_cpus, inputs=LOCAL_INPUTS if args.local else None)
    say(f"{sum(s == 'done' for s in states.values())} of {len(states)} cells done in {time.perf_counter() - t0:.0f} s")
    _, rows = sweepstate.grid_view(defn, url, {})
    if len(sweepstate.fit_cells(rows)) >= sweepstate.MIN_FIT_CELLS:
        try:
            fit, files = sweepstate.fit_and_report(url, defn, rows, {})
        except (CLIError, ImportError) as e:
            say(f"warning: no fit: {e}; `llmctl sweep fit {defn['name']} --local` fits later")
        else:
            print(_fit_lines(fit))
            say(f"fit and report: {url}/ ({len(files)} files)")
    print(f"next: llmctl sweep status {defn['name']} --local" + (f" --storage {args.storage}" if args.storage else ""))
    return 0 if all(s == "done" for s in states.values()) else 1


def _fit_lines(fit: dict) -> str:
    n, d, r = fit.get("n_opt") or {}, fit.get("d_opt") or {}, fit.get("ratio") or {}

    def ci(x):
        c = x.get("ci95")
        return f" (95% CI {c[0]:.3g}-{c[1]:.3g})" if isinstance(c, list) and len(c) == 2 else ""

    out = [f"fit: N_opt ∝ C^{n.get('exponent', float('nan')):.3f}{ci(n)}, D_opt ∝ C^{d.get('exponent', float('nan')):.3f}"
           f"{ci(d)}, tokens:params ratio {r.get('value', float('nan')):.3g}{ci(r)}"]
    from cli.console import clean

    for d in fit.get("dropped") or []:
        if isinstance(d, dict):
            flops = d.get("flops")
            where = f"{flops:.3g} FLOPs" if isinstance(flops, (int, float)) else "a budget"
            out.append(clean(f"fit dropped {where}: {d.get('reason')}", limit=300))
    return "\n".join(out)


def _where(args):
    """(storage root, options, kube or None): --storage, else --local's default, else the cluster config's."""
    from cli.runview import storage_options_for_cli
    from trainer.storage import expand

    kube = None
    if args.storage or args.local:
        root = expand(args.storage or LOCAL_STORAGE)
    else:
        kube, cfg, _ = _cluster(args)
        root = cfg.storage_root
    return root, storage_options_for_cli(root), kube


def _stored(args):
    from cli import sweepstate
    from trainer.plan.sweep import check_name

    check_name(args.sweep)
    root, opts, kube = _where(args)
    url = sweepstate.sweep_url(root, args.sweep)
    defn = sweepstate.read_definition(url, opts)
    if not isinstance(defn, dict):
        raise CLIError(f"no sweep {args.sweep} under {root}/sweeps (give --storage, or --local for a local sweep)")
    return defn, url, opts, kube


def cmd_status(args) -> int:
    from cli import sweepstate

    defn, url, opts, kube = _stored(args)
    states = None
    if not (defn.get("local") or args.local):
        try:
            from cli.kube.sweep import cell_states

            kube = kube or _cluster(args)[0]
            states = cell_states(kube, kube.namespace, defn["name"])
        except CLIError as e:
            say(f"warning: the cluster could not be read ({e}); states from storage only")
    _, rows = sweepstate.grid_view(defn, url, opts, states)
    fit = None
    done = sweepstate.fit_cells(rows)
    try:
        fit = sweepstate.read_fit(url, opts)
    except UsageError:
        pass
    if len(done) >= sweepstate.MIN_FIT_CELLS and not args.no_fit and \
            (fit is None or fit.get("cells_fitted") != sorted(c["cell"] for c in done)):
        try:
            fit, _ = sweepstate.fit_and_report(url, defn, rows, opts)
        except (CLIError, ImportError) as e:
            say(f"warning: no fit yet: {e}")
    if args.output == "json":
        print(dump_json({"sweep": defn["name"], "cells": rows, "fit": fit}))
        return 0
    print(render_grid(defn, rows, results=True))
    if fit:
        print(_fit_lines(fit))
        print(f"report: {url}/report.html")
    elif len(done) < sweepstate.MIN_FIT_CELLS:
        print(f"fit: after {sweepstate.MIN_FIT_CELLS} done cells ({len(done)} so far)")
    return 0


def cmd_fit(args) -> int:
    from cli import sweepstate

    defn, url, opts, _ = _stored(args)
    _, rows = sweepstate.grid_view(defn, url, opts)
    fit, files = sweepstate.fit_and_report(url, defn, rows, opts)
    print(_fit_lines(fit))
    say(*(f"wrote {f}" for f in files))
    return 0


def cmd_cancel(args) -> int:
    from cli import sweepstate
    from cli.kube.sweep import cancel_sweep

    require_yes(args, "sweep cancel")
    defn, url, opts, kube = _stored(args)
    if defn.get("local"):
        raise UsageError(f"sweep {defn['name']} runs locally; stop it with Ctrl-C (re-running resumes)")
    kube = kube or _cluster(args)[0]
    if not args.yes and not confirm(f"Cancel every RayJob of sweep {defn['name']} in namespace {kube.namespace}? "
                                    f"Finished cells and checkpoints stay in storage."):
        say("not cancelled")
        return 1
    names = cancel_sweep(kube, kube.namespace, defn["name"])
    ids = {c.id for c in sweepstate.grid_view(defn, url, opts)[0]}  # records only for the grid's own cells
    for n in names:
        if (cid := n.removeprefix(f"{defn['name']}-")) in ids:
            sweepstate.update_record(url, cid, opts, status="cancelled")
    print(f"{len(names)} RayJobs of sweep {defn['name']} deleted in namespace {kube.namespace}")
    say(f"running the same `llmctl sweep` command again resumes: done cells are kept")
    return 0


# ---------------------------------------------------------------------------------------------
# Parsers


def register(sub) -> None:
    from trainer.plan.catalog import GPUS

    p = sub.add_parser(
        "sweep", help="scaling-law sweep: an IsoFLOP grid on the cluster (or --local), fitted and priced",
        description="Plan a grid of pretraining runs (FLOP budgets x depths, or ratios x depths), show each run's "
        "steps, hours and dollars and the total, and submit every cell as a RayJob into the Kueue queue. Re-running "
        "the same command resumes: done cells are skipped, failed ones retried, none submitted twice.",
        epilog="Examples:\n  llmctl sweep --flops 1e18,2.15e18,4.64e18,1e19 --depths 10,12,14,16,18,20 --gpus 8\n"
        "  llmctl sweep --flops 1e18,1e19 --depths 10,14,18 --gpus 8 --dry-run -o yaml\n"
        "  llmctl sweep --local\n  llmctl sweep status NAME\n  llmctl sweep fit NAME\n  llmctl sweep cancel NAME",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the grid")
    g.add_argument("--flops", metavar="C,C,...", help="FLOP budgets, comma-separated (e.g. 1e18,2.15e18,4.64e18)")
    g.add_argument("--ratios", metavar="R,R,...", help="tokens:params ratios instead of budgets (e.g. 4,8,16)")
    g.add_argument("--depths", metavar="D,D,...", help="depths, comma-separated (e.g. 10,12,14)")
    g.add_argument("--min-steps", type=int, help="drop cells with fewer steps (default 80: twice the warm-up)")
    g.add_argument("--name", help="sweep name (default: sweep-<hash of the grid>, the same for the same command)")
    g = p.add_argument_group("where and at what price")
    g.add_argument("--gpus", type=int, help="GPUs per cell (default 1; --local: 2 CPU workers)")
    g.add_argument("--gpu-type", help=f"one of {', '.join(GPUS)} (default h100)")
    g.add_argument("--price", type=float, help="$ per GPU-hour (default: the cluster config's, else the catalog's)")
    g.add_argument("--seq-len", type=int, help="context length (default 2048; --local 256)")
    g.add_argument("--precision", choices=("bf16", "fp8"), help="matmul precision (default bf16)")
    g.add_argument("--max-cost", type=float, help="cap on the whole sweep's estimate in $: refuse above it")
    g.add_argument("--storage", help=f"storage root (default: the cluster config's; --local: {LOCAL_STORAGE})")
    g = p.add_argument_group("submission")
    g.add_argument("--local", action="store_true", help="run the small grid here, cell after cell, on CPU")
    g.add_argument("--num-cpus", type=int, help="with --local: CPUs for the local Ray cluster (default all)")
    g.add_argument("--dry-run", action="store_true", help="show the grid (and with -o the RayJobs); create nothing")
    g.add_argument("-o", "--output", choices=("yaml", "json"), help="with --dry-run: print every RayJob")
    g.add_argument("-y", "--yes", action="store_true", help="submit without asking (required off a terminal)")
    g.add_argument("--image", help="trainer image (default: the cluster config's)")
    g.add_argument("--queue", help="Kueue LocalQueue (default: the cluster config's)")
    g.add_argument("--cluster-config", metavar="FILE", help="cluster config file instead of the ConfigMap")
    add_version_args(g)
    add_cluster_args(p)
    p.set_defaults(func=cmd_sweep)

    verbs = p.add_subparsers(title="sweep commands", metavar="{status,fit,cancel}", required=False,
                             parser_class=type(p))
    for verb, func, text in (("status", cmd_status, "show a sweep's grid, results, cost so far and fit"),
                             ("fit", cmd_fit, "fit the done cells; store fit.json and the report"),
                             ("cancel", cmd_cancel, "delete every RayJob of the sweep (storage is kept)")):
        q = verbs.add_parser(verb, help=text, description=text)
        q.add_argument("sweep", help="sweep name")
        q.add_argument("--storage", help="storage root (default: the cluster config's; --local: "
                                         f"{LOCAL_STORAGE})")
        q.add_argument("--local", action="store_true", help="a local sweep: no cluster")
        if verb == "status":
            q.add_argument("-o", "--output", choices=("table", "json"), default="table")
            q.add_argument("--no-fit", action="store_true", help="do not fit, even with enough cells done")
        if verb == "cancel":
            q.add_argument("-y", "--yes", action="store_true", help="cancel without asking")
        add_cluster_args(q)
        q.set_defaults(func=func)

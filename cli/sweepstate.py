"""A sweep's state in storage, and what `llmctl sweep` does with it: the definition, per-cell records, results read
from each cell's run, resume on the cluster, the local sweep, the fit.

Layout (trainer/storage.py, the one storage door; every document read bounded, as untrusted):

    <root>/sweeps/<name>/sweep.json        the definition (trainer/plan/sweep.py `definition`): written once; the
                                           same command later is a resume, another definition is refused
    <root>/sweeps/<name>/cells/<cell>.json one record per cell: status, run name, submissions, results
                                           (updated with `update_json`, so `status` and a resume never lose a write)
    <root>/sweeps/<name>/fit.json          the fit (trainer/sweep/fit.py), beside the report's PNGs and report.html
    <root>/runs/<sweep>-<cell>/            each cell's run, as any run: summary.json, spend.json, checkpoints

A cell's state is read in this order: its run's summary.json (completed -> done, with val bpb), then the
cluster's RayJob (queued/running/done/failed: cli/kube/sweep.py `cell_states`), then its record. Resume submits
only cells neither done nor on the cluster; a failed cell's RayJob is deleted first, then created again (its run
resumes from its last checkpoint); RayJob names are the cells' run names, so a cell is never created twice.
"""

from __future__ import annotations

import datetime
import math

from cli.console import clean, say
from cli.errors import CLIError, UsageError

MAX_DOC_BYTES = 1 << 20  # sweep.json, a cell record, a run's summary.json: a few KB each
MAX_FIT_BYTES = 4 << 20  # fit.json carries per-budget curves and bootstrap intervals
MIN_FIT_CELLS = 6  # done cells before status fits: two budgets x three depths (a parabola needs three points)
STATES = ("submitted", "queued", "running", "done", "failed", "cancelled", "pending")


def sweep_url(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/sweeps/{name}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The definition and the cells' records


def read_definition(url: str, opts: dict | None) -> dict | None:
    """sweep.json, or None when there is none; one CLIError line when it cannot be read (invalid, too large)."""
    from trainer.storage import read_small_json

    try:
        return read_small_json(f"{url}/sweep.json", MAX_DOC_BYTES, opts)
    except ValueError as e:
        raise CLIError(clean(f"{url}/sweep.json cannot be read: {e}", limit=300)) from None


def check_definition(url: str, defn: dict, opts: dict | None) -> bool:
    """Whether a sweep of this name is stored already (True: a resume); refuses another definition (exit 2)."""
    old = read_definition(url, opts)
    if old is None:
        return False
    if old != defn:
        diff = sorted(k for k in set(old) | set(defn) if old.get(k) != defn.get(k)) if isinstance(old, dict) else []
        raise UsageError(f"sweep {defn['name']} exists at {url} with another definition (differs in "
                         f"{', '.join(diff) or 'its form'}); use another --name, or the same flags to resume")
    return True


def store_definition(url: str, defn: dict, opts: dict | None) -> None:
    """Write sweep.json once (update_json: two resumes racing agree, another definition is refused)."""
    from trainer.storage import update_json

    def change(old):
        if old is not None and old != defn:
            raise UsageError(f"sweep {defn['name']} was stored meanwhile with another definition; nothing submitted")
        return defn

    update_json(f"{url}/sweep.json", change, opts, max_bytes=MAX_DOC_BYTES)


def read_record(url: str, cid: str, opts: dict | None) -> dict:
    from trainer.storage import read_small_json

    try:
        rec = read_small_json(f"{url}/cells/{cid}.json", MAX_DOC_BYTES, opts)
    except ValueError as e:  # invalid or oversized: shown, never trusted
        return {"cell": cid, "status": "unreadable", "error": clean(str(e), limit=200)}
    return rec if isinstance(rec, dict) else {}


def update_record(url: str, cid: str, opts: dict | None, **changes) -> dict:
    from trainer.storage import update_json

    def change(old):
        old = old if isinstance(old, dict) else {}
        new = {**old, **changes, "cell": cid, "updated": _now()}
        if changes.get("status") == "submitted":
            new["submissions"] = int(old.get("submissions") or 0) + 1 if isinstance(old.get("submissions"), int) else 1
        return new

    return update_json(f"{url}/cells/{cid}.json", change, opts, max_bytes=MAX_DOC_BYTES, replace_invalid=True)


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def run_result(run_url: str, opts: dict | None) -> dict:
    """What a cell's run says of itself: its status, final val bpb, CORE (when it had an eval stage) and dollars
    spent (its spend ledger: every attempt). Unreadable storage gives {} with `error`; never raises."""
    from trainer.spend import read_spend
    from trainer.storage import read_small_json

    out: dict = {}
    try:
        s = read_small_json(f"{run_url}/summary.json", MAX_DOC_BYTES, opts)
        spend = read_spend(run_url, opts)
    except Exception as e:  # noqa: BLE001 - a storage failure is a warning in a grid, not the end of status
        return {"error": clean(f"{type(e).__name__}: {e}", limit=200)}
    if isinstance(s, dict):
        stages = s.get("stages") if isinstance(s.get("stages"), dict) else {}
        pre = stages.get("pretrain") if isinstance(stages.get("pretrain"), dict) else {}
        ev = stages.get("eval") if isinstance(stages.get("eval"), dict) else {}
        out["run_status"] = clean(str(s.get("status")), limit=20)
        out["val_bpb"] = _num(pre.get("val_bpb"))
        out["core"] = _num(ev.get("core"))
        out["dollars_spent"] = _num(s.get("dollars"))
    totals = (spend or {}).get("totals") or {}
    if _num(totals.get("dollars")) is not None:
        out["dollars_spent"] = max(out.get("dollars_spent") or 0.0, _num(totals["dollars"]))
    return out


def grid_view(defn: dict, url: str, opts: dict | None, cluster_states: dict | None = None):
    """(cells, rows): the sweep's planned cells (trainer/plan/sweep.py) and one row per cell with its state and
    results, each from the best source (run summary, then the cluster, then the record)."""
    from trainer.plan import PlanError
    from trainer.plan import sweep as plansweep

    try:
        base, kw = plansweep.grid_of(defn)
        cells = plansweep.grid(base, **kw)
    except PlanError as e:  # a stored document, not the user's flags: a known failure (exit 1), one line
        raise CLIError(clean(f"{url}/sweep.json is not a sweep this version plans: {e}", limit=300)) from None
    rows = []
    for c in cells:
        row = c.to_dict()
        if c.dropped:
            rows.append({**row, "state": "dropped"})
            continue
        rec = read_record(url, c.id, opts)
        res = run_result(c.plan.urls["run"], opts)
        state = (cluster_states or {}).get(c.id)
        if res.get("run_status") == "completed":
            state = "done"
        elif state is None:
            state = rec.get("status") if rec.get("status") in STATES else "pending"
        rows.append({**row, **{k: v for k, v in res.items() if k != "run_status"}, "state": state,
                     "submissions": rec.get("submissions", 0)})
    return cells, rows


def fit_cells(rows: list[dict]) -> list[dict]:
    """The done cells in the form trainer/sweep/fit.py takes. `flops` is the cell's budget (its IsoFLOP group;
    the achieved FLOPs, at most one step more, are `flops_achieved`); a ratio grid's cells have no budget, so
    their achieved FLOPs stand in."""
    keys = ("cell", "depth", "params", "tokens", "val_bpb", "core")
    return [{**{k: r.get(k) for k in keys}, "flops": r.get("budget") or r.get("flops"),
             "flops_achieved": r.get("flops"), "cost_usd": r.get("dollars_spent"), "status": "done"}
            for r in rows if r.get("state") == "done" and r.get("val_bpb") is not None]


def fit_and_report(url: str, defn: dict, rows: list[dict], opts: dict | None) -> tuple[dict, list[str]]:
    """Fit the done cells (trainer/sweep/fit.py), store fit.json, write the report (PNGs, report.html)."""
    from trainer.storage import write_json
    from trainer.sweep.fit import FitError, fit_sweep
    from trainer.sweep.report import write_report

    cells = fit_cells(rows)
    try:
        fit = {**fit_sweep(cells), "cells_fitted": sorted(c["cell"] for c in cells)}  # status refits when it changes
    except FitError as e:
        raise CLIError(f"sweep {defn['name']}: cannot fit ({e}); {len(cells)} cells done") from None
    write_json(f"{url}/fit.json", fit, opts)
    files = write_report(url, defn, cells, fit, storage_options=opts)
    return fit, [f"{url}/fit.json", *files]


def read_fit(url: str, opts: dict | None) -> dict:
    from trainer.storage import read_small_json

    fit = read_small_json(f"{url}/fit.json", MAX_FIT_BYTES, opts)
    if not isinstance(fit, dict):
        raise UsageError(f"no fit at {url}/fit.json: run `llmctl sweep fit NAME` once enough cells are done")
    return fit


# ---------------------------------------------------------------------------------------------
# The cluster: submit the cells not done nor there, retry the failed


def cluster_work(cells, url: str, opts: dict | None, states: dict[str, str]) -> tuple[list, list, list]:
    """(to submit, to retry, skipped): planned cells neither done (storage) nor queued/running/done (cluster);
    `to retry` are those the cluster shows failed (their RayJob must go first)."""
    submit, retry, skipped = [], [], []
    for c in cells:
        if c.dropped:
            continue
        if run_result(c.plan.urls["run"], opts).get("run_status") == "completed" or states.get(c.id) == "done":
            skipped.append((c, "done"))
        elif states.get(c.id) in ("queued", "running"):
            skipped.append((c, states[c.id]))
        elif states.get(c.id) == "failed":
            retry.append(c)
        else:
            submit.append(c)
    return submit, retry, skipped


def delete_and_wait(kube, name: str) -> None:
    """Delete a failed cell's RayJob and wait (bounded) until it is gone, so it can be created again."""
    from cli.kube.runs import GROUP, PLURAL, VERSION, wait_gone

    kube.call(kube.custom.delete_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL, name,
              propagation_policy="Background", what=f"delete failed cell {name}", verb="delete", resource=PLURAL,
              name=name, group=GROUP)
    if not wait_gone(kube, name):
        raise CLIError(f"RayJob {name} was still being deleted; run the same command again later to retry it")


# ---------------------------------------------------------------------------------------------
# Locally: the cells one after another on one local Ray session


def run_local(cells, url: str, *, num_cpus: int | None = None, inputs: dict | None = None) -> dict[str, str]:
    """Run each planned cell not yet done on a local Ray cluster (started once, for all cells): pretraining only,
    through trainer/launch.py `run` as `submit --local` does. Records each cell's result; returns cell -> state.
    `inputs`: keywords for cli/inputs.py `ensure_inputs` (the corpus size)."""
    import os

    import ray

    from cli.inputs import ensure_inputs
    from trainer.launch import LaunchError, LocalRay, run

    todo = [c for c in cells if not c.dropped and run_result(c.plan.urls["run"], {}).get("run_status") != "completed"]
    states = {c.id: "done" for c in cells if not c.dropped}
    states.update((c.id, "pending") for c in todo)
    if not todo:
        return states
    ensure_inputs(todo[0].plan, {}, say=say, **(inputs or {}))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = None if ray.is_initialized() else LocalRay(num_cpus=num_cpus)
    try:
        for i, c in enumerate(todo, 1):
            st = c.plan.stage("pretrain")
            say(f"[{i}/{len(todo)}] {c.id}: d{c.depth}, {st.steps} steps, {st.flops:.3g} FLOPs")
            update_record(url, c.id, {}, status="running", run=c.plan.name)
            try:
                summary = run(c.plan, storage_options={}, metrics_port_base=None, quiet=True)
                ok = summary.get("status") == "completed"
            except LaunchError as e:
                say(f"  {c.id} failed: {clean(str(e), limit=300)}")
                ok = False
            res = run_result(c.plan.urls["run"], {})
            states[c.id] = "done" if ok else "failed"
            update_record(url, c.id, {}, status=states[c.id], val_bpb=res.get("val_bpb"))
            if ok and res.get("val_bpb") is not None:
                say(f"  {c.id}: val bpb {res['val_bpb']:.4f}")
    finally:
        if cluster is not None:
            cluster.stop()
    return states

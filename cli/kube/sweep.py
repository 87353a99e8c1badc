"""A sweep on the cluster: one KubeRay RayJob per grid cell, queued through Kueue below production runs, created once,
read back as cell states, and deleted together.

- `render_cells`: each cell's RayJob is `build_rayjob`'s (cli/kube/rayjob.py), with two more labels on it and its
  pods, `llmctl.dev/sweep: <sweep>` and `llmctl.dev/sweep-cell: <cell>`, and Kueue's
  `kueue.x-k8s.io/priority-class: <cfg.kueue_sweep_priority_class>` (default llmctl-sweep, a WorkloadPriorityClass
  the chart and k8s/kueue/priority-classes.yaml set below production runs). The RayJob's name is the cell plan's
  run name (trainer/plan/sweep.py: `<sweep>-<cell>`, a DNS-1035 label of at most 47 characters, RunSpec's rule),
  so the run's storage, its pods' labels and the RayJob agree, and a re-run renders the same names.
- `submit_cells`: creates the RayJobs not on the cluster yet. The name is the key: one LIST of the sweep's RayJobs
  first, and a create that fails (409, a lost answer) is looked up before it counts as failed; a same-named
  RayJob that is not that cell of that sweep is an error, never skipped or replaced.
- `cell_states`: cell -> queued / running / done / failed, from each RayJob's status as `llmctl status` reads it
  (cli/kube/runs.py `describe`); a suspended RayJob (Kueue has not admitted it, or preempted it) is queued.
- `cancel_sweep`: deletes the sweep's RayJobs by label; KubeRay and Kubernetes' garbage collector delete their
  clusters, pods and head PodDisruptionBudgets. Checkpoints stay in storage. `delete_cells` deletes some cells'
  RayJobs (failed ones), so that `submit_cells` creates them again: a retry resumes from the last checkpoint.

Cluster answers are untrusted: lists are paged and bounded (MAX_RAYJOBS), label values read back are cleaned
(trainer/text.py) and checked before they become keys.
"""

from __future__ import annotations

import dataclasses
import re

from cli import console
from cli.errors import CLIError
from cli.kube.config import ClusterConfig
from cli.kube.pods import GROUP, VERSION
from cli.kube.rayjob import build_rayjob
from cli.kube.runs import MANAGED, PLURAL, create_run, describe
from trainer.plan import RunPlan
from trainer.text import clean

SWEEP_LABEL = "llmctl.dev/sweep"
CELL_LABEL = "llmctl.dev/sweep-cell"
STATES = ("queued", "running", "done", "failed")
# runs.describe's words -> a cell's state. "submitted": the operator has not taken it up yet; "starting" and
# "retrying" hold their quota (admitted); "stopped": the Ray job was stopped, so the cell did not finish.
_CELL_STATE = {"submitted": "queued", "queued": "queued", "starting": "running", "running": "running",
               "retrying": "running", "succeeded": "done", "stopped": "failed", "failed": "failed"}
# A sweep's grid is at most trainer/plan/sweep.py MAX_CELLS (400) cells; a list this long is not one sweep's.
MAX_RAYJOBS = 1000
PAGE = 250  # RayJobs per LIST page (each is ~15 KB: the plan rides in the entrypoint)
# A Kubernetes label value: at most 63 characters, alphanumeric at both ends, `-`, `_`, `.` inside.
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def label_value(value: str, what: str) -> str:
    """`value` when it can be a label value (and so a label selector's operand), else ValueError naming `what`."""
    if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"{what}: {clean(value, limit=80)!r} cannot be a Kubernetes label value (at most 63 of "
                         f"a-z, A-Z, 0-9, '-', '_', '.', alphanumeric at both ends)")
    return value


def selector(sweep: str) -> str:
    """The label selector of one sweep's RayJobs (only those llmctl made)."""
    return f"{MANAGED},{SWEEP_LABEL}={label_value(sweep, 'sweep')}"


def render_cells(sweep: str, cells: list[tuple[str, RunPlan]], cfg: ClusterConfig, *, namespace: str) -> list[dict]:
    """One RayJob per (cell id, plan), in the order given: `build_rayjob` with the sweep and cell labels and the
    sweep's Kueue priority class (when queued: `cfg.queue`; without a queue every cell starts at once).

    Raises ValueError for a sweep or cell id that cannot be a label value, a cell listed twice, two cells with one
    run name, or anything `build_rayjob` refuses."""
    label_value(sweep, "sweep")
    seen_cells, seen_names = set(), set()
    out = []
    for cell, p in cells:
        label_value(cell, "sweep cell")
        if cell in seen_cells:
            raise ValueError(f"sweep {sweep}: cell {cell} is listed twice")
        if p.name in seen_names:
            raise ValueError(f"sweep {sweep}: two cells share the run name {p.name}; a RayJob would be created once")
        seen_cells.add(cell)
        seen_names.add(p.name)
        cell_cfg = dataclasses.replace(cfg, labels={**cfg.labels, SWEEP_LABEL: sweep, CELL_LABEL: cell},
                                       kueue_priority_class=cfg.kueue_sweep_priority_class)
        out.append(build_rayjob(p, cell_cfg, namespace=namespace))
    return out


def _list(kube, namespace: str, sweep: str) -> list[dict]:
    """The sweep's RayJobs, paged, at most MAX_RAYJOBS (more is a CLIError: not one sweep's)."""
    items: list[dict] = []
    token = None
    while True:
        kw = {"_continue": token} if token else {}
        res = kube.call(kube.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                        label_selector=selector(sweep), limit=PAGE, what=f"list the RayJobs of sweep {sweep}",
                        verb="list", resource=PLURAL, group=GROUP, **kw) or {}
        page = res.get("items") or []
        items += [rj for rj in page if isinstance(rj, dict)]
        if len(items) > MAX_RAYJOBS:
            raise CLIError(f"namespace {namespace} holds more than {MAX_RAYJOBS} RayJobs labelled {SWEEP_LABEL}="
                           f"{sweep}; a sweep has at most a few hundred cells: check them with kubectl get rayjobs "
                           f"-n {namespace} -l {SWEEP_LABEL}={sweep}")
        token = (res.get("metadata") or {}).get("continue")
        if not token or not isinstance(token, str):
            return items


def _labels(rj: dict) -> dict:
    labels = (rj.get("metadata") or {}).get("labels")
    return labels if isinstance(labels, dict) else {}


def _name(rj: dict) -> str:
    return clean((rj.get("metadata") or {}).get("name") or "?", limit=63)


def _is_cell(rj: dict, want: dict) -> bool:
    """Whether the RayJob on the cluster is the cell `want` renders (same sweep and cell labels, llmctl's)."""
    have, labels = _labels(rj), want["metadata"]["labels"]
    return all(have.get(k) == labels[k] for k in (SWEEP_LABEL, CELL_LABEL, "app.kubernetes.io/managed-by"))


def submit_cells(kube, objs: list[dict]) -> list[str]:
    """Create the RayJobs in `objs` (render_cells' output, for `kube.namespace`) that the cluster does not hold yet;
    return the names created, in order. A RayJob already there as the same cell is skipped (a re-run resumes,
    never submits twice); one of that name that is not that cell is a CLIError before anything more is created.
    Each created run's head gets its PodDisruptionBudget, as `llmctl submit` gives it (cli/kube/guards.py)."""
    from cli.kube.guards import create_head_pdb

    for obj in objs:
        ns = obj["metadata"].get("namespace")
        if ns != kube.namespace:
            raise ValueError(f"RayJob {obj['metadata']['name']} is for namespace {ns}, the client for {kube.namespace}")
    existing: dict[str, dict] = {}
    for sweep in dict.fromkeys(o["metadata"]["labels"][SWEEP_LABEL] for o in objs):
        # one being deleted (a retried cell) is gone for this purpose: create_run waits for it, then creates
        existing.update({_name(rj): rj for rj in _list(kube, kube.namespace, sweep)
                         if not (rj.get("metadata") or {}).get("deletionTimestamp")})
    created, warnings = [], []
    for obj in objs:
        name = obj["metadata"]["name"]
        there = existing.get(name)
        if there is None:
            try:
                rj = create_run(kube, name, obj)
            except CLIError as refused:
                # a 409 from a concurrent run, or an answer lost after the write: the cluster decides
                there = _lookup(kube, kube.namespace, name)
                if there is not None:
                    rj = None
                else:  # taken when asked, free now: a retried cell's old RayJob let go in between; once more
                    try:
                        rj = create_run(kube, name, obj)
                    except CLIError:
                        raise refused from None
            if rj is not None:
                created.append(name)
                if "rayClusterSpec" in obj["spec"] and (w := create_head_pdb(kube, rj)):
                    warnings.append(w)
                continue
        if not _is_cell(there, obj):
            labels = obj["metadata"]["labels"]
            raise CLIError(f"RayJob {name} already exists in namespace {kube.namespace} but is not cell "
                           f"{labels[CELL_LABEL]} of sweep {labels[SWEEP_LABEL]}; delete it, or name the sweep "
                           f"differently" + (f" (created so far: {', '.join(created)})" if created else ""))
    if warnings:  # the same reason for every cell: say it once
        console.say(f"warning: {warnings[0]}" + (f" (and {len(warnings) - 1} more heads)" if len(warnings) > 1 else ""))
    return created


def _lookup(kube, namespace: str, name: str) -> dict | None:
    """The RayJob `name`, or None when the API server says there is none (404); other failures raise CLIError."""
    from kubernetes.client.rest import ApiException

    from cli.kube.client import api_error

    try:
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                        _request_timeout=(10, 60))
    except ApiException as e:
        if e.status == 404:
            return None
        raise api_error(e, what=f"get RayJob {name}", verb="get", resource=PLURAL, name=name, group=GROUP,
                        namespace=namespace) from None


def cell_state(rj: dict) -> str:
    """One RayJob's cell state: queued, running, done or failed."""
    spec, status = (rj.get(k) if isinstance(rj.get(k), dict) else {} for k in ("spec", "status"))
    state = _CELL_STATE.get(describe({"metadata": {"labels": _labels(rj)}, "spec": spec, "status": status})[0],
                            "running")  # a state a newer KubeRay added: in flight
    if spec.get("suspend") is True and state == "running":  # Kueue took its quota back (preempted): it waits again
        return "queued"
    return state


def cell_states(kube, namespace: str, sweep: str) -> dict[str, str]:
    """cell id -> queued / running / done / failed for the sweep's RayJobs in `namespace`, sorted by cell. RayJobs
    without a usable cell label are left out; two RayJobs claiming one cell give the one further along."""
    order = {s: i for i, s in enumerate(STATES)}
    out: dict[str, str] = {}
    for rj in _list(kube, namespace, sweep):
        cell = clean(_labels(rj).get(CELL_LABEL) or "", limit=63)
        if not _LABEL_VALUE.fullmatch(cell):
            continue
        state = cell_state(rj)
        if cell not in out or order[state] > order[out[cell]]:
            out[cell] = state
    return dict(sorted(out.items()))


def cancel_sweep(kube, namespace: str, sweep: str) -> list[str]:
    """Delete the sweep's RayJobs in `namespace` (by label, llmctl's only); return their names, sorted. One already
    gone is not an error. Their Ray clusters, pods and head PDBs go with them; checkpoints stay in storage."""
    return _delete(kube, namespace, sweep, _list(kube, namespace, sweep))


def delete_cells(kube, namespace: str, sweep: str, cells: set[str]) -> list[str]:
    """Delete the RayJobs of these cells of the sweep (failed ones, before they are submitted again: a cell's
    RayJob name is fixed, so a retry needs the old one gone; `create_run` waits while KubeRay lets go of it).
    Returns the names deleted, sorted; the run resumes from its last checkpoint in storage."""
    return _delete(kube, namespace, sweep, [rj for rj in _list(kube, namespace, sweep)
                                            if _labels(rj).get(CELL_LABEL) in cells])


def _delete(kube, namespace: str, sweep: str, rayjobs: list[dict]) -> list[str]:
    deleted = []
    for rj in rayjobs:
        name = _name(rj)
        try:
            kube.call(kube.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                      propagation_policy="Background", what=f"delete RayJob {name} of sweep {sweep}", verb="delete",
                      resource=PLURAL, name=name, group=GROUP)
        except CLIError as refused:
            if _lookup(kube, namespace, name) is not None:
                raise refused from None
            continue  # deleted meanwhile
        deleted.append(name)
    return sorted(deleted)

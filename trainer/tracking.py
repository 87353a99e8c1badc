"""Experiment tracking: a run's plan, metrics and report sent to MLflow and Weights & Biases (`--track`).

`llmctl submit --track mlflow=URI --track wandb=PROJECT` puts the targets in the RunSpec (trainer/plan/spec.py
`parse_track`), so every process of the run knows them:

- the driver (trainer/launch.py `run`) opens one tracker run per target before the stages (`open_runs`): created
  the first time, with the RunPlan as parameters (`plan_params`); resumed when `<run>/tracking.json` already
  names it (a retried RayJob, a resubmit), so one llmctl run is one tracker run. Each run's name and link go to
  `<run>/tracking.json` (`llmctl status` shows them, `read_tracking`). At the end (`close_runs`) plan.json, the
  report (md, html, json) and its curves are uploaded as artifacts and the runs ended.
- rank 0 of every stage sends what its metrics exporter measures (trainer/metrics.py `RunMetrics`, the one place
  a worker's numbers are made, hands them to a `Tracker`): each step `<stage>/loss`, `<stage>/tokens_per_second`
  (the run's: this rank's times the world size), `<stage>/mfu` and `<stage>/dollars` (the run's spend so far:
  `llmctl_cost_dollars` summed over ranks); each val pass `<stage>/val_bpb`; the eval stage's `eval/core`.
  Steps are the stage's optimizer steps (in the eval stage: models scored so far). Rows are buffered and sent in
  batches, at most every FLUSH_SECONDS and when the stage ends, so a step rarely waits on the network.

Tracking never stops training: every call into a tracker's client is guarded (`Backend.call`); the first failure
prints one warning line and turns that backend off for the rest of the process. A target the driver could not
open is not handed to the workers, so a tracker that is down costs the run one warning. MLflow's client retries
with back-off; its retries and timeout are bounded here (MLFLOW_ENV) unless the environment sets them.

Credentials come from the environment only (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD; WANDB_API_KEY), on a cluster from a Secret by reference (cli/kube/pods.py); a target
never holds one (RunSpec refuses it). The clients are imported on first use, only by runs that track: the
MLflow client (mlflow-skinny is enough) and wandb. Stdlib at import time: `llmctl status` reads tracking.json.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time

from trainer.plan.spec import TRACKERS, parse_track
from trainer.text import clean

TRACKING_FILE = "tracking.json"  # <run>/tracking.json: {"runs": [ref, ...]}
MAX_TRACKING_BYTES = 64 * 1024  # a ref is ~300 bytes and a run has at most MAX_TRACKS of them
MAX_FIELD = 512  # stored names, targets, ids and links (spec.py MAX_TRACK_CHARS)
REF_FIELDS = ("kind", "target", "run_id", "experiment_id", "name", "link")

EXPERIMENT = "llmctl"  # the MLflow experiment runs go to, unless MLFLOW_EXPERIMENT_NAME names another
WANDB_PROJECT = "llmctl"  # `--track wandb` without a project
# MLflow's batch limits (mlflow/utils/validation.py: MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH) and the
# param value length older servers accept (500; mlflow 3.17 takes 6,000): longer values are cut, marked with "…".
PARAMS_PER_BATCH, METRICS_PER_BATCH, MAX_PARAM_VALUE = 100, 1000, 500
MAX_PARAMS = 1000  # a plan flattens to ~120; the bound keeps a hostile or future plan from flooding the tracker
MAX_PARAM_KEY = 250  # mlflow MAX_ENTITY_KEY_LENGTH
# MLflow's HTTP client: default 7 retries with back-off factor 2 and a 120 s timeout, i.e. minutes per failed call.
# A tracker that is down should cost seconds once: 2 retries (about 1 s + 2 s of back-off), 20 s per request.
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
FLUSH_SECONDS = 10.0  # rank 0 sends buffered rows at most this often (and at the stage's end)
MAX_ROWS = 200  # or when this many steps wait: 5 metrics a row keeps a batch within MLflow's 1,000
ARTIFACTS = ("plan.json", "report.md", "report.html", "report.json", "loss.png", "bpb.png")  # trainer/plots.py CURVES
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024  # a report with its inlined curves is < 1 MB; plan.json ~10 KB
MAX_DETAIL = 200  # characters of a client's error in the warning (MLflow's name the whole request and its cause)


def warn(msg: str) -> None:
    """One warning line on stderr (the driver's console; a worker's log), printable and bounded."""
    print(f"llmctl tracking: WARNING: {clean(msg, limit=400)}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The backends: one small interface, each call guarded


class Backend:
    """One `--track` target. `create`/`resume` (the driver, start), `attach` + `metrics` + `detach` (rank 0 of a
    stage), `finish` (the driver, end); every one goes through `call`, which turns the backend off at the first
    failure with one warning."""

    kind = ""

    def __init__(self, target: str):
        self.target, self.on, self.ref = target, True, None

    def call(self, what: str, fn, *args, **kw):
        """fn(*args, **kw), or None once this backend has failed; a failure is warned about once, never raised."""
        if not self.on:
            return None
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - a tracker's failure is never the run's
            self.on = False
            detail = clean(str(e).strip().split("\n", 1)[0], limit=MAX_DETAIL)
            warn(f"{self.kind}: {what} failed; tracking to it is off for this process, training goes on "
                 f"({self.target}: {type(e).__name__}: {detail})")  # the words that matter first, the long ones last
            return None

    def create(self, plan, params: dict[str, str]) -> dict: ...
    def resume(self, plan_name: str, ref: dict) -> dict: ...
    def attach(self, plan_name: str, ref: dict) -> None: ...
    def metrics(self, stage: str, rows: list[tuple[int, dict[str, float]]]) -> None: ...
    def detach(self) -> None: ...
    def finish(self, plan_name: str, ref: dict, files: str, ok: bool) -> None: ...


class Mlflow(Backend):
    """An MLflow tracking server (or store) through `MlflowClient`: one MLflow run per llmctl run in the
    EXPERIMENT experiment; params and metrics by `log_batch` within MLflow's batch limits."""

    kind = "mlflow"

    def __init__(self, target: str):
        super().__init__(target)
        self._client = None

    def client(self):
        if self._client is None:
            for k, v in MLFLOW_ENV.items():
                os.environ.setdefault(k, v)  # read by mlflow at each request; the user's own setting wins
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.target)
        return self._client

    def link(self, experiment_id: str, run_id: str) -> str | None:
        """The run's page in the MLflow UI, where the target is a server."""
        if not self.target.startswith(("http://", "https://")):
            return None
        return f"{self.target.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def create(self, plan, params):
        c = self.client()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        exp = c.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(name)
        run = c.create_run(exp_id, run_name=plan.name, tags={"llmctl.run": plan.name, "llmctl.storage": plan.urls["run"]})
        self.ref = {"kind": self.kind, "target": self.target, "run_id": run.info.run_id, "experiment_id": exp_id,
                    "name": run.info.run_name, "link": self.link(exp_id, run.info.run_id)}
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            c.log_batch(self.ref["run_id"], params=items[i:i + PARAMS_PER_BATCH])
        return self.ref

    def resume(self, plan_name, ref):
        self.ref = ref
        self.client().update_run(ref["run_id"], status="RUNNING")  # params are kept from the first attempt
        return ref

    def attach(self, plan_name, ref):
        self.ref = ref

    def metrics(self, stage, rows):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(f"{stage}/{k}", v, now, step) for step, values in rows for k, v in values.items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client().log_batch(self.ref["run_id"], metrics=items[i:i + METRICS_PER_BATCH])

    def detach(self):
        pass

    def finish(self, plan_name, ref, files, ok):
        c = self.client()
        if os.listdir(files):
            c.log_artifacts(ref["run_id"], files)
        c.set_terminated(ref["run_id"], "FINISHED" if ok else "FAILED")


class Wandb(Backend):
    """A Weights & Biases project (`[ENTITY/]PROJECT`; `--track wandb`: $WANDB_PROJECT, else WANDB_PROJECT): one W&B run per llmctl run, its id kept
    in tracking.json, so each process resumes it (`resume="allow"`). Each stage's metrics have their own x axis
    (`<stage>/step`, `define_metric`), as the stages' steps restart at 1. Files are copied into the run's
    directory, which W&B uploads when the run finishes. WANDB_MODE=offline keeps everything in WANDB_DIR."""

    kind = "wandb"

    def __init__(self, target: str):
        super().__init__(target)
        self.run, self._stages = None, set()

    def _init(self, plan_name: str, run_id: str, config: dict | None = None):
        import wandb

        entity, _, project = self.target.rpartition("/")
        self.run = wandb.init(project=project, entity=entity or None, name=plan_name, id=run_id, resume="allow",
                              config=config, dir=os.environ.get("WANDB_DIR") or tempfile.gettempdir(),
                              settings=wandb.Settings(silent=True, console="off"))
        return self.run

    def create(self, plan, params):
        import wandb

        run = self._init(plan.name, wandb.util.generate_id(), config=params)
        self.ref = {"kind": self.kind, "target": self.target, "run_id": run.id, "name": run.name,
                    "link": run.url if not run.offline else None}
        self.detach()  # the stages' rank 0 resume it; one process writes to the run at a time
        return self.ref

    def resume(self, plan_name, ref):
        self.ref = ref
        return ref  # nothing to do until the end: each stage's rank 0 resumes the run by its id

    def attach(self, plan_name, ref):
        self.ref = ref
        self._init(plan_name, ref["run_id"])

    def metrics(self, stage, rows):
        if stage not in self._stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        for step, values in rows:
            self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in values.items()}})

    def detach(self):
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()

    def finish(self, plan_name, ref, files, ok):
        run = self._init(plan_name, ref["run_id"])
        for name in os.listdir(files):
            shutil.copy(os.path.join(files, name), run.dir)  # uploaded (offline: kept) when the run finishes
        self.run = None
        run.finish(exit_code=0 if ok else 1)


BACKENDS = {"mlflow": Mlflow, "wandb": Wandb}


def backend(kind: str, target: str) -> Backend:
    return BACKENDS[kind](target)


# ---------------------------------------------------------------------------------------------
# The plan as parameters


def plan_params(plan) -> dict[str, str]:
    """The RunPlan flattened to `section.key` -> text (lists of records by index: `stages.0.steps`; lists of
    values as JSON), each value cut to MAX_PARAM_VALUE characters and at most MAX_PARAMS of them."""
    import json

    out: dict[str, str] = {}

    def walk(value, key: str) -> None:
        if len(out) >= MAX_PARAMS:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            if len(text) > MAX_PARAM_VALUE:
                text = text[:MAX_PARAM_VALUE - 1] + "…"
            out[key[:MAX_PARAM_KEY]] = text

    walk(plan.to_dict(), "")
    return out


# ---------------------------------------------------------------------------------------------
# The driver: open, record, close


def open_runs(plan, storage_options: dict | None = None) -> list[dict]:
    """The driver, before the stages: one tracker run per `--track` target, created or resumed (see the module
    docstring); returns the refs of those that opened (what the workers get) and records them in tracking.json."""
    if not plan.spec.track:
        return []
    from trainer.storage import write_json

    stored = {(r["kind"], r["target"]): r for r in _stored(plan.urls["run"], storage_options)}
    params, refs = plan_params(plan), []
    for spec in plan.spec.track:
        kind, target = parse_track(spec)
        if kind == "wandb":
            target = target or os.environ.get("WANDB_PROJECT") or WANDB_PROJECT
        b = backend(kind, target)
        old = stored.get((kind, target))
        ref = (b.call("resuming its run", b.resume, plan.name, old) if old
               else b.call("creating the run", b.create, plan, params))
        if ref:
            refs.append(ref)
    if refs:
        try:
            write_json(f"{plan.urls['run']}/{TRACKING_FILE}", {"runs": refs}, storage_options)
        except Exception as e:  # noqa: BLE001 - `status` loses the link; the run and its tracking go on
            warn(f"could not record the tracking runs in {plan.urls['run']}/{TRACKING_FILE}: {e}")
    return refs


def close_runs(plan, refs: list[dict], storage_options: dict | None = None, *, ok: bool) -> None:
    """The driver, after the stages (or their failure, `ok=False`): plan.json, the report and the curves, as far
    as they exist, uploaded to each run, and the runs ended."""
    if not refs:
        return
    from trainer.storage import read_bytes

    with tempfile.TemporaryDirectory(prefix="llmctl-tracking-") as files:
        for name in ARTIFACTS:
            try:
                data = read_bytes(f"{plan.urls['run']}/{name}", MAX_ARTIFACT_BYTES, storage_options)
            except Exception as e:  # noqa: BLE001 - one missing artifact does not keep the others back
                warn(f"could not read {name} for upload: {e}")
                continue
            if data is not None:
                with open(os.path.join(files, name), "wb") as f:
                    f.write(data)
        for ref in refs:
            b = backend(ref["kind"], ref["target"])
            b.call("uploading the report and ending the run", b.finish, plan.name, ref, files, ok)


def _stored(run_url: str, storage_options: dict | None) -> list[dict]:
    try:
        return read_tracking(run_url, storage_options)
    except Exception as e:  # noqa: BLE001 - a damaged record starts new tracker runs, it does not stop this one
        warn(f"ignoring {run_url}/{TRACKING_FILE}: {e}")
        return []


def read_tracking(run_url: str, storage_options: dict | None = None) -> list[dict]:
    """The tracker runs recorded in `<run>/tracking.json` ([] when there are none), validated as untrusted: bounded
    size, known trackers and keys only, strings printable and bounded, links http(s) only. Raises ValueError/OSError
    when it cannot be read."""
    from trainer.storage import read_small_json

    doc = read_small_json(f"{run_url}/{TRACKING_FILE}", MAX_TRACKING_BYTES, storage_options)
    runs = doc.get("runs") if isinstance(doc, dict) else None
    out = []
    for r in runs if isinstance(runs, list) else []:
        if not isinstance(r, dict) or r.get("kind") not in TRACKERS:
            continue
        ref = {k: clean(r[k], limit=MAX_FIELD) for k in REF_FIELDS if isinstance(r.get(k), str)}
        if "run_id" not in ref or "target" not in ref:
            continue
        if not ref.get("link", "").startswith(("http://", "https://")):
            ref.pop("link", None)
        out.append(ref)
    return out


# ---------------------------------------------------------------------------------------------
# Rank 0 of a stage


class Tracker:
    """Rank 0's sender for one stage: `log(step, values)` buffers a row of finite numbers, sent to every open
    backend at most every `flush_seconds` (or MAX_ROWS rows) and on `close()`."""

    def __init__(self, plan_name: str, refs: list[dict], stage: str, *, flush_seconds: float = FLUSH_SECONDS,
                 clock=time.monotonic):
        self.stage, self.flush_seconds, self._clock = stage, flush_seconds, clock
        self.backends = []
        for ref in refs:
            b = backend(ref["kind"], ref["target"])
            b.call("attaching to its run", b.attach, plan_name, ref)
            self.backends.append(b)
        self.rows: list[tuple[int, dict[str, float]]] = []
        self._sent = clock()

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}  # NaN: the alert's job
        if row:
            self.rows.append((int(step), row))
        if len(self.rows) >= MAX_ROWS or self._clock() - self._sent >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        rows, self.rows, self._sent = self.rows, [], self._clock()
        if rows:
            for b in self.backends:
                b.call("sending metrics", b.metrics, self.stage, rows)

    def close(self) -> None:
        self.flush()
        for b in self.backends:
            b.call("closing its run", b.detach)

"""Live metrics of a training run: one Prometheus exporter per worker process, plus the same numbers as a dict.

The training loop builds one `RunMetrics` per worker and calls `on_step` after every optimizer step
(`on_val`, `on_checkpoint`, `on_core` when those happen). The exporter serves `/metrics` on
`METRICS_PORT_BASE + local_rank` (the pod declares ports 9400-9407 as `llm-m0`..`llm-m7`, and the chart's
PodMonitor scrapes them); `snapshot()` returns the same numbers as plain floats for `ray.train.report`, so
`llmctl status` can show them without Prometheus.

The metric names are a contract shared with the dashboards (charts/llmctl/dashboards/) and the alert rules
(charts/llmctl/files/alerts.yaml); see docs/observability.md. Labels are `run`, `stage` and
`rank` only (plus the fixed labels of `llmctl_run_info` and the fixed CORE `task` set), so the number of
series per worker is a constant: nothing that grows with steps, time or data becomes a label.

How each number is made (per rank, i.e. per GPU):
- tokens/s = tokens this rank processed in the step / the step's wall time (data wait included).
- MFU = FLOPs per token (from the plan) x tokens/s / the GPU's dense bf16 peak (nanochat's `bf16_mfu`,
  also under fp8). The peak comes from `torch.cuda.get_device_name()` matched by substring against the
  plan's GPU catalog, most specific first. On CPU or an unknown GPU, MFU is 0 and `llmctl_run_info`
  carries `mfu_reason="cpu"` or `"unknown_gpu"`: never a made-up peak.
- $ spent = (prior_seconds + seconds since this exporter started) / 3600 x the plan's price per GPU-hour:
  each rank reports its own GPU, so a run's spend is the sum over its ranks. It is read at scrape time, so
  it keeps rising while a run is stalled, as the bill does.
- attempts and lost seconds come from the run's spend ledger (`<run>/spend.json`, trainer/spend.py) and its
  restarts (`<run>/restarts.json`, trainer/restarts.py) when the worker starts: attempts of the run so far,
  this one included, a worker group that Ray Train restarted counting as one (restarts = attempts - 1), and
  the wall seconds earlier attempts and groups were paid for but whose work the checkpoint did not keep
  (start-up, redone steps, the last minutes of a killed attempt). Both are constant for the life of one worker.
- ETA = steps left in the stage x a debiased moving average of the step time (beta 0.9, as nanochat
  smooths its loss); before the first step, the plan's estimate for the stage.

Imports prometheus_client (a trainer dependency) but never torch: the CLI's `llmctl top` and tests can use
the names here without a GPU stack.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from trainer.plan.recipe import CORE_TASKS
from trainer.plan.catalog import GPUS
from trainer.plan.pricing import dollars
from trainer.plan import RunPlan
from trainer.plan.recipe import STAGES  # the plan's stages: pretrain, sft and the eval stage (CORE)

METRICS_PORT_BASE = 9400  # port = 9400 + local_rank; the pod declares 9400-9407 as llm-m0..llm-m7
LABELS = ("run", "stage", "rank")
INFO_LABELS = ("depth", "gpus", "gpu_type", "price_per_gpu_hour", "peak_gpu", "mfu_reason")
MFU_REASONS = ("ok", "cpu", "unknown_gpu")

# Step-time histogram buckets (seconds): 10 ms (tiny CPU runs) to ~2 min (a d32 step of 2^20 tokens on one
# H100 at 50% MFU is ~1.2e16 FLOPs / 4.9e14 FLOP/s = 25 s; with grad accumulation on a slow GPU, more).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
EMA_BETA = 0.9

# Every metric name the exporter can serve: the contract the dashboards and alerts are checked against.
# (`llmctl_cost_cap_dollars` exists only when the run has a budget cap; `llmctl_train_loss`, `llmctl_val_bpb`,
# `llmctl_checkpoint_seconds` and the CORE pair appear after their first event.)
METRIC_NAMES = (
    "llmctl_tokens_total", "llmctl_tokens_per_second", "llmctl_mfu_ratio", "llmctl_step",
    "llmctl_steps_total_planned", "llmctl_train_loss", "llmctl_val_bpb", "llmctl_step_seconds_bucket",
    "llmctl_step_seconds_sum", "llmctl_step_seconds_count", "llmctl_data_wait_seconds_total",
    "llmctl_checkpoint_seconds", "llmctl_cost_dollars", "llmctl_cost_estimated_dollars",
    "llmctl_cost_cap_dollars", "llmctl_eta_seconds", "llmctl_run_info", "llmctl_core_score",
    "llmctl_core_task_centered",
    # hang detection (trainer/watchdog.py): staleness, the watchdog's bound, the collective each rank reached
    "llmctl_last_step_timestamp_seconds", "llmctl_hang_bound_seconds", "llmctl_collective_step",
    # real spend (trainer/spend.py): GPU-seconds paid, attempts of the run, wall seconds restarts lost
    "llmctl_gpu_seconds", "llmctl_gpu_seconds_estimated", "llmctl_attempts", "llmctl_lost_seconds",
)

# torch.cuda.get_device_name() -> GPU catalog key, first match wins, so specific names come first
# (nanochat common.get_peak_flops does the same). None = a GPU we know but whose peak is not in the catalog:
# H100 NVL (835 TFLOP/s) and H200 NVL (836) would otherwise fall through to the SXM peak and show a
# wrong MFU. An SXM H100 reports "NVIDIA H100 80GB HBM3" (no "SXM" in the name); GH200 carries the same
# Hopper die at 989 TFLOP/s dense bf16 (NVIDIA's data sheets; docs/recipe.md, cost model).
DEVICE_PATTERNS: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("h100", "pcie"), "h100-pcie"),
    (("h100", "nvl"), None),
    (("h200", "nvl"), None),
    (("gh200",), "h200"),
    (("h200",), "h200"),
    (("h100",), "h100"),
    (("a100",), "a100"),
)


def device_peak(device_name: str | None) -> tuple[float, str, str]:
    """Dense bf16 peak FLOP/s of a device, the catalog key it matched, and the MFU reason label.

    `None` (CPU) -> (0.0, "none", "cpu"); a GPU the catalog lacks -> (0.0, "none", "unknown_gpu").
    """
    if device_name is None or device_name.strip().lower() in ("", "cpu"):
        return 0.0, "none", "cpu"
    name = device_name.lower()
    for parts, key in DEVICE_PATTERNS:
        if all(p in name for p in parts):
            if key is None:
                break
            return GPUS[key].peak_bf16, key, "ok"
    return 0.0, "none", "unknown_gpu"


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of one GPU: flops_per_token x tokens/s / peak; 0 when the peak is unknown."""
    if peak_flops <= 0:
        return 0.0
    return flops_per_token * tokens_per_second / peak_flops


class RunMetrics:
    """The exporter of one worker (one rank, one GPU). See the module docstring for what each number means.

    port: None -> no HTTP server (tests, CPU-only snapshots); 0 -> any free port (read `.port`); the loop
    passes `METRICS_PORT_BASE + local_rank`. If the port cannot be bound, training goes on without the
    server (a loud line on stderr; the "exporter down" alert and the missing series show it).
    prior_seconds: GPU-seconds this rank's slot was already paid for in this run (earlier attempts and
    earlier stages), so `llmctl_cost_dollars` is the run's spend. prior_tokens: tokens this rank already
    processed in this stage before a resume, so `llmctl_tokens_total` continues. attempts, lost_seconds: the
    spend ledger's attempts (this one included) and the wall seconds earlier attempts lost (see above).
    registry: a prometheus_client CollectorRegistry; None = a fresh one per instance, so several
    instances can live in one process (tests; one stage after another).
    addr, clock: bind address of the server, and the clock cost and ETA are measured with (tests).
    tracker: rank 0's `trainer.tracking.Tracker` when the run tracks to MLflow/W&B (`--track`): every step's loss,
    tokens/s and MFU, the run's dollars, each val bpb and CORE score go to it too; closed with the exporter.
    """

    def __init__(self, plan: RunPlan, stage: str, *, rank: int, local_rank: int, world_size: int,
                 device_name: str | None, port: int | None = None, registry=None,
                 prior_seconds: float = 0.0, prior_tokens: int = 0, attempts: int = 1, lost_seconds: float = 0.0,
                 addr: str = "0.0.0.0", clock: Callable[[], float] = time.monotonic, tracker=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        if stage not in STAGES:
            raise ValueError(f"stage: must be one of {', '.join(STAGES)}, got {stage!r}")
        if not (isinstance(world_size, int) and world_size >= 1):
            raise ValueError(f"world_size: must be a positive integer, got {world_size!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank!r}")
        if not (isinstance(local_rank, int) and 0 <= local_rank <= rank):
            raise ValueError(f"local_rank: must be in [0, rank={rank}], got {local_rank!r}")
        if not (prior_seconds >= 0 and math.isfinite(prior_seconds)):
            raise ValueError(f"prior_seconds: must be a finite number >= 0, got {prior_seconds!r}")
        if not (isinstance(prior_tokens, int) and prior_tokens >= 0):
            raise ValueError(f"prior_tokens: must be an integer >= 0, got {prior_tokens!r}")
        if not (isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 1):
            raise ValueError(f"attempts: must be an integer >= 1, got {attempts!r}")
        if not (lost_seconds >= 0 and math.isfinite(lost_seconds)):
            raise ValueError(f"lost_seconds: must be a finite number >= 0, got {lost_seconds!r}")

        self.plan, self.stage, self.rank, self.local_rank, self.world_size = plan, stage, rank, local_rank, world_size
        self.flops_per_token = plan.flops_per_token
        self.peak_flops, self.peak_gpu, self.mfu_reason = device_peak(device_name)
        self.price_per_gpu_hour = plan.estimate.price_per_gpu_hour
        self.steps_planned = next((s.steps for s in plan.stages if s.name == stage), 0)
        stage_plan = next((s for s in plan.stages if s.name == stage), None)
        self._clock = clock
        self._t0 = clock()
        self.tracker = tracker
        self._prior_seconds = float(prior_seconds)
        self._attempts, self._lost_seconds = attempts, float(lost_seconds)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.port: int | None = None
        self._server = None
        self._closed = False

        # Last values, for snapshot(): plain floats, the same numbers the gauges hold.
        self._step = 0
        self._tokens_total = prior_tokens
        self._tokens_per_second = 0.0
        self._mfu = 0.0
        self._loss = math.nan
        self._val_bpb: float | None = None
        self._step_seconds = math.nan
        self._ema = 0.0
        self._ema_steps = 0
        self._data_wait_total = 0.0
        self._checkpoint_seconds: float | None = None
        self._core_score: float | None = None
        # Before the first step the ETA is the plan's estimate for the stage (at the MFU prior).
        self._eta = stage_plan.hours * 3600 if stage_plan else 0.0

        labels = dict(run=plan.name, stage=stage, rank=str(rank))
        reg = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()):
            return Gauge(name, doc, LABELS + extra, registry=reg)

        self._g_tokens = Counter("llmctl_tokens", "Tokens this rank has trained on in this stage.", LABELS,
                                 registry=reg).labels(**labels)
        self._g_tps = gauge("llmctl_tokens_per_second", "This rank's tokens/s over its last step.").labels(**labels)
        self._g_mfu = gauge("llmctl_mfu_ratio", "Model FLOPs utilisation of this rank's GPU (0..1, dense bf16 "
                            "peak); 0 when the peak is unknown, see llmctl_run_info{mfu_reason}.").labels(**labels)
        self._g_step = gauge("llmctl_step", "Optimizer steps completed in this stage.").labels(**labels)
        self._g_planned = gauge("llmctl_steps_total_planned", "Optimizer steps the plan gives this stage.").labels(**labels)
        self._m_loss = gauge("llmctl_train_loss", "Training loss of this rank's last step.")
        self._m_val = gauge("llmctl_val_bpb", "Validation bits per byte at the last evaluation.")
        self._h_step = Histogram("llmctl_step_seconds", "Wall time of one optimizer step, data wait included.",
                                 LABELS, buckets=STEP_BUCKETS, registry=reg).labels(**labels)
        self._c_wait = Counter("llmctl_data_wait_seconds", "Seconds this rank waited for its next batch.",
                               LABELS, registry=reg).labels(**labels)
        self._m_ckpt = gauge("llmctl_checkpoint_seconds", "Seconds the last checkpoint save blocked training.")
        self._g_cost = gauge("llmctl_cost_dollars", "Dollars spent so far on this rank's GPU in this run "
                             "(elapsed GPU-hours x price); sum over ranks for the run.").labels(**labels)
        self._g_est = gauge("llmctl_cost_estimated_dollars", "The plan's estimate of the whole run's dollars "
                            "(all GPUs and stages; the same on every rank).").labels(**labels)
        self._g_eta = gauge("llmctl_eta_seconds", "Seconds until this stage's last planned step.").labels(**labels)
        self._m_core = gauge("llmctl_core_score", "DCLM CORE score (mean centered accuracy over 22 tasks).")
        self._m_core_task = gauge("llmctl_core_task_centered", "Centered accuracy of one CORE task.", ("task",))
        self._labels = labels
        self._g_last = gauge("llmctl_last_step_timestamp_seconds", "Unix time of this rank's last completed step "
                             "(the exporter's start before the first).").labels(**labels)
        self._g_last.set(time.time())
        self._m_bound = gauge("llmctl_hang_bound_seconds", "Seconds a step may run before the watchdog calls it "
                              "hung (max(floor, 10 x median step time)).")
        self._m_arrive = gauge("llmctl_collective_step", "The step whose first collective this rank last reached.")

        self._g_tokens.inc(prior_tokens)
        self._g_planned.set(self.steps_planned)
        self._g_est.set(plan.estimate.total_dollars)
        self._g_eta.set(self._eta)
        self._g_cost.set_function(self.cost_dollars)
        gauge("llmctl_gpu_seconds", "GPU-seconds paid for this rank's GPU in this run (the clock of "
              "llmctl_cost_dollars); sum over ranks for the run.").labels(**labels).set_function(self.elapsed_seconds)
        gauge("llmctl_gpu_seconds_estimated", "The plan's estimate of the whole run's GPU-seconds (all GPUs and "
              "stages; the same on every rank).").labels(**labels).set(plan.estimate.total_hours * 3600 * plan.spec.gpus)
        gauge("llmctl_attempts", "Attempts of this run so far, this one included (spend.json: RayJob retries, "
              "resubmits; restarts.json: worker group restarts); restarts = attempts - 1.") \
            .labels(**labels).set(attempts)
        gauge("llmctl_lost_seconds", "Wall seconds earlier attempts and worker groups were paid for whose work was "
              "not kept (start-up, redone steps; spend.json minus the resumed work, plus this attempt's "
              "restarts.json).").labels(**labels).set(lost_seconds)
        if plan.spec.budget_cap is not None:
            gauge("llmctl_cost_cap_dollars", "The run's budget cap in dollars (the run stops there).") \
                .labels(**labels).set(plan.spec.budget_cap)
        info = dict(depth=str(plan.spec.depth), gpus=str(plan.spec.gpus), gpu_type=plan.spec.gpu_type,
                    price_per_gpu_hour=f"{self.price_per_gpu_hour:g}", peak_gpu=self.peak_gpu,
                    mfu_reason=self.mfu_reason)
        gauge("llmctl_run_info", "What runs here: the plan's size, GPU type and price, and how MFU is measured "
              "(always 1).", INFO_LABELS).labels(**labels, **info).set(1)

        if port is not None:
            self._serve(addr, port)

    # -----------------------------------------------------------------------------------------
    # Events from the training loop

    def on_step(self, step: int, tokens: int, step_seconds: float, data_wait_seconds: float, loss: float) -> None:
        """After an optimizer step. step: steps completed in this stage, this one included (1 after the first
        step; a checkpoint's `step` is the same count, so a resumed run continues the series).

        tokens: tokens this rank processed in the step (all micro-batches); step_seconds: the step's wall
        time, data wait included; data_wait_seconds: the part of it spent waiting for batches; loss: this
        rank's training loss (NaN/inf are reported as they are: an alert watches for them).
        """
        if not (tokens >= 0 and step_seconds > 0 and data_wait_seconds >= 0):
            raise ValueError(f"on_step: need tokens >= 0, step_seconds > 0, data_wait_seconds >= 0; got "
                             f"tokens={tokens}, step_seconds={step_seconds}, data_wait_seconds={data_wait_seconds}")
        self._step = step
        self._tokens_total += tokens
        self._tokens_per_second = tokens / step_seconds
        self._mfu = mfu(self.flops_per_token, self._tokens_per_second, self.peak_flops)
        self._loss = float(loss)
        self._step_seconds = step_seconds
        self._data_wait_total += data_wait_seconds
        self._ema_steps += 1
        self._ema = EMA_BETA * self._ema + (1 - EMA_BETA) * step_seconds
        step_avg = self._ema / (1 - EMA_BETA ** self._ema_steps)
        self._eta = max(0, self.steps_planned - self._step) * step_avg

        self._g_step.set(self._step)
        self._g_tokens.inc(tokens)
        self._g_tps.set(self._tokens_per_second)
        self._g_mfu.set(self._mfu)
        self._m_loss.labels(**self._labels).set(self._loss)  # absent before the first step, never a fake NaN
        self._h_step.observe(step_seconds)
        self._c_wait.inc(data_wait_seconds)
        self._g_eta.set(self._eta)
        self._g_last.set(time.time())
        if self.tracker is not None:  # the run's figures: every rank runs the same tokens in the same step
            self.tracker.log(step, {"loss": self._loss, "tokens_per_second": self._tokens_per_second * self.world_size,
                                    "mfu": self._mfu, "dollars": self.cost_dollars() * self.world_size})

    def on_collective(self, step: int) -> None:
        """This rank reached the first collective of `step` (0-based: the step being run)."""
        self._m_arrive.labels(**self._labels).set(step)

    def on_hang_bound(self, seconds: float) -> None:
        """The watchdog's current bound on one step (trainer/watchdog.py)."""
        self._m_bound.labels(**self._labels).set(seconds)

    def on_val(self, bpb: float, step: int | None = None) -> None:
        """After a validation pass: bits per byte on the validation split; `step` for the tracker (default: the
        last step, the training loop's case; the eval stage passes the models scored so far)."""
        self._val_bpb = float(bpb)
        self._m_val.labels(**self._labels).set(self._val_bpb)
        if self.tracker is not None:
            self.tracker.log(self._step if step is None else step, {"val_bpb": self._val_bpb})

    def on_checkpoint(self, seconds: float) -> None:
        """After a checkpoint save: the seconds it blocked training on this rank."""
        if not seconds >= 0:
            raise ValueError(f"on_checkpoint: seconds must be >= 0, got {seconds!r}")
        self._checkpoint_seconds = float(seconds)
        self._m_ckpt.labels(**self._labels).set(self._checkpoint_seconds)

    def on_core(self, score: float, per_task: dict[str, float], step: int | None = None) -> None:
        """After a CORE evaluation: the score and each task's centered accuracy (tasks from CORE_TASKS); `step`
        as in `on_val`."""
        unknown = sorted(set(per_task) - set(CORE_TASKS))
        if unknown:
            raise ValueError(f"on_core: unknown CORE task(s) {', '.join(unknown)}; the task set is CORE_TASKS")
        self._core_score = float(score)
        self._m_core.labels(**self._labels).set(self._core_score)
        for task, value in per_task.items():
            self._m_core_task.labels(**self._labels, task=task).set(float(value))
        if self.tracker is not None:
            self.tracker.log(self._step if step is None else step, {"core": self._core_score})

    # -----------------------------------------------------------------------------------------
    # Reading

    def elapsed_seconds(self) -> float:
        return self._prior_seconds + max(0.0, self._clock() - self._t0)

    def cost_dollars(self) -> float:
        """This rank's GPU: elapsed hours x price per GPU-hour (read live, also at scrape time)."""
        return dollars(self.elapsed_seconds() / 3600, 1, self.price_per_gpu_hour)

    def snapshot(self) -> dict:
        """The exporter's numbers as plain floats (for ray.train.report and `llmctl status`).

        Keys without a value yet are left out: train_loss and step_seconds before the first step, val_bpb,
        checkpoint_seconds and core_score before their first event, cost_cap_dollars without a cap.
        """
        snap = {
            "step": float(self._step),
            "steps_planned": float(self.steps_planned),
            "progress": self._step / self.steps_planned if self.steps_planned else 0.0,
            "tokens_total": float(self._tokens_total),
            "tokens_per_second": self._tokens_per_second,
            "mfu": self._mfu,
            "data_wait_seconds_total": self._data_wait_total,
            "elapsed_seconds": self.elapsed_seconds(),
            "cost_dollars": self.cost_dollars(),
            "cost_estimated_dollars": self.plan.estimate.total_dollars,
            "eta_seconds": self._eta,
            "attempts": float(self._attempts),
            "lost_seconds": self._lost_seconds,
        }
        if self.plan.spec.budget_cap is not None:
            snap["cost_cap_dollars"] = float(self.plan.spec.budget_cap)
        if self._ema_steps:
            snap["train_loss"] = self._loss
            snap["step_seconds"] = self._step_seconds
        if self._val_bpb is not None:
            snap["val_bpb"] = self._val_bpb
        if self._checkpoint_seconds is not None:
            snap["checkpoint_seconds"] = self._checkpoint_seconds
        if self._core_score is not None:
            snap["core_score"] = self._core_score
        return snap

    @property
    def url(self) -> str | None:
        """The /metrics URL of this exporter on loopback, or None without a server."""
        return None if self.port is None else f"http://127.0.0.1:{self.port}/metrics"

    # -----------------------------------------------------------------------------------------
    # The HTTP server

    def _serve(self, addr: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            print(f"llmctl metrics: WARNING: cannot serve /metrics on {addr}:{port} ({e}); rank {self.rank} "
                  f"trains on without an exporter", file=sys.stderr, flush=True)
            return
        self.port = self._server.server_address[1]

    def close(self) -> None:
        """Stop the HTTP server (idempotent). Call it before a new RunMetrics takes the same port."""
        if self._closed:
            return
        self._closed = True
        if self.tracker is not None:
            self.tracker.close()  # the stage's last rows (guarded: never raises)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> RunMetrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

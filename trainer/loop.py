"""The per-worker training loop for both training stages (pretrain, SFT), run by Ray Train on every rank.

`train_loop(config)` reads as the story of a stage: set up (model, optimizer, resume, data, metrics), then
`run_steps` until the stage's step count, a budget stop or the end of SFT's epoch, then finish (keep the
last work, write the stage summary). One step (`_step`) fetches its micro-batches, agrees with the other
ranks on whether to go on, sets the scheduled hyperparameters, runs forward/backward with gradient
accumulation and lets the optimizer reduce and update the shards; then the loop logs, evaluates and
checkpoints on the plan's cadence. Schedules come from trainer/plan/runplan.py; nothing here invents a
hyperparameter. The config is `trainer.worker.StageConfig`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import ray.train
from trainer import checkpoint, preempt, restarts, spend
from trainer.progress import ProgressFile
from trainer.plan.batch import for_world
from trainer.plan import RunPlan, StagePlan
from trainer.plan.schedule import lr_multiplier, muon_momentum, muon_weight_decay
from trainer.worker import (Loader, StageConfig, ValPass, Worker, agree, from_rank0, make_loader, say,
                            stage_summary, start_metrics, worker_context, write_stage_summary)

STATUS_COMPLETED, STATUS_BUDGET, STATUS_NONFINITE = "completed", "budget_cap_reached", "non_finite_loss"
STATUS_PREEMPTED = "preempted"  # never final: the attempt raises preempt.Preempted after its checkpoint
LOSS_EMA_BETA = 0.9  # the console's smoothed train loss (nanochat base_train.py ema_beta)


@dataclass
class Stage:
    """Everything one worker holds while it trains a stage."""

    cfg: StageConfig
    plan: RunPlan
    stage: StagePlan
    w: Worker
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: object
    token_bytes: torch.Tensor
    loader: Loader
    metrics: object
    trace: object | None
    start_step: int
    loop: dict = field(default_factory=dict)  # checkpointed loop state: seconds, tokens, val bpb, loss EMA
    lost_seconds: float = 0.0  # paid by earlier attempts, not kept (spend.json minus the resumed work)
    planned: RunPlan | None = None  # the plan as written, for the world-size-independent val pass
    position: restarts.Position | None = None  # rank 0: its last step done, for the next group (trainer/restarts.py)

    @property
    def opts(self) -> dict:
        return self.cfg.storage_options


def train_loop(config: dict) -> None:
    st = set_up(StageConfig.from_dict(config))
    try:
        if st.start_step == 0:
            evaluate(st, 0)
        status, step, saved_at = run_steps(st)
        if status == STATUS_PREEMPTED:
            emergency_save(st, step, saved_at)  # raises preempt.Preempted: Ray Train resumes from it
        if status != STATUS_NONFINITE and saved_at != step:  # budget stop or SFT epoch end: keep the work
            save(st, step, sync=True, chaos={})
        if st.w.rank == 0:
            write_stage_summary(st.plan, summarize(st, step, status), st.opts)
    finally:
        if st.trace:
            st.trace.close()
        st.metrics.close()


# -------------------------------------------------------------------- setting up


def set_up(cfg: StageConfig) -> Stage:
    """Model and optimizer on this worker's device, resumed from Ray's checkpoint (or SFT's starting model),
    the tokenizer and the stage's loader (at the resumed position), and the metrics exporter."""
    from trainer.model import build_model
    from trainer.optim import build_optimizer
    from trainer.data.tokenizer import Tokenizer

    w = worker_context()
    planned = RunPlan.from_json(cfg.plan)
    if w.rank == 0:
        spend.record_world(planned.urls["run"], w.world, cfg.storage_options)  # the ledger prices this size
    plan = for_world(planned, w.world)  # elastic: same total batch, accumulation re-cut
    stage = plan.stage(cfg.stage)
    torch.manual_seed(plan.spec.seed)
    model = build_model(plan.arch, w.device, fp8=plan.spec.precision == "fp8")
    optimizer = build_optimizer(model, plan.optim, world_size=w.world, rank=w.rank)
    start_step, loop, loader_state = resume(cfg, stage.name, w, model, optimizer)
    tokenizer = Tokenizer.load(plan.urls["tokenizer"], storage_options=cfg.storage_options)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=w.device)
    loader = make_loader(plan, stage.name, tokenizer, w, state=loader_state, storage_options=cfg.storage_options)
    lost = max(0.0, cfg.earlier_attempts_seconds - cfg.prior_seconds - loop["seconds"])  # trainer/spend.py
    position = restarts.Position(planned.urls["run"], stage.name, attempt=cfg.attempts, world=w.world,
                                 started=time.time(), every=cfg.log_every, storage_options=cfg.storage_options) \
        if w.rank == 0 else None
    group_restarts, restart_lost = _note_restart(cfg, planned, stage.name, w, position, start_step, loop)
    lost += restart_lost
    metrics = start_metrics(plan, stage.name, w, cfg.metrics_port_base,
                            prior_seconds=cfg.prior_seconds + loop["seconds"] + lost,
                            prior_tokens=cfg.prior_tokens + loop["tokens"], attempts=cfg.attempts + group_restarts,
                            lost_seconds=lost, tracking=cfg.tracking)
    trace = open(cfg.trace, "a") if cfg.trace else None
    return Stage(cfg, plan, stage, w, model, optimizer, tokenizer, token_bytes, loader, metrics, trace, start_step,
                 loop, lost, planned, position)


def _note_restart(cfg: StageConfig, plan: RunPlan, stage: str, w: Worker, position, start_step: int,
                  loop: dict) -> tuple[int, float]:
    """Rank 0 records this group's start (a restart when an earlier group had begun the stage: trainer/restarts.py)
    and says so on the console (its log, and the local run's bars); every rank learns the run's worker group
    restarts and the seconds this attempt's restarts lost (llmctl_attempts, llmctl_lost_seconds, the budget)."""
    counted = [0.0, 0.0]
    if w.rank == 0:
        url = plan.urls["run"]
        try:
            event = restarts.on_group_start(position, url, stage, start_step=start_step, loop_seconds=loop["seconds"],
                                            storage_options=cfg.storage_options)
            events = restarts.read_restarts(url, cfg.storage_options)
        except Exception as e:  # noqa: BLE001 - the record is a courtesy; training goes on
            say(0, f"[{stage}] could not record this worker group's start in {url}: {e}")
            event, events = None, []
        group, lost = restarts.totals_for_worker(events, cfg.attempts)
        counted = [float(group), lost]
        if event is not None:
            line = restarts.headline(event, restarts.counts(cfg.attempts, events)["restarts"])
            say(0, line)
            ProgressFile(cfg.progress_file).write(stage=stage, restart=line)
    group, lost = from_rank0(w.device, *counted)
    return int(group), lost


def resume(cfg: StageConfig, stage: str, w: Worker, model, optimizer) -> tuple[int, dict, dict | None]:
    """(start step, loop state, loader state): from Ray Train's latest checkpoint of this stage if there is
    one; else a fresh start, from `cfg.init_model`'s weights when given (SFT starts from pretraining)."""
    loop = {"seconds": 0.0, "train_seconds": 0.0, "tokens": 0, "val_bpb": None, "val_history": [], "loss_ema": 0.0,
            "gpu_seconds": 0.0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta, loader_state = checkpoint.restore(d, model=model, optimizer=optimizer, rank=w.rank,
                                                    world_size=w.world)
        say(w.rank, f"[{stage}] resumed at step {meta.step} from {ckpt.path}")
        loop = dict(meta.loop_state)
        loop.setdefault("gpu_seconds", loop["seconds"] * meta.world_size)  # a checkpoint from before it was kept
        return meta.step, loop, loader_state
    if cfg.init_model:
        state, meta = checkpoint.load_model_state(cfg.init_model, storage_options=cfg.storage_options, device=w.device)
        getattr(model, "_orig_mod", model).load_state_dict(state)
        say(w.rank, f"[{stage}] starting from {meta.stage} step {meta.step}: {cfg.init_model}")
    return 0, loop, None


# -------------------------------------------------------------------- the steps


def run_steps(st: Stage) -> tuple[str, int, int]:
    """Train until the stage's last step or a stop; (status, steps done, step of the last checkpoint)."""
    wd = _watchdog(st)  # names the stuck rank and ends the attempt when a step hangs (trainer/watchdog.py)
    try:
        return _steps(st, wd)
    finally:
        wd.close()


def _watchdog(st: Stage):
    from trainer.watchdog import FLOOR_S, Watchdog

    floor = (st.cfg.chaos or {}).get("watchdog_floor_s", FLOOR_S)  # the hang test's short bound
    return Watchdog(rank=st.w.rank, world=st.w.world, hang_url=f"{st.plan.urls['run']}/{st.stage.name}/hangs",
                    storage_options=st.opts, floor=floor, metrics=st.metrics)


def _steps(st: Stage, wd) -> tuple[str, int, int]:
    stage, loop, chaos = st.stage, st.loop, st.cfg.chaos or {}
    if chaos.get("stage", stage.name) != stage.name:
        chaos = {}  # the fault is meant for another stage
    step = saved_at = st.start_step
    t_wall = time.perf_counter()
    preempt.install()  # SIGTERM sets a flag that _should_stop agrees on
    while step < stage.steps:
        wd.begin(step)
        _maybe_die(chaos, step, st.w.rank, during_save=False)
        t0 = time.perf_counter()
        batches, exhausted = _fetch(st.loader, stage.grad_accum)
        data_wait = time.perf_counter() - t0
        wd.arrive(step)  # next: the step's first collective
        stop = _should_stop(st, exhausted)
        if stop:
            return stop, step, saved_at
        if st.trace and batches:  # after the stop check: the trace lists the steps that were trained
            _trace(st.trace, step, st.w.rank, batches)
        loss = _step(st, step, batches)
        if chaos.get("nan_at_step") == step:
            loss = float("nan")  # fault tests: a diverged step
        if not math.isfinite(loss):
            st.metrics.on_step(step + 1, 0, time.perf_counter() - t0, data_wait, loss)  # the NaN alert sees it
            say(st.w.rank, f"[{stage.name}] loss is {loss} at step {step}: stopping (lower the LR or check data)")
            return STATUS_NONFINITE, step, saved_at
        dt = time.perf_counter() - t0
        wd.end(step, dt)
        step += 1
        tokens = st.plan.device_batch_size * st.plan.arch.seq_len * stage.grad_accum  # this rank's, this step
        now = time.perf_counter()
        loop["seconds"] += now - t_wall  # wall time, evals and checkpoints included: what is billed
        loop["gpu_seconds"] += (now - t_wall) * st.w.world  # at the size this group runs (elastic: trainer/spend.py)
        loop["train_seconds"] += dt
        t_wall = now
        loop["tokens"] += tokens * st.w.world
        loop["loss_ema"] = LOSS_EMA_BETA * loop["loss_ema"] + (1 - LOSS_EMA_BETA) * loss
        st.metrics.on_step(step, tokens, dt, data_wait, loss)
        if st.position is not None:
            st.position.write(step, loop["seconds"])  # what a restart would lose (trainer/restarts.py)

        last = step == stage.steps
        if step % st.cfg.log_every == 0 or last or step == st.start_step + 1:
            loop.setdefault("loss_history", []).append([step, _debiased_ema(loop["loss_ema"], step)])
            _log(st, step, loss, dt, tokens * st.w.world)
        if step % stage.eval_every == 0 or last:
            evaluate(st, step)
        if step % stage.checkpoint_every == 0 or last:
            save(st, step, sync=last or st.cfg.checkpoint_upload == "sync", chaos=chaos)
            saved_at = step
    return STATUS_COMPLETED, step, saved_at


def _should_stop(st: Stage, exhausted: bool) -> str | None:
    """Whether every rank stops before this step: SFT's epoch ran out on some rank (a normal end), or the
    whole run's spend reached the budget cap."""
    cap = st.plan.spec.budget_cap
    spent = spent_dollars(st, st.lost_seconds)
    epoch_done, over_budget, preempted = agree(st.w.device, exhausted, cap is not None and spent >= cap,
                                               preempt.pending())
    if preempted:
        return STATUS_PREEMPTED
    if epoch_done:
        return STATUS_COMPLETED
    if over_budget:
        say(st.w.rank, f"[{st.stage.name}] budget cap ${cap:.2f} reached (${spent:.2f} spent); stopping")
        return STATUS_BUDGET
    return None


def _step(st: Stage, step: int, batches) -> float:
    """One optimizer step over the micro-batches at the scheduled LR, momentum and weight decay; the mean
    loss over ranks."""
    stage = st.stage
    lrm = lr_multiplier(stage, step, st.loader.progress)
    for group in st.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if "momentum" in group:  # Muon groups
            group["momentum"] = muon_momentum(stage, step)
            group["weight_decay"] = muon_weight_decay(stage, step)
    loss_sum = torch.zeros((), device=st.w.device)
    for x, y in batches:
        loss = st.model(x, y) / stage.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    st.optimizer.step()
    st.model.zero_grad(set_to_none=True)
    if st.w.world > 1:
        dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
    return loss_sum.item() / st.w.world


def _fetch(loader: Loader, n: int):
    """The step's n micro-batches, or (partial, True) when the loader ran dry (SFT's single epoch)."""
    batches = []
    try:
        for _ in range(n):
            batches.append(next(loader))
    except StopIteration:
        return batches, True
    return batches, False


# -------------------------------------------------------------------- evaluating, saving, finishing


def evaluate(st: Stage, step: int) -> None:
    """Bits per byte on the stage's validation split, reduced over ranks (trainer/evaluate.py); the same
    tokens at any world size (trainer/worker.py `ValPass`)."""
    from trainer.evaluate import evaluate_bpb

    stage = st.stage
    val = ValPass(st.planned or st.plan, stage.name, st.tokenizer, st.w, storage_options=st.opts)
    st.model.eval()
    try:
        bpb = evaluate_bpb(st.model, val, val.steps, st.token_bytes)
    finally:
        st.model.train()
        val.close()  # stop its prefetch threads
    st.loop["val_bpb"] = bpb
    st.loop["val_history"].append([step, bpb])
    st.metrics.on_val(bpb)
    say(st.w.rank, f"[{stage.name}] step {step}: val bpb {bpb:.4f}")
    if st.w.rank == 0:
        ProgressFile(st.cfg.progress_file).write(stage=stage.name, step=step, steps=stage.steps, val_bpb=bpb)


def save(st: Stage, step: int, *, sync: bool, chaos: dict) -> None:
    """A checkpoint of every rank's shard, reported to Ray Train (which uploads it to the run's storage)."""
    t0 = time.perf_counter()
    name = st.stage.name
    path = tempfile.mkdtemp(prefix=f"llmctl-{name}-{step}-")
    checkpoint.save(path, model=st.model, optimizer=st.optimizer, loader_state=st.loader.state_dict(), rank=st.w.rank,
                    world_size=st.w.world, step=step, stage=name, run=st.plan.name, loop_state=st.loop)
    _maybe_die(chaos, step, st.w.rank, during_save=True)
    # ASYNC: the upload overlaps the next steps (ray PR #55637); the last save waits so the stage ends whole.
    mode = ray.train.CheckpointUploadMode.SYNC if sync else ray.train.CheckpointUploadMode.ASYNC
    ray.train.report({**st.metrics.snapshot(), "step": step}, checkpoint=ray.train.Checkpoint.from_directory(path),
                     checkpoint_dir_name=checkpoint.dir_name(name, step), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)  # SYNC would otherwise leave it in /tmp
    if chaos:  # fault tests: wait until Ray has registered this checkpoint, so "the last one" is certain
        ray.train.get_all_reported_checkpoints(timeout_s=120)
    st.metrics.on_checkpoint(time.perf_counter() - t0)
    if st.w.rank == 0:
        _write_progress(st, step)


def _write_progress(st: Stage, step: int) -> None:
    """`<run>/progress.json` in the run's storage (trainer/progress.py; read by `llmctl status`); never fatal."""
    from trainer.progress import write_progress

    try:
        rate = st.loop["seconds"] / max(step, 1)
        kept = st.cfg.prior_seconds + st.loop["seconds"]
        write_progress(st.plan.urls["run"], {
            "stage": st.stage.name, "step": step, "steps": st.stage.steps,
            "tokens": st.cfg.prior_tokens + st.loop["tokens"],
            "cost_dollars": spent_dollars(st, st.lost_seconds), "kept_seconds": kept,
            "eta_seconds": (st.stage.steps - step) * rate}, st.opts)
    except Exception as e:  # noqa: BLE001 - progress is a courtesy; training goes on
        say(0, f"[{st.stage.name}] could not write progress to {st.plan.urls['run']}: {e}")


def emergency_save(st: Stage, step: int, saved_at: int) -> None:
    """The preemption notice arrived: checkpoint the steps done (unless that step is saved), record the
    event at <run>/<stage>/preemptions/, tell the preStop hook, and end the attempt (trainer/preempt.py)."""
    from trainer.storage import write_json

    say(st.w.rank, f"[{st.stage.name}] preemption notice ({preempt.reason()}): checkpointing step {step}")
    if saved_at != step:
        save(st, step, sync=True, chaos={})
    if preempt.reason() != preempt.PEER:  # the rank(s) that got the notice name themselves
        write_json(f"{st.plan.urls['run']}/{st.stage.name}/preemptions/step{step:06d}_rank{st.w.rank}.json",
                   {"step": step, "rank": st.w.rank, "reason": preempt.reason(), "pod": os.environ.get("HOSTNAME"),
                    "time": time.time()}, st.opts)
    preempt.mark_done()
    raise preempt.Preempted(f"preempted at step {step}; checkpoint written, resuming from it")


def _dollars(plan: RunPlan, gpu_seconds: float) -> float:
    return gpu_seconds / 3600 * plan.estimate.price_per_gpu_hour


def spent_dollars(st: Stage, lost_seconds: float = 0.0) -> float:
    """The run's spend so far, as the budget cap and progress see it: this stage's GPU-seconds at the sizes it
    ran, plus earlier stages' and `lost_seconds` (earlier attempts' unkept time) at the planned size (an
    upper bound after a shrink; `<run>/spend.json` has the exact figure)."""
    planned = st.plan.spec.gpus * (st.cfg.prior_seconds + lost_seconds)
    return _dollars(st.plan, st.loop["gpu_seconds"] + planned)


def summarize(st: Stage, step: int, status: str) -> dict:
    loop = st.loop
    return stage_summary(st.plan, st.stage.name, status=status, steps=step, planned_steps=st.stage.steps,
                         tokens=loop["tokens"], seconds=loop["seconds"], train_seconds=loop["train_seconds"],
                         gpu_seconds=loop["gpu_seconds"], dollars=_dollars(st.plan, loop["gpu_seconds"]),
                         val_bpb=loop["val_bpb"], val_history=loop["val_history"], train_loss_ema=loop["loss_ema"],
                         loss_history=loop.get("loss_history", []),
                         **{k: v for k, v in st.metrics.snapshot().items()
                            if k in ("mfu", "tokens_per_second", "attempts", "lost_seconds")})


# -------------------------------------------------------------------- logging, tracing, chaos


def _log(st: Stage, step: int, loss: float, dt: float, tokens: int) -> None:
    if st.w.rank:
        return
    stage = st.stage
    tps = tokens / dt if dt > 0 else 0.0
    remaining = (stage.steps - step) * st.loop["seconds"] / max(step, 1)
    mfu = st.metrics.snapshot().get("mfu")
    say(0, f"[{stage.name}] step {step}/{stage.steps} ({step / stage.steps:.0%}) loss {loss:.4f} "
           f"dt {dt * 1e3:.0f}ms tok/s {tps:,.0f}" + (f" mfu {mfu:.1%}" if mfu else "")
           + f" eta {remaining / 60:.1f}m")
    ProgressFile(st.cfg.progress_file).write(
        stage=stage.name, step=step, steps=stage.steps, loss=_debiased_ema(st.loop["loss_ema"], step),
        tokens_per_second=tps, eta_seconds=remaining,
        dollars=spent_dollars(st))


def _debiased_ema(ema: float, step: int) -> float:
    """The loss EMA without its start-up bias towards 0 (nanochat base_train.py debiased_smooth_loss)."""
    return ema / (1 - LOSS_EMA_BETA ** step)


def _trace(f, step: int, rank: int, batches) -> None:
    h = hashlib.sha256()
    for x, _ in batches:
        h.update(x.cpu().numpy().tobytes())
    f.write(json.dumps({"step": step, "rank": rank, "fp": h.hexdigest()[:16], "t": time.time()}) + "\n")
    f.flush()


def _maybe_die(chaos: dict, step: int, rank: int, *, during_save: bool) -> None:
    """Fault injection for the fault tests: SIGKILL this worker once, at the given step, like a lost pod; or
    (hang_at_step) sleep hang_seconds there, like a rank that never reaches the step's collective."""
    if chaos and chaos.get("hang_at_step") == step and chaos.get("rank", 0) == rank and not during_save \
            and not os.path.exists(chaos["marker"]):
        open(chaos["marker"], "w").close()
        time.sleep(chaos["hang_seconds"])  # a rank stuck before the step's collective (the watchdog's case)
    if (chaos and chaos.get("kill_at_step") == step and chaos.get("rank", 0) == rank
            and bool(chaos.get("during_save")) == during_save and not os.path.exists(chaos["marker"])):
        open(chaos["marker"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)  # as a lost node or the OOM killer: no goodbye, no cleanup

"""The per-worker training loop for both stages (pretrain, SFT), run by Ray Train on every rank.

`train_loop(config)` reads as one story: context -> model -> optimizer -> resume -> data -> steps. Each step
fetches its micro-batches, agrees with the other ranks on whether to go on (non-finite loss, budget cap,
SFT data exhausted), runs forward/backward with gradient accumulation, lets the optimizer reduce and
update the shards, then logs, evaluates and checkpoints on the plan's cadence. Schedules come from
trainer/plan.py; nothing here invents a hyperparameter.

config keys: plan (RunPlan JSON), stage, storage_options, init_model (checkpoint URL to start SFT from),
metrics_port_base (None = no HTTP exporter), log_every, trace (a local JSONL path: per-step data
fingerprints and wall-clock stamps, for the exact-resume tests and bench/ray_overhead.py),
checkpoint_upload (async | sync), chaos (fault injection for the fault tests: kill_at_step, rank,
marker, during_save; nan_at_step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import ray.train
from trainer import checkpoint
from trainer.plan import RunPlan, lr_multiplier, muon_momentum, muon_weight_decay

STATUS_COMPLETED, STATUS_BUDGET, STATUS_NONFINITE = "completed", "budget_cap_reached", "non_finite_loss"


def worker_context() -> tuple[int, int, int, torch.device]:
    """(rank, world size, local rank, device) of this Ray Train worker; its GPU selected when there is one."""
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    return rank, world, local_rank, device


def train_loop(config: dict) -> None:
    # ---------------------------------------------------------------- context
    plan = RunPlan.from_json(config["plan"])
    stage = plan.stage(config["stage"])
    rank, world, local_rank, device = worker_context()
    torch.manual_seed(plan.spec.seed)
    opts = config.get("storage_options") or {}
    # Earlier stages' wall time and tokens: spend, the budget cap and the dashboards cover the whole run.
    prior_seconds, prior_tokens = config.get("prior_seconds", 0.0), config.get("prior_tokens", 0)
    log_every = config.get("log_every", 10)

    # ---------------------------------------------------------------- model and optimizer
    from trainer.model import build_model
    from trainer.optim import build_optimizer

    model = build_model(plan.arch, device, fp8=plan.spec.precision == "fp8")
    optimizer = build_optimizer(model, plan.optim, world_size=world, rank=rank)

    # ---------------------------------------------------------------- resume, or start
    start_step, loader_state = 0, None
    loop = {"seconds": 0.0, "train_seconds": 0.0, "tokens": 0, "val_bpb": None, "val_history": [], "loss_ema": 0.0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta, loader_state = checkpoint.restore(d, model=model, optimizer=optimizer, rank=rank,
                                                    world_size=world)
        start_step, loop = meta.step, dict(meta.loop_state)
        say(rank, f"[{stage.name}] resumed at step {start_step}/{stage.steps} from {ckpt.path}")
    elif config.get("init_model"):
        state, meta = checkpoint.load_model_state(config["init_model"], storage_options=opts, device=device)
        getattr(model, "_orig_mod", model).load_state_dict(state)
        say(rank, f"[{stage.name}] starting from {meta.stage} step {meta.step}: {config['init_model']}")

    # ---------------------------------------------------------------- data
    from trainer.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(plan.urls["tokenizer"], storage_options=opts)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    B, T = plan.device_batch_size, plan.arch.seq_len
    loader = _make_loader(plan, stage.name, tokenizer, B, T, rank, world, device, loader_state, opts)

    from trainer.metrics import RunMetrics

    port_base = config.get("metrics_port_base")
    metrics = RunMetrics(plan, stage.name, rank=rank, local_rank=local_rank, world_size=world,
                         device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                         port=None if port_base is None else port_base + local_rank,
                         prior_seconds=prior_seconds + loop["seconds"], prior_tokens=prior_tokens + loop["tokens"])
    trace = open(config["trace"], "a") if config.get("trace") else None
    chaos = config.get("chaos") or {}
    price = plan.estimate.price_per_gpu_hour * plan.spec.gpus / 3600  # dollars per second, whole run
    cap = plan.spec.budget_cap

    # ---------------------------------------------------------------- steps
    status, step, saved_at = STATUS_COMPLETED, start_step, start_step
    upload = config.get("checkpoint_upload", "async")
    if start_step == 0:
        _evaluate(model, plan, stage, tokenizer, token_bytes, rank, world, device, opts, loop, metrics, 0)
    t_wall = time.perf_counter()
    while step < stage.steps:
        _maybe_die(chaos, step, rank, during_save=False)
        t0 = time.perf_counter()
        batches, exhausted = _fetch(loader, stage.grad_accum)
        data_wait = time.perf_counter() - t0
        if trace and batches:
            _trace(trace, step, rank, batches)
        spent = (prior_seconds + loop["seconds"]) * price
        stop = _agree(device, exhausted, cap is not None and spent >= cap)
        if stop[0]:
            break  # SFT: one epoch done on some rank
        if stop[1]:
            status = STATUS_BUDGET
            say(rank, f"[{stage.name}] budget cap ${cap:.2f} reached (${spent:.2f} spent); stopping")
            break

        progress = getattr(loader, "progress", None)
        lrm = lr_multiplier(stage, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if "momentum" in group:  # Muon groups
                group["momentum"] = muon_momentum(stage, step)
                group["weight_decay"] = muon_weight_decay(stage, step)
        loss_sum = torch.zeros((), device=device)
        for x, y in batches:
            loss = model(x, y) / stage.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if chaos.get("nan_at_step") == step:
            loss_sum.fill_(float("nan"))  # fault tests: a diverged step
        if world > 1:
            dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
        loss_value = loss_sum.item() / world
        if not math.isfinite(loss_value):
            metrics.on_step(step + 1, 0, time.perf_counter() - t0, data_wait, loss_value)  # the NaN alert sees it
            status = STATUS_NONFINITE
            say(rank, f"[{stage.name}] loss is {loss_value} at step {step}: stopping (lower the LR or check data)")
            break
        dt = time.perf_counter() - t0
        step += 1
        tokens = B * T * stage.grad_accum  # this rank's tokens in the step
        now = time.perf_counter()
        loop["seconds"] += now - t_wall  # wall time, evals and checkpoints included: what is billed
        loop["train_seconds"] += dt
        t_wall = now
        loop["tokens"] += tokens * world
        loop["loss_ema"] = 0.9 * loop["loss_ema"] + 0.1 * loss_value
        metrics.on_step(step, tokens, dt, data_wait, loss_value)

        last = step == stage.steps
        if step % log_every == 0 or last or step == start_step + 1:
            _log(rank, stage, step, loop, loss_value, dt, tokens * world, metrics)
        if step % stage.eval_every == 0 or last:
            _evaluate(model, plan, stage, tokenizer, token_bytes, rank, world, device, opts, loop, metrics, step)
        if step % stage.checkpoint_every == 0 or last:
            _save(plan, stage.name, step, model, optimizer, loader, loop, rank, world, metrics, chaos,
                  sync=last or upload == "sync")
            saved_at = step

    if status != STATUS_NONFINITE and saved_at != step:  # budget stop or SFT epoch end: keep the work
        _save(plan, stage.name, step, model, optimizer, loader, loop, rank, world, metrics, {}, sync=True)
    if rank == 0:
        _write_summary(plan, stage.name, step, loop, status, metrics, opts)
    if trace:
        trace.close()
    metrics.close()


# -------------------------------------------------------------------- pieces of a step


def _make_loader(plan, stage, tokenizer, B, T, rank, world, device, state, opts, split="train"):
    if stage == "pretrain":
        from trainer.data import PretrainLoader

        return PretrainLoader(plan.urls["data"], tokenizer, batch_size=B, seq_len=T, rank=rank, world_size=world,
                              split=split, device=device, state=state, storage_options=opts)
    from trainer.chat import SFTLoader

    return SFTLoader(plan.urls["sft_data"], tokenizer, batch_size=B, seq_len=T, rank=rank, world_size=world,
                     device=device, state=state, split=split, storage_options=opts)


def _fetch(loader, n: int):
    """The step's n micro-batches, or (partial, True) when the loader ran dry (SFT's single epoch)."""
    batches = []
    try:
        for _ in range(n):
            batches.append(next(loader))
    except StopIteration:
        return batches, True
    return batches, False


def _agree(device, *flags: bool) -> list[bool]:
    """Every rank learns whether any rank raised each flag (one small all-reduce), so all stop together."""
    t = torch.tensor([float(f) for f in flags], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _evaluate(model, plan, stage, tokenizer, token_bytes, rank, world, device, opts, loop, metrics, step) -> None:
    """Bits per byte on the stage's validation split, reduced over ranks (trainer/evaluate.py)."""
    from trainer.evaluate import evaluate_bpb

    B, T = plan.device_batch_size, plan.arch.seq_len
    loader = _make_loader(plan, stage.name, tokenizer, B, T, rank, world, device, None, opts, split="val")
    model.eval()
    try:
        bpb = evaluate_bpb(model, loader, max(1, stage.eval_tokens // (B * T * world)), token_bytes)
    finally:
        model.train()
        getattr(loader, "close", lambda: None)()  # stop its prefetch threads
    loop["val_bpb"] = bpb
    loop["val_history"].append([step, bpb])
    metrics.on_val(bpb)
    say(rank, f"[{stage.name}] step {step}: val bpb {bpb:.4f}")


def _save(plan, stage, step, model, optimizer, loader, loop, rank, world, metrics, chaos, *, sync: bool) -> None:
    t0 = time.perf_counter()
    path = tempfile.mkdtemp(prefix=f"llmctl-{stage}-{step}-")
    checkpoint.save(path, model=model, optimizer=optimizer, loader_state=loader.state_dict(), rank=rank,
                    world_size=world, step=step, stage=stage, run=plan.name, loop_state=loop)
    _maybe_die(chaos, step, rank, during_save=True)
    # ASYNC: the upload overlaps the next steps (ray PR #55637); the last save waits so the stage ends whole.
    mode = ray.train.CheckpointUploadMode.SYNC if sync else ray.train.CheckpointUploadMode.ASYNC
    ray.train.report({**metrics.snapshot(), "step": step}, checkpoint=ray.train.Checkpoint.from_directory(path),
                     checkpoint_dir_name=checkpoint.dir_name(stage, step), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)  # SYNC would otherwise leave it in /tmp
    if chaos:  # fault tests: wait until Ray has registered this checkpoint, so "the last one" is certain
        ray.train.get_all_reported_checkpoints(timeout_s=120)
    metrics.on_checkpoint(time.perf_counter() - t0)
    if rank == 0 and os.environ.get("LLMCTL_RUN"):
        _report_progress(plan, stage, step, loop)


def _report_progress(plan, stage, step, loop) -> None:
    """In a cluster, write progress onto the RayJob (annotation read by `llmctl status`); never fatal."""
    try:
        from cli.cluster import report_progress

        s = plan.stage(stage)
        rate = loop["seconds"] / max(step, 1)
        report_progress({"stage": stage, "step": step, "steps": s.steps, "tokens": loop["tokens"],
                         "cost_dollars": loop["seconds"] / 3600 * plan.spec.gpus * plan.estimate.price_per_gpu_hour,
                         "eta_seconds": (s.steps - step) * rate})
    except Exception as e:  # noqa: BLE001 - progress is a courtesy; training goes on
        say(0, f"[{stage}] could not report progress to the RayJob: {e}")


def _write_summary(plan, stage, step, loop, status, metrics, opts) -> None:
    import fsspec

    summary = {"stage": stage, "status": status, "steps": step, "planned_steps": plan.stage(stage).steps,
               "tokens": loop["tokens"], "seconds": loop["seconds"], "train_seconds": loop["train_seconds"],
               "val_bpb": loop["val_bpb"], "val_history": loop["val_history"],
               "train_loss_ema": loop["loss_ema"],
               "dollars": loop["seconds"] / 3600 * plan.spec.gpus * plan.estimate.price_per_gpu_hour,
               **{k: v for k, v in metrics.snapshot().items() if k in ("mfu", "tokens_per_second")}}
    with fsspec.open(f"{plan.urls['run']}/{stage}/summary.json", "w", **opts) as f:
        f.write(json.dumps(summary, indent=2))


# -------------------------------------------------------------------- logging, tracing, chaos


def say(rank: int, msg: str) -> None:
    """A progress line from rank 0. Written to stdout directly: Ray Train patches `print` into its logger,
    which would show every line twice on the driver (stdout and the logger's stderr)."""
    if rank == 0:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def _log(rank, stage, step, loop, loss, dt, tokens, metrics) -> None:
    if rank:
        return
    snap = metrics.snapshot()
    tps = tokens / dt if dt > 0 else 0.0
    remaining = (stage.steps - step) * loop["seconds"] / max(step, 1)
    mfu = snap.get("mfu")
    say(rank, f"[{stage.name}] step {step}/{stage.steps} ({step / stage.steps:.0%}) loss {loss:.4f} "
               f"dt {dt * 1e3:.0f}ms tok/s {tps:,.0f}" + (f" mfu {mfu:.1%}" if mfu else "")
               + f" eta {remaining / 60:.1f}m")


def _trace(f, step: int, rank: int, batches) -> None:
    h = hashlib.sha256()
    for x, _ in batches:
        h.update(x.cpu().numpy().tobytes())
    f.write(json.dumps({"step": step, "rank": rank, "fp": h.hexdigest()[:16], "t": time.time()}) + "\n")
    f.flush()


def _maybe_die(chaos: dict, step: int, rank: int, *, during_save: bool) -> None:
    """Fault injection for the fault tests: exit this worker once, at the given step, like a lost pod."""
    if (chaos and chaos.get("kill_at_step") == step and chaos.get("rank", 0) == rank
            and bool(chaos.get("during_save")) == during_save and not os.path.exists(chaos["marker"])):
        open(chaos["marker"], "w").close()
        os._exit(1)

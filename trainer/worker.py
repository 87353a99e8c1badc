"""What every Ray Train worker does the same way, whether it trains (trainer/loop.py) or evaluates
(trainer/eval_stage.py): find its rank and device, print from rank 0, build the stage's data loader, start
its metrics exporter, agree with the other ranks, and write the stage's summary.json.

`Loader` is the small protocol both loaders meet (trainer/data/pretrain.py `PretrainLoader`, trainer/data/sft.py
`SFTLoader`): batches by `next()`, a resumable `state_dict()`, `close()`, and `progress`, the share of an
epoch consumed (SFT's LR schedule follows it; None where the schedule goes by step).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator, NamedTuple, Protocol

import torch
import torch.distributed as dist

from trainer.plan import RunPlan
from trainer.storage import write_json


class Loader(Protocol):
    """What the training loop and the val passes need from a data loader."""

    progress: float | None  # share of the epoch consumed (0..1), or None: the schedule goes by step

    def __iter__(self) -> Iterator: ...

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def close(self) -> None: ...


class Worker(NamedTuple):
    rank: int
    world: int
    local_rank: int
    device: torch.device


def worker_context() -> Worker:
    """(rank, world size, local rank, device) of this Ray Train worker; its GPU selected when there is one, on
    CPU the allocator set to keep freed memory (trainer/allocator.py)."""
    import ray.train

    from trainer.allocator import keep_freed_memory

    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    else:
        keep_freed_memory()
    return Worker(rank, world, local_rank, device)


def say(rank: int, msg: str) -> None:
    """A progress line from rank 0. Written to stdout directly: Ray Train patches `print` into its logger,
    which would show every line twice on the driver (stdout and the logger's stderr)."""
    if rank == 0:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def make_loader(plan: RunPlan, stage: str, tokenizer, w: Worker, *, split: str = "train", state: dict | None = None,
                storage_options: dict | None = None) -> Loader:
    """The stage's loader on this rank: pretraining shards or SFT conversations, `split` train or val."""
    B, T = plan.device_batch_size, plan.arch.seq_len
    common = dict(batch_size=B, seq_len=T, rank=w.rank, world_size=w.world, split=split, device=w.device,
                  state=state, storage_options=storage_options)
    if stage == "pretrain":
        from trainer.data.pretrain import PretrainLoader

        return PretrainLoader(plan.urls["data"], tokenizer, **common)
    from trainer.data.sft import SFTLoader

    return SFTLoader(plan.urls["sft_data"], tokenizer, **common)


class ValPass:
    """A stage's val bpb pass on this rank: the same tokens whatever the world size, so a run that shrank or
    grew (trainer/reshard.py) reports a val bpb comparable with its own history.

    The tokens are those the planned world size V = `plan.spec.gpus` reads: V streams, stream v being the val
    loader of rank v of V, each contributing `per_stream` batches of the planned device batch. Rank r of W
    scores streams r, r+W, ... (all V of them between the ranks, whatever W), and the sums are all-reduced
    (trainer/evaluate.py), so the figure depends on the weights alone. At W = V each rank scores its own
    stream, as before. `plan` is the plan as written (not `reshard.for_world`'s): its device batch is V's.
    Iterating yields this rank's `steps` batches; `close()` (or exhausting it) stops the open loader."""

    def __init__(self, plan: RunPlan, stage: str, tokenizer, w: Worker, *, storage_options: dict | None = None):
        self.plan, self.stage, self.tokenizer, self.w, self.opts = plan, stage, tokenizer, w, storage_options
        V, B, T = plan.spec.gpus, plan.device_batch_size, plan.arch.seq_len
        self.streams = range(w.rank, V, w.world)
        self.per_stream = max(1, plan.stage(stage).eval_tokens // (B * T * V))
        self.steps = self.per_stream * len(self.streams)  # this rank's batches
        self.tokens = self.per_stream * B * T * V  # every rank's together
        self._open: Loader | None = None

    def __iter__(self) -> Iterator:
        V = self.plan.spec.gpus
        try:
            for v in self.streams:
                stream = Worker(v, V, self.w.local_rank, self.w.device)
                self._open = make_loader(self.plan, self.stage, self.tokenizer, stream, split="val",
                                         storage_options=self.opts)
                for _, batch in zip(range(self.per_stream), self._open):
                    yield batch
                self._open.close()
        finally:
            self.close()

    def close(self) -> None:
        if self._open is not None:
            self._open.close()  # stop the pretraining loader's read-ahead
            self._open = None


def start_metrics(plan: RunPlan, stage: str, w: Worker, port_base: int | None, *, prior_seconds: float = 0.0,
                  prior_tokens: int = 0, attempts: int = 1, lost_seconds: float = 0.0, tracking: list | None = None):
    """This worker's metrics (trainer/metrics.py), served on `port_base + local rank` unless port_base is None;
    on rank 0 also sent to the run's experiment trackers (`tracking`: the driver's refs, trainer/tracking.py)."""
    from trainer.metrics import RunMetrics

    tracker = None
    if tracking and w.rank == 0:
        from trainer.tracking import Tracker

        tracker = Tracker(plan.name, tracking, stage)

    return RunMetrics(plan, stage, rank=w.rank, local_rank=w.local_rank, world_size=w.world,
                      device_name=torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else None,
                      port=None if port_base is None else port_base + w.local_rank,
                      prior_seconds=prior_seconds, prior_tokens=prior_tokens, attempts=attempts,
                      lost_seconds=lost_seconds, tracker=tracker)


def agree(device: torch.device, *flags: bool) -> list[bool]:
    """Every rank learns whether any rank raised each flag (one small all-reduce), so all stop together."""
    t = torch.tensor([float(f) for f in flags], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def from_rank0(device: torch.device, *values: float) -> list[float]:
    """Rank 0's `values` on every rank (one small all-reduce: the other ranks add zeros)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() != 0:
            t.zero_()
        dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def stage_summary(plan: RunPlan, stage: str, *, status: str, steps: int, planned_steps: int, tokens: int,
                  seconds: float, **extra) -> dict:
    """`<run>/<stage>/summary.json`: what the stage did and what it cost; read by trainer/launch.py (skip a
    finished stage, sum the run) and trainer/report.py. `extra`: the stage's own figures (val bpb, ...), and
    `dollars` when it did not run on the planned GPUs throughout (trainer/loop.py prices its GPU-seconds)."""
    return {"stage": stage, "status": status, "steps": steps, "planned_steps": planned_steps, "tokens": tokens,
            "seconds": seconds, "dollars": plan.cost_of(seconds), **extra}


def write_stage_summary(plan: RunPlan, summary: dict, storage_options: dict | None) -> None:
    write_json(f"{plan.urls['run']}/{summary['stage']}/summary.json", summary, storage_options)


@dataclass(frozen=True)
class StageConfig:
    """What trainer/launch.py hands each worker of a stage (Ray Train's `train_loop_config`, as a dict: `to_dict`).

    plan: the RunPlan as JSON; stage: its name; storage_options: fsspec options for the run's storage;
    metrics_port_base: exporter port of local rank 0 (None: no HTTP exporter); log_every: steps between
    progress lines; checkpoint_upload: "async" (the upload overlaps the next steps) or "sync";
    init_model: checkpoint URL SFT starts from; prior_seconds / prior_tokens: earlier stages' wall time and
    tokens, so spend, the budget cap and the dashboards cover the whole run; earlier_attempts_seconds: wall
    seconds paid for by earlier attempts of the run (trainer/spend.py), so spend and the cap also count the
    time restarts lost; attempts: the ledger's attempts so far, this one included (exported as
    `llmctl_attempts`); trace: a local JSONL path for
    per-step data fingerprints and wall-clock stamps (the exact-resume tests, bench/ray_overhead.py); chaos:
    fault injection for the fault tests (kill_at_step, rank, marker, during_save; nan_at_step; hang_at_step,
    hang_seconds, watchdog_floor_s: a rank that stalls and the watchdog's short bound; stage: only that stage);
    progress_file: a local JSONL path rank 0 appends progress to (trainer/progress.py; the local run's bars);
    tracking: the experiment-tracker runs the driver opened (trainer/tracking.py refs), which rank 0 logs to.
    """

    plan: str
    stage: str
    storage_options: dict = field(default_factory=dict)
    metrics_port_base: int | None = None
    log_every: int = 10
    checkpoint_upload: str = "async"
    init_model: str | None = None
    prior_seconds: float = 0.0
    prior_tokens: int = 0
    earlier_attempts_seconds: float = 0.0
    attempts: int = 1
    trace: str | None = None
    chaos: dict | None = None
    progress_file: str | None = None
    tracking: list | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_upload not in ("async", "sync"):
            raise ValueError(f"checkpoint_upload: must be async or sync, got {self.checkpoint_upload!r}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every: must be a positive integer, got {self.log_every!r}")
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts: must be an integer >= 1, got {self.attempts!r}")
        if self.earlier_attempts_seconds < 0:
            raise ValueError(f"earlier_attempts_seconds: must be >= 0, got {self.earlier_attempts_seconds}")
        if self.prior_seconds < 0 or self.prior_tokens < 0:
            raise ValueError(f"prior_seconds, prior_tokens: must be >= 0, got {self.prior_seconds}, {self.prior_tokens}")

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"stage config: unknown key(s) {', '.join(unknown)}")
        return cls(**{**d, "storage_options": d.get("storage_options") or {}})

    def to_dict(self) -> dict:
        return asdict(self)

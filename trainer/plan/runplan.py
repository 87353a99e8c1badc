"""The plan: from one dial (`--depth`) to every number a run needs, with its price.

`plan(RunSpec) -> RunPlan` assembles the run from the planner's parts: the model shape (shape.py), the batch
(batch.py), learning rates and schedules (schedule.py), the GPU catalog and MFU prior (catalog.py), hours and
dollars (pricing.py), the interconnect (interconnect.py) and memory (memory.py) models. The trainer runs
exactly this plan, the RayJob is rendered from it, the dashboards compare it with reality; the JSON form is the
contract, so every number the CLI shows is in it. Stdlib only: the CLI imports it.

Every rule reproduces nanochat's recipe (karpathy/nanochat, `scripts/base_train.py`, `nanochat/gpt.py`;
docs/recipe.md). Cross-check (tests/plan/test_runplan.py): d24 at ratio 8 is 5,568 steps of 2^20 tokens.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from trainer.plan import interconnect, memory
from trainer.plan.batch import auto_batch_size, split
from trainer.plan.catalog import FP8_GPUS, FP8_MIN_USEFUL_DEPTH, GPU, GPUS, fp8_speedup, mfu_prior, sft_step_cost
from trainer.plan.pricing import checkpoint_bytes, core_tokens, dollars, overhead_hours
from trainer.plan.recipe import (CHECKPOINT_MINUTES, EVAL_EVERY, EVAL_TOKENS, FINAL_LR_FRAC, MUON_MOMENTUM,
                                 MUON_MOMENTUM_WARMUP_STEPS, REFERENCE_DEPTH, SFT_FINAL_LR_FRAC, SFT_INIT_LR_FRAC,
                                 SFT_MOMENTUM, SFT_MOMENTUM_WARMUP_STEPS, SFT_WARMDOWN_RATIO, WARMDOWN_RATIO,
                                 WARMUP_STEPS)
from trainer.plan.schedule import Optimization, optimization
from trainer.plan.shape import Architecture, ParamCounts, architecture, flops_per_token, model_dim, param_counts
from trainer.plan.spec import OMITTED_UNSET, PlanError, RunSpec

SCHEMA = "llmctl.runplan/v1"


# ---------------------------------------------------------------------------------------------
# What follows from the spec


@dataclass(frozen=True)
class StagePlan:
    name: str
    steps: int
    tokens: int
    flops: float
    grad_accum: int
    device_batch_size: int
    total_batch_size: int
    lr_frac: float  # initial LR multiplier on the stage's base LRs
    warmup_steps: int
    warmdown_steps: int
    final_lr_frac: float
    momentum: tuple[float, ...]
    momentum_warmup_steps: int
    weight_decay: float
    eval_every: int  # steps between val bpb passes (and at the last step)
    eval_tokens: int  # tokens per val bpb pass, across all ranks
    checkpoint_every: int  # steps between checkpoints (and at the last step)
    hours: float  # training time at the MFU prior
    dollars: float


@dataclass(frozen=True)
class Estimate:
    mfu: float
    mfu_source: str
    peak_flops_per_gpu: float
    tokens_per_second: float  # whole run, all GPUs, at the prior
    train_hours: float
    overhead_hours: dict[str, float]
    total_hours: float
    price_per_gpu_hour: float
    price_source: str
    train_dollars: float
    overhead_dollars: float
    total_dollars: float
    within_budget: bool | None  # None when no cap was set
    sft_cost_per_token: float = 1.0  # an SFT token's time / a pretraining token's (catalog.sft_step_cost)
    sft_cost_source: str = ""


@dataclass(frozen=True)
class RunPlan:
    schema: str
    spec: RunSpec
    name: str
    arch: Architecture
    params: ParamCounts
    flops_per_token: float
    target_tokens: int
    total_batch_size: int
    device_batch_size: int
    grad_accum: int
    optim: Optimization
    stages: tuple[StagePlan, ...]
    total_flops: float
    estimate: Estimate
    warnings: tuple[str, ...] = field(default_factory=tuple)
    urls: dict[str, str] = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # trainer/plan/memory.py MemoryEstimate.to_dict() at the device batch
    interconnect: dict = field(default_factory=dict)  # trainer/plan/interconnect.py breakdown(): a step's parts

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"plan {self.name} has no stage {name!r}; it has {[s.name for s in self.stages]}")

    def cost_of(self, seconds: float) -> float:
        """Dollars for `seconds` of this run's wall time: all its GPUs at its price (trainer/plan/pricing.py)."""
        return dollars(seconds / 3600, self.spec.gpus, self.estimate.price_per_gpu_hour)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)  # strict JSON (RunSpec keeps it finite)

    @classmethod
    def from_dict(cls, d: dict) -> RunPlan:
        """Rebuild a plan by re-planning its spec; refuses a stored plan the code would plan differently."""
        if (d.get("schema") if isinstance(d, dict) else None) != SCHEMA:
            raise PlanError(f"schema: expected {SCHEMA}, got {d.get('schema') if isinstance(d, dict) else d!r:.80}")
        p = plan(RunSpec.from_dict(d.get("spec")))
        fresh = json.loads(p.to_json())
        if fresh != json.loads(json.dumps(d)):
            diff = sorted(k for k in fresh if fresh.get(k) != d.get(k))
            raise PlanError(f"plan: stored plan differs from this version's math in {', '.join(diff)}")
        return p

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d)


# ---------------------------------------------------------------------------------------------
# The assembly


def _run_name(spec: RunSpec) -> str:
    if spec.name:
        return spec.name
    d = spec.to_dict()
    for k in ("name", "namespace", "image", "queue", "price_per_gpu_hour", "budget_cap", *OMITTED_UNSET):
        d.pop(k, None)  # do not change what is trained
    import hashlib  # here: ~8 ms the CLI's start-up need not pay

    digest = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
    return f"gpt-d{spec.depth}-{spec.gpus}x{spec.gpu_type}-{digest}"


def _stage(name: str, spec: RunSpec, steps: int, batch: int, dbs: int, accum: int, fpt: float,
           throughput: float, price: float, lr_frac: float, weight_decay: float) -> StagePlan:
    tokens = steps * batch
    hours = tokens / throughput / 3600
    step_seconds = batch / throughput
    ckpt_every = spec.checkpoint_every or max(1, min(steps, round(CHECKPOINT_MINUTES * 60 / step_seconds)))
    cadence = dict(eval_every=spec.eval_every or min(EVAL_EVERY, steps),
                   eval_tokens=spec.eval_tokens or min(EVAL_TOKENS, 8 * batch), checkpoint_every=ckpt_every)
    if name == "pretrain":
        # Short smoke runs (< 400 steps) warm up over a tenth of their steps instead of 40.
        sched = dict(warmup_steps=min(WARMUP_STEPS, max(1, steps // 10)), warmdown_steps=round(WARMDOWN_RATIO * steps),
                     final_lr_frac=FINAL_LR_FRAC, momentum=MUON_MOMENTUM,
                     momentum_warmup_steps=MUON_MOMENTUM_WARMUP_STEPS)
    else:
        sched = dict(warmup_steps=0, warmdown_steps=round(SFT_WARMDOWN_RATIO * steps),
                     final_lr_frac=SFT_FINAL_LR_FRAC, momentum=SFT_MOMENTUM,
                     momentum_warmup_steps=SFT_MOMENTUM_WARMUP_STEPS)
    return StagePlan(name=name, steps=steps, tokens=tokens, flops=float(fpt * tokens), grad_accum=accum,
                     device_batch_size=dbs, total_batch_size=batch, lr_frac=lr_frac,
                     weight_decay=weight_decay, hours=hours, dollars=dollars(hours, spec.gpus, price), **sched,
                     **cadence)


def _eval_stage(spec: RunSpec, trained: tuple[StagePlan, ...], batch: int, dbs: int, fpt: float,
                throughput: float, price: float) -> StagePlan:
    """The eval stage: one val bpb pass per trained model (the tokens of its stage's own val pass, so the base
    model's figure equals pretraining's last val bpb) and CORE on the base model. Forward only: a third of a
    training token's FLOPs. `steps` = models scored; `tokens` = tokens forwarded."""
    bpb_tokens = sum(s.eval_tokens for s in trained)
    core = core_tokens(spec.core_max_per_task, spec.seq_len) if any(s.name == "pretrain" for s in trained) else 0
    tokens = bpb_tokens + core
    hours = tokens / (3 * throughput) / 3600
    return StagePlan(name="eval", steps=len(trained), tokens=tokens, flops=float(fpt / 3 * tokens), grad_accum=1,
                     device_batch_size=dbs, total_batch_size=batch, lr_frac=0.0, warmup_steps=0, warmdown_steps=0,
                     final_lr_frac=0.0, momentum=(), momentum_warmup_steps=0, weight_decay=0.0, eval_every=1,
                     eval_tokens=bpb_tokens, checkpoint_every=len(trained), hours=hours,
                     dollars=dollars(hours, spec.gpus, price))


def plan(spec: RunSpec) -> RunPlan:
    """Derive the whole run from the spec. Pure: the same spec always gives the same plan."""
    gpu = GPUS[spec.gpu_type]
    warnings: list[str] = []
    if spec.depth % 2:
        warnings.append(f"odd depth {spec.depth}: model_dim {model_dim(spec.depth, spec.head_dim)} is not "
                        f"depth x 64; the recipe is tuned on even depths")
    if spec.precision == "fp8" and gpu.name not in FP8_GPUS:
        warnings.append(f"fp8 needs Hopper-class GPUs; {gpu.name} will fall back to bf16 speed")
    elif spec.precision == "fp8" and spec.depth < FP8_MIN_USEFUL_DEPTH:
        warnings.append(f"fp8 at d{spec.depth}: x{fp8_speedup(spec.depth)[0]:.2f} expected (measured: d12 1.01x, "
                        f"d20 1.18x); small models' matmuls gain little from fp8")

    shape = dict(vocab_size=spec.vocab_size, seq_len=spec.seq_len, head_dim=spec.head_dim,
                 window_pattern=spec.window_pattern)
    a = architecture(spec.depth, **shape)
    p = param_counts(a)
    ref = param_counts(architecture(REFERENCE_DEPTH, **shape)).scaling
    fpt = flops_per_token(a, p)

    batch = spec.total_batch_size or auto_batch_size(p.scaling, ref)
    dbs, accum = split(spec, batch, a, gpu)
    target = int(spec.ratio * p.scaling)
    steps = spec.num_iterations or max(1, target // batch)
    if not spec.num_iterations and target < batch:
        warnings.append(f"ratio {spec.ratio} gives {target:,} tokens, less than one step of {batch:,}")
    opt = optimization(a, batch, p.scaling, ref)

    mfu, mfu_source = mfu_prior(spec.depth, gpu, spec.precision)
    price = gpu.price_per_hour if spec.price_per_gpu_hour is None else spec.price_per_gpu_hour
    price_source = gpu.price_source if spec.price_per_gpu_hour is None else "given by --price"
    linear = spec.gpus * gpu.peak_bf16 * mfu / fpt  # tokens/s for the whole run if scaling were linear; across
    throughput = interconnect.scaled_throughput(linear, batch, p, spec.gpus, spec.interconnect_busbw_gbs)  # nodes, less

    stages = []
    if "pretrain" in spec.stages:
        stages.append(_stage("pretrain", spec, steps, batch, dbs, accum, fpt, throughput, price,
                             1.0, opt.weight_decay))
    sft_cost, sft_source = sft_step_cost(gpu)
    if "sft" in spec.stages:
        sft_steps = max(1, spec.sft_tokens // batch)
        stages.append(_stage("sft", spec, sft_steps, batch, dbs, accum, fpt, throughput / sft_cost, price,
                             SFT_INIT_LR_FRAC, 0.0))
    train_hours = sum(s.hours for s in stages)
    trained = tuple(stages)
    if "eval" in spec.stages:
        stages.append(_eval_stage(spec, trained, batch, dbs, fpt, throughput, price))

    # Fixed overheads, shown apart from training.
    eval_tokens = sum((s.steps // s.eval_every + 1) * s.eval_tokens for s in trained)
    eval_hours = eval_tokens * (fpt / 3) / (spec.gpus * gpu.peak_bf16 * mfu) / 3600  # forward only: 1/3
    eval_hours += sum(s.hours for s in stages if s.name == "eval")
    ckpt_bytes = checkpoint_bytes(p)  # uploads are ASYNC except the last
    overhead = overhead_hours(gpu, stages=len(stages), trained=len(trained), eval_hours=eval_hours,
                              checkpoint_bytes=ckpt_bytes)
    overhead_total = sum(overhead.values())
    train_dollars = dollars(train_hours, spec.gpus, price)
    overhead_dollars = dollars(overhead_total, spec.gpus, price)
    total_dollars = train_dollars + overhead_dollars
    est = Estimate(
        mfu=mfu, mfu_source=mfu_source, peak_flops_per_gpu=gpu.peak_bf16, tokens_per_second=throughput,
        train_hours=train_hours, overhead_hours=overhead, total_hours=train_hours + overhead_total,
        price_per_gpu_hour=price, price_source=price_source, train_dollars=train_dollars,
        overhead_dollars=overhead_dollars, total_dollars=total_dollars,
        within_budget=None if spec.budget_cap is None else total_dollars <= spec.budget_cap,
        sft_cost_per_token=sft_cost, sft_cost_source=sft_source,
    )
    name = _run_name(spec)
    root = spec.storage_root.rstrip("/")
    urls = {
        "data": f"{root}/data/{spec.dataset}",
        "sft_data": f"{root}/data/{spec.sft_dataset}",
        "tokenizer": f"{root}/tokenizers/{spec.tokenizer or f'bpe-{spec.vocab_size}'}",
        "run": f"{root}/runs/{name}",
        "runs_root": f"{root}/runs",
        "eval_bundle": spec.core_bundle or f"{root}/eval_bundle",
    }
    return RunPlan(
        schema=SCHEMA, spec=spec, name=name, arch=a, params=p, flops_per_token=float(fpt),
        target_tokens=target, total_batch_size=batch, device_batch_size=dbs, grad_accum=accum,
        optim=opt, stages=tuple(stages), total_flops=sum(s.flops for s in trained), estimate=est,
        warnings=tuple(warnings), urls=urls, memory=_memory(spec, a, p, dbs, gpu),
        interconnect=interconnect.breakdown(p, spec.gpus, batch / throughput, spec.interconnect_busbw_gbs,
                                            local=gpu.local),
    )


def _memory(spec: RunSpec, a: Architecture, p: ParamCounts, dbs: int, gpu: GPU) -> dict:
    """The memory model's prediction at the chosen device batch; refuses a given batch that cannot fit."""
    est = memory.estimate(a, p, device_batch_size=dbs, world_size=spec.gpus, precision=spec.precision,
                          compiled=not gpu.local, act_bytes=4 if gpu.local else 2, memory_gib=gpu.memory_gib)
    if not est.fits:
        best = memory.largest_device_batch(a, p, limit=dbs, world_size=spec.gpus, precision=spec.precision,
                                           memory_gib=gpu.memory_gib)
        raise PlanError(f"device_batch_size: {dbs} sequences of {spec.seq_len} need ~{est.peak / memory.GIB:.0f} "
                        f"GiB per GPU, {gpu.name} has {est.capacity / memory.GIB:.0f} usable; "
                        + (f"at most {best} fit" if best else memory.refusal(spec, gpu, architecture, param_counts,
                                                                                GPUS)))
    return est.to_dict()

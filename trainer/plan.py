"""The plan: from one dial (`--depth`) to every number a run needs, with its price.

`plan(RunSpec) -> RunPlan` is the single place where the recipe's math lives: model shape, parameter
counts, FLOPs per token, compute-optimal token budget, batch size, learning rates, weight decay,
schedule constants, gradient accumulation for the requested GPUs, and the time and dollar estimate.
The trainer runs exactly this plan, the RayJob is rendered from it, the dashboards compare it with
reality. Stdlib only: the CLI imports this module and must not pull torch or ray.

Every rule reproduces nanochat's recipe (karpathy/nanochat, `scripts/base_train.py`, `nanochat/gpt.py`;
docs/recipe.md). Its neighbours: trainer/spec.py (the `RunSpec` asked for), trainer/recipe.py (the constants,
each with its source), trainer/costs.py (GPU catalog, MFU prior, overheads, dollars). Cross-checks (tests/test_plan.py): d24 has
729,810,624 scaling params and 4.775e9 FLOPs/token; d24 at ratio 8 is 5,568 steps of 2^20 tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from trainer import memory, network
from trainer.costs import (FP8_GPUS, FP8_MIN_USEFUL_DEPTH, FP8_SPEEDUP, GPU, GPUS, checkpoint_bytes, core_tokens,
                          dollars, mfu_prior, overhead_hours)
from trainer.recipe import (ASPECT_RATIO, HEAD_DIM, VOCAB_SIZE, VOCAB_PAD, SEQ_LEN, WINDOW_PATTERN, REFERENCE_DEPTH,
                            B_REF, POWER_LINES_EXPONENT, WEIGHT_DECAY_REF, EMBEDDING_LR, UNEMBEDDING_LR, MATRIX_LR,
                            SCALAR_LR, VALUE_EMBED_LR_FRAC, RESID_LR_FRAC, SMEAR_LR, LR_WIDTH_REF, WARMUP_STEPS,
                            WARMDOWN_RATIO, FINAL_LR_FRAC, MUON_MOMENTUM, MUON_MOMENTUM_WARMUP_STEPS, EVAL_EVERY,
                            EVAL_TOKENS, CHECKPOINT_MINUTES, SFT_INIT_LR_FRAC, SFT_WARMDOWN_RATIO, SFT_FINAL_LR_FRAC,
                            SFT_MOMENTUM, SFT_MOMENTUM_WARMUP_STEPS)
# Also importable from here, for callers that know only the plan (plain imports, no re-export machinery):
from trainer.recipe import SMEAR_GATE_CHANNELS, STAGES, VE_GATE_CHANNELS  # noqa: F401
from trainer.spec import ELASTIC_FIELDS, PlanError, RunSpec

SCHEMA = "llmctl.runplan/v1"


# ---------------------------------------------------------------------------------------------
# What follows from the spec


@dataclass(frozen=True)
class Architecture:
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    seq_len: int
    window_pattern: str
    windows: tuple[int, ...]  # per layer: w, a query sees itself and the w tokens before it (FA3 window_size=(w, 0))
    value_embed_layers: tuple[int, ...]


@dataclass(frozen=True)
class ParamCounts:
    wte: int
    value_embeds: int
    lm_head: int
    transformer_matrices: int  # q,k,v,o,fc,proj and the ve gates of every block
    scalars: int  # resid/x0 lambdas, smear gate (24), smear and backout lambdas
    total: int
    scaling: int  # transformer_matrices + lm_head (Kaplan-style; nanochat num_scaling_params)
    matmul: int  # every Linear weight: scaling + smear gate; the 6N of FLOPs/token


@dataclass(frozen=True)
class Optimization:
    """Learning rates and weight decay after batch and width scaling, per optimizer group."""

    lr_lm_head: float
    lr_wte: float
    lr_value_embeds: float
    lr_resid: float
    lr_x0: float
    lr_smear: float
    lr_matrix: float  # Muon; c_fc gets x2 from the per-shape multiplier sqrt(max(1, rows/cols))
    weight_decay: float  # Muon peak weight decay (cosine to 0 over the run)
    batch_lr_scale: float


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
    memory: dict = field(default_factory=dict)  # trainer/memory.py MemoryEstimate.to_dict() at the device batch

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"plan {self.name} has no stage {name!r}; it has {[s.name for s in self.stages]}")

    def cost_of(self, seconds: float) -> float:
        """Dollars for `seconds` of this run's wall time: all its GPUs at its price (trainer/costs.py)."""
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
# The math


def model_dim(depth: int, head_dim: int = HEAD_DIM) -> int:
    """depth x 64, rounded up to a multiple of head_dim (base_train.build_model_meta)."""
    return -(-depth * ASPECT_RATIO // head_dim) * head_dim


def short_window(seq_len: int) -> int:
    """S windows are a quarter of the context rounded up to 128: 512 at T=2048 (gpt.py, since Mar 14 2026)."""
    return min(seq_len, -(-seq_len // 4 // 128) * 128)


def architecture(depth: int, *, vocab_size: int = VOCAB_SIZE, seq_len: int = SEQ_LEN,
                 head_dim: int = HEAD_DIM, window_pattern: str = WINDOW_PATTERN) -> Architecture:
    n_embd = model_dim(depth, head_dim)
    n_head = n_embd // head_dim
    pattern = (window_pattern * depth)[:depth]
    pattern = pattern[:-1] + "L"  # the last layer always sees the full context
    windows = tuple(seq_len if c == "L" else short_window(seq_len) for c in pattern)
    # Value embeddings on alternating layers, the last one included: i % 2 == (L - 1) % 2.
    ve_layers = tuple(i for i in range(depth) if i % 2 == (depth - 1) % 2)
    return Architecture(
        n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, head_dim=head_dim,
        vocab_size=vocab_size, padded_vocab_size=-(-vocab_size // VOCAB_PAD) * VOCAB_PAD,
        seq_len=seq_len, window_pattern=window_pattern, windows=windows, value_embed_layers=ve_layers,
    )


def param_counts(a: Architecture) -> ParamCounts:
    n, V, L = a.n_embd, a.padded_vocab_size, a.n_layer
    kv_dim = a.n_kv_head * a.head_dim
    block = 4 * n * n + 8 * n * n  # q, k, v, o (n x n) + fc (4n x n) + proj (n x 4n)
    ve_gate = VE_GATE_CHANNELS * a.n_kv_head
    matrices = L * block + len(a.value_embed_layers) * ve_gate
    wte, lm_head = V * n, V * n
    value_embeds = len(a.value_embed_layers) * V * kv_dim
    scalars = 2 * L + SMEAR_GATE_CHANNELS + 2
    return ParamCounts(
        wte=wte, value_embeds=value_embeds, lm_head=lm_head, transformer_matrices=matrices,
        scalars=scalars, total=wte + value_embeds + lm_head + matrices + scalars,
        scaling=matrices + lm_head, matmul=matrices + lm_head + SMEAR_GATE_CHANNELS,
    )


def flops_per_token(a: Architecture, p: ParamCounts) -> int:
    """Training FLOPs per token, forward + backward (gpt.py estimate_flops; PaLM's attention term).

    6 x every matmul weight, plus 12 x heads x head_dim x the tokens each layer attends to (its window).
    Embedding lookups and scalars are free; no causal halving of the attention term.
    """
    attention = sum(12 * a.n_head * a.head_dim * min(w, a.seq_len) for w in a.windows)
    return 6 * p.matmul + attention


def auto_batch_size(scaling: int, scaling_ref: int) -> int:
    """Tokens per step by Power Lines: B = 2^round(log2(B_REF * (D/D_REF)^0.383)), D = ratio x N.

    Both D carry the same ratio, so only N/N_ref matters: 2^18 at d8, 2^19 at d10-16, 2^20 at d18-26.
    """
    return 2 ** round(math.log2(B_REF * (scaling / scaling_ref) ** POWER_LINES_EXPONENT))


def optimization(a: Architecture, batch: int, scaling: int, scaling_ref: int) -> Optimization:
    s = math.sqrt(batch / B_REF)  # LR x sqrt(B/B_REF): the AdamW folklore rule, applied to Muon too
    w = (a.n_embd / LR_WIDTH_REF) ** -0.5  # AdamW embedding/unembedding width scaling
    return Optimization(
        lr_lm_head=UNEMBEDDING_LR * s * w,
        lr_wte=EMBEDDING_LR * s * w,
        lr_value_embeds=VALUE_EMBED_LR_FRAC * EMBEDDING_LR * s * w,
        lr_resid=RESID_LR_FRAC * SCALAR_LR * s,
        lr_x0=SCALAR_LR * s,
        lr_smear=SMEAR_LR,
        lr_matrix=MATRIX_LR * s,
        # T_epoch rule (Wang & Aitchison, arXiv 2405.13698): keep B/(lr * wd * D) fixed, with lr ∝ sqrt(B):
        # wd = 0.28 * sqrt(B/B_REF) * D_REF/D, and D_REF/D = N_ref/N at equal ratio.
        weight_decay=WEIGHT_DECAY_REF * s * scaling_ref / scaling,
        batch_lr_scale=s,
    )


def default_device_batch_size(depth: int, gpu: GPU) -> int:
    """Sequences per GPU per micro-step that fit in memory (nanochat miniseries: 32 to d16, 16 to d26, 8 above,
    on 80 GB; OOM reports at 32 for d24+ in issue #443). GPUs with >= 140 GB take twice as many."""
    base = 32 if depth <= 16 else 16 if depth <= 26 else 8
    if gpu.local:
        return 4
    return min(32, base * 2) if gpu.memory_gib >= 140 else base


def _split_batch(spec: RunSpec, batch: int, a: Architecture, gpu: GPU) -> tuple[int, int]:
    """Device batch and gradient accumulation so that dbs x T x gpus x accum == batch, or a PlanError."""
    T, W = spec.seq_len, spec.gpus
    if batch % T:
        raise PlanError(f"total_batch_size: {batch:,} tokens is not a whole number of {T}-token sequences")
    seqs = batch // T
    if seqs % W:
        raise PlanError(
            f"gpus: {batch:,} tokens per step = {seqs:,} sequences of {T}, which {W} GPUs cannot share "
            f"evenly; use a power-of-two GPU count (1, 2, 4, 8, 16, ...)")
    if a.padded_vocab_size % W:
        raise PlanError(
            f"gpus: the optimizer shards the {a.padded_vocab_size:,}-row embeddings across GPUs, which needs "
            f"the GPU count to divide it; {W} does not (use a power of two)")
    per_gpu = seqs // W
    if gpu.local:
        dbs = spec.device_batch_size or min(default_device_batch_size(spec.depth, gpu), per_gpu)
    else:
        dbs = spec.device_batch_size or _fitting_batch(spec, a, gpu, per_gpu)
    if per_gpu % dbs:
        raise PlanError(
            f"device_batch_size: {per_gpu} sequences per GPU per step (= {batch:,} / {T} / {W}) is not a "
            f"multiple of {dbs}; pick a power of two <= {per_gpu}")
    return dbs, per_gpu // dbs


def _fitting_batch(spec: RunSpec, a: Architecture, gpu: GPU, per_gpu: int) -> int:
    """The largest power-of-two device batch the memory model fits on this GPU, or a one-line PlanError."""
    dbs = memory.largest_device_batch(a, param_counts(a), limit=per_gpu, world_size=spec.gpus,
                                      precision=spec.precision, memory_gib=gpu.memory_gib)
    if dbs is None:
        raise PlanError(memory.refusal(spec, gpu, architecture, param_counts, GPUS))
    return dbs


def _run_name(spec: RunSpec) -> str:
    if spec.name:
        return spec.name
    d = spec.to_dict()
    for k in ("name", "namespace", "image", "queue", "price_per_gpu_hour", "budget_cap", *ELASTIC_FIELDS):
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
        warnings.append(f"fp8 at d{spec.depth}: the reference measured no speed-up at d12 (its matmuls are too "
                        f"small); the x{FP8_SPEEDUP} prior comes from d26")

    shape = dict(vocab_size=spec.vocab_size, seq_len=spec.seq_len, head_dim=spec.head_dim,
                 window_pattern=spec.window_pattern)
    a = architecture(spec.depth, **shape)
    p = param_counts(a)
    ref = param_counts(architecture(REFERENCE_DEPTH, **shape)).scaling
    fpt = flops_per_token(a, p)

    batch = spec.total_batch_size or auto_batch_size(p.scaling, ref)
    dbs, accum = _split_batch(spec, batch, a, gpu)
    target = int(spec.ratio * p.scaling)
    steps = spec.num_iterations or max(1, target // batch)
    if not spec.num_iterations and target < batch:
        warnings.append(f"ratio {spec.ratio} gives {target:,} tokens, less than one step of {batch:,}")
    opt = optimization(a, batch, p.scaling, ref)

    mfu, mfu_source = mfu_prior(spec.depth, gpu, spec.precision)
    price = gpu.price_per_hour if spec.price_per_gpu_hour is None else spec.price_per_gpu_hour
    price_source = gpu.price_source if spec.price_per_gpu_hour is None else "given by --price"
    linear = spec.gpus * gpu.peak_bf16 * mfu / fpt  # tokens/s for the whole run if scaling were linear; across
    throughput = network.scaled_throughput(linear, batch, p, spec.gpus, spec.interconnect_busbw_gbs)  # nodes, less

    stages = []
    if "pretrain" in spec.stages:
        stages.append(_stage("pretrain", spec, steps, batch, dbs, accum, fpt, throughput, price,
                             1.0, opt.weight_decay))
    if "sft" in spec.stages:
        sft_steps = max(1, spec.sft_tokens // batch)
        stages.append(_stage("sft", spec, sft_steps, batch, dbs, accum, fpt, throughput, price,
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


# ---------------------------------------------------------------------------------------------
# Schedules: pure functions of the step (and, for SFT, of the share of the data consumed), so a resumed
# run continues on exactly the same curve.


def lr_multiplier(s: StagePlan, step: int, progress: float | None = None) -> float:
    """Multiplier on every group's initial LR (base_train.get_lr_multiplier; chat_sft's progress rule).

    Pretraining: linear warm-up over `warmup_steps`, flat, then linear over the last `warmdown_steps` to
    `final_lr_frac`. SFT runs one epoch of unknown length, so it follows `progress` (data consumed, 0..1):
    flat to 50%, then linear to 0. Both scale by the stage's `lr_frac`.
    """
    if s.name == "sft":
        frac = s.steps and step / s.steps if progress is None else progress
        cut = 1 - s.warmdown_steps / s.steps if s.steps else 0.5
        m = 1.0 if frac < cut else max(0.0, (1 - frac) / (1 - cut)) * (1 - s.final_lr_frac) + s.final_lr_frac
        return s.lr_frac * m
    if step < s.warmup_steps:
        return s.lr_frac * (step + 1) / s.warmup_steps
    if step <= s.steps - s.warmdown_steps:
        return s.lr_frac
    p = (s.steps - step) / s.warmdown_steps
    return s.lr_frac * (p + (1 - p) * s.final_lr_frac)


def muon_momentum(s: StagePlan, step: int) -> float:
    """Muon momentum (base_train.get_muon_momentum; docs/recipe.md, schedules): start -> peak linearly over
    `momentum_warmup_steps`, and a step inside that ramp gets the ramp's value even when it falls in the LR
    warm-down (short runs). Pretraining, from then on: the peak until the warm-down starts, then linearly to
    the end value at the last step (0.85 -> 0.97 over 400 steps; 0.97 -> 0.90 over the warm-down)."""
    start, peak = s.momentum[0], s.momentum[1]
    if step < s.momentum_warmup_steps:
        frac = step / s.momentum_warmup_steps
        return (1 - frac) * start + frac * peak
    warmdown_start = s.steps - s.warmdown_steps
    if len(s.momentum) > 2 and s.warmdown_steps and step > warmdown_start:
        p = min((step - warmdown_start) / s.warmdown_steps, 1.0)
        return (1 - p) * peak + p * s.momentum[2]
    return peak


def muon_weight_decay(s: StagePlan, step: int) -> float:
    """Muon weight decay: cosine from the stage's peak to 0 over the run (base_train: λ·½(1+cos(π·t/N)))."""
    return s.weight_decay * 0.5 * (1 + math.cos(math.pi * min(step, s.steps) / s.steps))

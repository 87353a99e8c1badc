"""The plan: from one dial (`--depth`) to every number a run needs, with its price.

`plan(RunSpec) -> RunPlan` is the single place where the recipe's math lives: model shape, parameter
counts, FLOPs per token, compute-optimal token budget, batch size, learning rates, weight decay,
schedule constants, gradient accumulation for the requested GPUs, and the time and dollar estimate.
The trainer runs exactly this plan, the RayJob is rendered from it, the dashboards compare it with
reality. Stdlib only: the CLI imports this module and must not pull torch or ray.

Every rule reproduces nanochat's recipe (karpathy/nanochat, `scripts/base_train.py`, `nanochat/gpt.py`);
the formula and its source sit next to each constant. Cross-checks (tests/test_plan.py): d24 has
729,810,624 scaling params and 4.775e9 FLOPs/token; d24 at ratio 8 is 5,568 steps of 2^20 tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

from trainer import memory

SCHEMA = "llmctl.runplan/v1"


class PlanError(ValueError):
    """A spec that cannot be planned; the message names the bad field and says why."""


# ---------------------------------------------------------------------------------------------
# Recipe constants (nanochat scripts/base_train.py defaults unless stated)

ASPECT_RATIO = 64  # model_dim = depth * 64 (--aspect-ratio 64; LOG Jan 17: 64 beats 128 at 1e18 FLOPs)
HEAD_DIM = 128  # --head-dim 128 (LOG Jan 17: 128 beats 64); model_dim rounded up to a multiple of it
VOCAB_SIZE = 32_768  # 2^15: 256 bytes + 32,503 merges + 9 specials (tokenizer.py, since Jan 7 2026)
VOCAB_PAD = 64  # lm_head/wte rows padded to a multiple of 64 (gpt.py pad_vocab_size_to)
SEQ_LEN = 2048  # --max-seq-len
WINDOW_PATTERN = "SSSL"  # tiled over layers, last layer forced to L (gpt.py)
VE_GATE_CHANNELS = 12  # value-embedding gate reads x[..., :12] (gpt.py CausalSelfAttention)
SMEAR_GATE_CHANNELS = 24  # smear gate reads x[..., :24] (gpt.py, added Mar 14 2026)
RATIO = 12.0  # --target-param-data-ratio 12 (Mar 24 2026 re-run of the scaling laws)
REFERENCE_DEPTH = 12  # the batch/WD reference model: B_REF tokens at d12
B_REF = 2**19  # 524,288 tokens per step at d12 (base_train.py)
POWER_LINES_EXPONENT = 0.383  # B_opt ∝ D^0.383 (Bergsma et al., "Power Lines", arXiv 2505.13738)
WEIGHT_DECAY_REF = 0.28  # Muon weight decay at d12 (--weight-decay 0.28)
EMBEDDING_LR = 0.3  # --embedding-lr (AdamW, wte)
UNEMBEDDING_LR = 0.008  # --unembedding-lr (AdamW, lm_head)
MATRIX_LR = 0.02  # --matrix-lr (Muon)
SCALAR_LR = 0.5  # --scalar-lr (AdamW, x0 lambdas; resid lambdas get 0.01x)
VALUE_EMBED_LR_FRAC = 0.5  # value embeddings at half the embedding LR (gpt.py setup_optimizer)
RESID_LR_FRAC = 0.01  # resid_lambdas at 0.01 x scalar LR
SMEAR_LR = 0.2  # smear gate, smear/backout lambdas: fixed, not batch-scaled
LR_WIDTH_REF = 768  # AdamW embedding/unembedding LRs x (n_embd/768)^-0.5 (gpt.py setup_optimizer)
WARMUP_STEPS = 40  # --warmup-steps
WARMDOWN_RATIO = 0.65  # --warmdown-ratio: last 65% of steps decay linearly ...
FINAL_LR_FRAC = 0.05  # ... to 5% of the peak (--final-lr-frac)
MUON_MOMENTUM = (0.85, 0.97, 0.90)  # start, after warm-up, end of warmdown (base_train.get_muon_momentum)
MUON_MOMENTUM_WARMUP_STEPS = 400
EVAL_EVERY = 250  # val bpb cadence (--eval-every)
EVAL_TOKENS = 80 * 524_288  # tokens per val bpb pass (--eval-tokens)
CHECKPOINT_MINUTES = 20  # a dead pod costs at most this much work (nanochat saves only at the end)
KEEP_CHECKPOINTS = 3  # last K checkpoints kept per stage

# SFT (nanochat scripts/chat_sft.py): one epoch over the mixture, LRs inherited un-batch-scaled.
SFT_INIT_LR_FRAC = 0.8  # --init-lr-frac
SFT_WARMDOWN_RATIO = 0.5  # constant to 50% of the data, then linear ...
SFT_FINAL_LR_FRAC = 0.0  # ... to zero
SFT_MOMENTUM = (0.85, 0.95)  # Muon momentum 0.85 -> 0.95 over the first 300 steps
SFT_MOMENTUM_WARMUP_STEPS = 300
# The default mixture (SmolTalk 460K + 3 x MMLU aux 100K + 4 x GSM8K 8K, about 790K conversations) at
# an assumed ~500 tokens per conversation once best-fit packed with padding. Not measured by nanochat;
# override with RunSpec.sft_tokens when the mixture is known.
SFT_TOKENS = 400_000_000

# The eval stage (trainer/evaluate.py) scores the trained checkpoints after the training stages: val bpb and
# samples for each, CORE for the base model. It trains nothing; its time goes into the "evals" overhead.
STAGES = ("pretrain", "sft", "eval")
TRAINING_STAGES = ("pretrain", "sft")

# CORE (DCLM's 22 ICL tasks, nanochat core_eval.py): forward tokens of one full pass, for the estimate only.
# Assumption, not a measurement: about 90,000 examples in the 22 tasks (approximate dataset sizes, hellaswag
# counted twice for its 0- and 10-shot variants), each scored as 1-4 sequences of few-shot prompt + answer,
# about 1,500 tokens per example in total. The report card shows the measured time beside it.
CORE_EXAMPLES = 90_000
CORE_TASKS = 22
CORE_TOKENS_PER_EXAMPLE = 1_500


# ---------------------------------------------------------------------------------------------
# GPU catalog: dense bf16 peak (no 2:4 sparsity), memory, default price. Sources:
# shared/reference/perf-anchors.md §1 (NVIDIA sheets; nanochat common.get_peak_flops) and §4 (prices).


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16: float  # FLOP/s, dense
    memory_gib: int
    price_per_hour: float  # $/GPU-hour, on-demand default; override with --price or the cluster ConfigMap
    price_source: str
    local: bool = False  # runs on the laptop's local Ray cluster, not on Kubernetes


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("h100", 989.4e12, 80, 3.00, "nanochat README: ~$24/h for 8xH100 (market $2.5-5, May 2026)"),
        GPU("h100-pcie", 756e12, 80, 2.86, "Lambda 1xH100 PCIe, May 2026 (3rd-party listing)"),
        GPU("h200", 989.5e12, 141, 3.80, "H200 ~ +25% over H100 (market ranges, May 2026)"),
        GPU("a100", 312e12, 80, 1.80, "assumption (no anchor gathered): set --price"),
        # A CPU worker: a nominal peak of 2 cores x 2 FMA units x 8 fp32 lanes x 2 FLOPs x 2.5 GHz.
        GPU("cpu", 160e9, 0, 0.0, "local machine: no charge", local=True),
    )
}

# MFU prior (bf16 model FLOPs / dense bf16 peak) by depth, from published 8xH100 measurements of this
# recipe (perf-anchors.md §2): d12 41% (nanochat LOG 2026-01-12), d18 46% (LOG 2026-02-19, dense
# baseline), d24 50.0% (leaderboard run 1, 4.33e19 FLOPs / 10,949 s), d26 47.7% (LOG 2026-02-02,
# 630K tok/s). Linear in between, flat outside. Multi-node runs are assumed to match (not measured).
MFU_ANCHORS = ((12, 0.41), (18, 0.46), (24, 0.50), (26, 0.477))
MFU_SOURCE = "nanochat 8xH100 bf16: d12 41%, d18 46%, d24 50%, d26 47.7% (perf-anchors §2)"
FP8_SPEEDUP = 1.17  # tensorwise fp8 at d26: 740K vs 630K tok/s (LOG 2026-02-02); bf16-equivalent MFU
FP8_GPUS = ("h100", "h200")  # fp8 tensor cores (compute capability >= 8.9) in the catalog
FP8_MIN_USEFUL_DEPTH = 20  # nanochat dev/LOG.md: fp8 was slower at d12; its gain was measured at d26
CPU_MFU = 0.25  # rough prior for the eager fp32 CPU path of the local run

# Fixed overheads (hours), estimated separately from training (perf-anchors.md §3): pod scheduling and a
# ~10 GB image pull at ~100 MB/s, Ray worker-group start (<=60 s, ray PR #60376) and NCCL init,
# torch.compile warm-up (modded-nanogpt: ~7 min the first time), and the final checkpoint upload.
SCHEDULING_HOURS = 5 / 60
RAY_START_HOURS = 2 / 60
COMPILE_HOURS = 5 / 60
CHECKPOINT_BANDWIDTH = 200e6  # bytes/s to object storage (s3fs measured 11 MB/s-1 GB/s; ASYNC hides the rest)


# ---------------------------------------------------------------------------------------------
# What was asked


@dataclass(frozen=True)
class RunSpec:
    """What the user asked for. Everything else is derived by `plan()`."""

    depth: int
    gpus: int = 1
    gpu_type: str = "h100"
    stages: tuple[str, ...] = STAGES  # pretrain, sft, eval
    ratio: float = RATIO  # tokens per scaling parameter
    seq_len: int = SEQ_LEN
    device_batch_size: int | None = None  # sequences per GPU per micro-step; None = by depth and memory
    total_batch_size: int | None = None  # tokens per optimizer step; None = Power-Lines rule
    num_iterations: int | None = None  # fixes the step count (overrides ratio), for smoke runs
    precision: str = "bf16"  # bf16 | fp8
    vocab_size: int = VOCAB_SIZE
    head_dim: int = HEAD_DIM
    window_pattern: str = WINDOW_PATTERN
    sft_tokens: int = SFT_TOKENS
    price_per_gpu_hour: float | None = None  # None = the catalog's default for gpu_type
    budget_cap: float | None = None  # dollars; the run stops cleanly with a checkpoint when reached
    storage_root: str = "file://~/.cache/llmctl"
    dataset: str = "climbmix"
    sft_dataset: str = "smoltalk"  # conversations under <root>/data/ (llmctl data prepare)
    eval_every: int | None = None  # steps between val bpb passes; None = 250
    eval_tokens: int | None = None  # tokens per val bpb pass; None = min(80 x 2^19, 8 steps' worth)
    checkpoint_every: int | None = None  # steps; None = about every 20 minutes at the estimated speed
    keep_checkpoints: int = KEEP_CHECKPOINTS
    core_bundle: str | None = None  # CORE eval bundle URL (core.yaml, eval_data/, eval_meta_data.csv); None = <root>/eval_bundle
    core_max_per_task: int | None = None  # examples per CORE task in the eval stage; None = all
    tokenizer: str | None = None  # name under <root>/tokenizers/; None = "bpe-<vocab>"
    name: str | None = None  # None = deterministic from the spec, so a retried job resumes the same run
    namespace: str = "default"
    image: str | None = None
    queue: str | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        def bad(fld: str, why: str) -> None:
            raise PlanError(f"{fld}: {why}")

        if not isinstance(self.depth, int) or self.depth < 1 or self.depth > 64:
            bad("depth", f"must be an integer from 1 to 64, got {self.depth!r}")
        if not isinstance(self.gpus, int) or self.gpus < 1:
            bad("gpus", f"must be a positive integer, got {self.gpus!r}")
        if self.gpu_type not in GPUS:
            bad("gpu_type", f"unknown GPU type {self.gpu_type!r}; known: {', '.join(GPUS)}")
        if not self.stages or any(s not in STAGES for s in self.stages):
            bad("stages", f"must be a non-empty subset of {','.join(STAGES)}, got {','.join(self.stages) or '(none)'}")
        if list(self.stages) != sorted(self.stages, key=STAGES.index) or len(set(self.stages)) != len(self.stages):
            bad("stages", f"must be listed once each in run order ({','.join(STAGES)}), got {','.join(self.stages)}")
        if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and self.ratio > 0):
            bad("ratio", f"must be a positive number of tokens per parameter, got {self.ratio!r}")
        if self.seq_len < 16 or self.seq_len & (self.seq_len - 1):
            bad("seq_len", f"must be a power of two >= 16, got {self.seq_len}")
        if "eval" in self.stages and not set(self.stages) & set(TRAINING_STAGES):
            bad("stages", "eval scores the run's own checkpoints: list pretrain and/or sft before it")
        for fld in ("device_batch_size", "total_batch_size", "num_iterations", "eval_every", "eval_tokens",
                    "checkpoint_every", "keep_checkpoints", "core_max_per_task"):
            v = getattr(self, fld)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(fld, f"must be a positive integer, got {v!r}")
        if self.precision not in ("bf16", "fp8"):
            bad("precision", f"must be bf16 or fp8, got {self.precision!r}")
        if self.vocab_size < 265:
            bad("vocab_size", f"must hold 256 bytes + 9 specials, got {self.vocab_size}")
        if self.head_dim < 8 or self.head_dim % 2:
            bad("head_dim", f"must be an even number >= 8, got {self.head_dim}")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            bad("window_pattern", f"must be a string of S and L, got {self.window_pattern!r}")
        if self.price_per_gpu_hour is not None and not self.price_per_gpu_hour >= 0:
            bad("price_per_gpu_hour", f"must be >= 0, got {self.price_per_gpu_hour!r}")
        if self.budget_cap is not None and not self.budget_cap > 0:
            bad("budget_cap", f"must be > 0 dollars, got {self.budget_cap!r}")
        if self.sft_tokens < 1:
            bad("sft_tokens", f"must be positive, got {self.sft_tokens}")
        if self.name is not None and not _DNS1035.fullmatch(self.name):
            bad("name", f"must be a DNS-1035 label of at most 47 chars (a-z, 0-9, '-'), got {self.name!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"spec: unknown field(s) {', '.join(unknown)}")
        d = dict(d)
        if "stages" in d:
            d["stages"] = tuple(d["stages"])
        return cls(**d)


# RayJob names are DNS-1035 and at most 47 chars (KubeRay: 53-char RayCluster limit minus 6).
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?")


# ---------------------------------------------------------------------------------------------
# What follows from it


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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> RunPlan:
        """Rebuild a plan by re-planning its spec; refuses a stored plan the code would plan differently."""
        if d.get("schema") != SCHEMA:
            raise PlanError(f"schema: expected {SCHEMA}, got {d.get('schema')!r}")
        p = plan(RunSpec.from_dict(d["spec"]))
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


def mfu_prior(depth: int, gpu: GPU, precision: str) -> tuple[float, str]:
    if gpu.local:
        return CPU_MFU, "rough prior for eager fp32 on CPU (local run)"
    pts = MFU_ANCHORS
    if depth <= pts[0][0]:
        mfu = pts[0][1]
    elif depth >= pts[-1][0]:
        mfu = pts[-1][1]
    else:
        for (d0, m0), (d1, m1) in zip(pts, pts[1:]):
            if d0 <= depth <= d1:
                mfu = m0 + (m1 - m0) * (depth - d0) / (d1 - d0)
                break
    source = MFU_SOURCE
    if precision == "fp8" and gpu.name in FP8_GPUS:
        mfu *= FP8_SPEEDUP
        source += "; x1.17 for fp8 tensorwise (LOG 2026-02-02)"
    return mfu, source


def _run_name(spec: RunSpec) -> str:
    if spec.name:
        return spec.name
    d = spec.to_dict()
    for k in ("name", "namespace", "image", "queue", "price_per_gpu_hour", "budget_cap"):
        d.pop(k)  # do not change what is trained
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
                     weight_decay=weight_decay, hours=hours, dollars=hours * spec.gpus * price, **sched, **cadence)


def _eval_stage(spec: RunSpec, trained: tuple[StagePlan, ...], batch: int, dbs: int, fpt: float,
                throughput: float, price: float) -> StagePlan:
    """The eval stage: one val bpb pass per trained model (the tokens of its stage's own val pass, so the base
    model's figure equals pretraining's last val bpb) and CORE on the base model. Forward only: a third of a
    training token's FLOPs. `steps` = models scored; `tokens` = tokens forwarded."""
    bpb_tokens = sum(s.eval_tokens for s in trained)
    examples = CORE_EXAMPLES if spec.core_max_per_task is None else min(CORE_EXAMPLES,
                                                                         CORE_TASKS * spec.core_max_per_task)
    per_example = min(CORE_TOKENS_PER_EXAMPLE, 3 * spec.seq_len)  # prompts are cut to the context
    core_tokens = examples * per_example if any(s.name == "pretrain" for s in trained) else 0
    tokens = bpb_tokens + core_tokens
    hours = tokens / (3 * throughput) / 3600
    return StagePlan(name="eval", steps=len(trained), tokens=tokens, flops=float(fpt / 3 * tokens), grad_accum=1,
                     device_batch_size=dbs, total_batch_size=batch, lr_frac=0.0, warmup_steps=0, warmdown_steps=0,
                     final_lr_frac=0.0, momentum=(), momentum_warmup_steps=0, weight_decay=0.0, eval_every=1,
                     eval_tokens=bpb_tokens, checkpoint_every=len(trained), hours=hours,
                     dollars=hours * spec.gpus * price)


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
    throughput = spec.gpus * gpu.peak_bf16 * mfu / fpt  # tokens/s for the whole run

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
    ckpt_bytes = 4 * p.transformer_matrices + 2 * (p.wte + p.value_embeds) + 4 * p.lm_head
    ckpt_bytes *= 3  # model + optimizer state (moments) across ranks; uploads are ASYNC except the last
    overhead = {
        "scheduling_and_image_pull": 0.0 if gpu.local else SCHEDULING_HOURS,
        "ray_start": 0.0 if gpu.local else RAY_START_HOURS * len(stages),
        "compile": 0.0 if gpu.local else COMPILE_HOURS * len(trained),
        "evals": eval_hours,
        "checkpoint_upload": len(trained) * ckpt_bytes / CHECKPOINT_BANDWIDTH / 3600,
    }
    overhead_hours = sum(overhead.values())
    train_dollars = train_hours * spec.gpus * price
    overhead_dollars = overhead_hours * spec.gpus * price
    total_dollars = train_dollars + overhead_dollars
    est = Estimate(
        mfu=mfu, mfu_source=mfu_source, peak_flops_per_gpu=gpu.peak_bf16, tokens_per_second=throughput,
        train_hours=train_hours, overhead_hours=overhead, total_hours=train_hours + overhead_hours,
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
    """Muon momentum: start -> peak over `momentum_warmup_steps`; pretraining then decays to the end value
    over the LR warm-down (base_train.get_muon_momentum: 0.85 -> 0.97 over 400 steps, -> 0.90)."""
    start, peak = s.momentum[0], s.momentum[1]
    frac = min(step / s.momentum_warmup_steps, 1.0)
    m = (1 - frac) * start + frac * peak
    warmdown_start = s.steps - s.warmdown_steps
    if len(s.momentum) > 2 and s.warmdown_steps and step > warmdown_start:
        p = min((step - warmdown_start) / s.warmdown_steps, 1.0)
        m = (1 - p) * m + p * s.momentum[2]
    return m


def muon_weight_decay(s: StagePlan, step: int) -> float:
    """Muon weight decay: cosine from the stage's peak to 0 over the run (base_train: λ·½(1+cos(π·t/N)))."""
    return s.weight_decay * 0.5 * (1 + math.cos(math.pi * min(step, s.steps) / s.steps))

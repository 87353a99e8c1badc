"""What the user asks for: `RunSpec`, which validates itself and names the bad field (`PlanError`).

Everything else about a run follows from it in trainer/plan.py. Stdlib only: the CLI builds one on start-up.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from trainer.costs import GPUS
from trainer.recipe import (HEAD_DIM, VOCAB_SIZE, SEQ_LEN, WINDOW_PATTERN, RATIO, KEEP_CHECKPOINTS, SFT_TOKENS, STAGES, TRAINING_STAGES)
from trainer.storage import DEFAULT_STORAGE


class PlanError(ValueError):
    """A spec that cannot be planned; the message names the bad field and says why."""



# Capacity and fabric, not what is trained: left out of the run name (a retry on other capacity resumes the same
# run) and out of the stored spec when unset (plans stored before them still load).
ELASTIC_FIELDS = {"min_gpus": None, "spot": False, "preemptions_per_hour": None, "interconnect_busbw_gbs": None}


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
    min_gpus: int | None = None  # elastic: the run goes on with as few as this many GPUs (trainer/reshard.py)
    spot: bool = False  # spot/preemptible capacity: spot price, spot node selector (trainer/spot.py)
    preemptions_per_hour: float | None = None  # per node; None = the catalog's prior (trainer/spot.py)
    storage_root: str = DEFAULT_STORAGE
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
    # Inter-node all-reduce bus bandwidth per GPU in GB/s (nccl-tests busbw; `llmctl doctor --network` measures
    # it); None = trainer/network.py's default fabric. Only runs over more than one node use it.
    interconnect_busbw_gbs: float | None = None

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
        if self.interconnect_busbw_gbs is not None and not (
                isinstance(self.interconnect_busbw_gbs, (int, float)) and self.interconnect_busbw_gbs > 0):
            bad("interconnect_busbw_gbs", f"must be a positive number of GB/s, got {self.interconnect_busbw_gbs!r}")
        if self.min_gpus is not None and (not isinstance(self.min_gpus, int) or not 1 <= self.min_gpus <= self.gpus):
            bad("min_gpus", f"must be an integer from 1 to --gpus ({self.gpus}), got {self.min_gpus!r}")
        if self.preemptions_per_hour is not None and not (isinstance(self.preemptions_per_hour, (int, float))
                                                          and 0 < self.preemptions_per_hour < 1000):
            bad("preemptions_per_hour", f"must be a positive rate, got {self.preemptions_per_hour!r}")
        if self.sft_tokens < 1:
            bad("sft_tokens", f"must be positive, got {self.sft_tokens}")
        if len(self.namespace) > 63:
            bad("namespace", f"must be at most 63 characters (RFC 1123 label), got {len(self.namespace)}")
        if not _RFC1123_LABEL.fullmatch(self.namespace):
            bad("namespace", f"{self.namespace!r} is not a valid Kubernetes namespace (RFC 1123 label: lower-case "
                "letters, digits and '-', starting and ending with a letter or digit)")
        if self.name is not None and not _DNS1035.fullmatch(self.name):
            bad("name", f"must be a DNS-1035 label of at most 47 chars (a-z, 0-9, '-'), got {self.name!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        for k, default in ELASTIC_FIELDS.items():  # absent when unset: plans stored before them still load
            if d[k] == default:
                del d[k]
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


# Namespace names are RFC 1123 labels: at most 63 chars of [a-z0-9-], alphanumeric at both ends.
_RFC1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# RayJob names are DNS-1035 and at most 47 chars (KubeRay: 53-char RayCluster limit minus 6).
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?")

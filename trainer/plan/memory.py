"""Peak GPU memory per rank of a training step, and the largest device batch that fits.

Stdlib only (the CLI imports the planner, which imports this). Bytes per rank, world size W:

| part        | what                                                                              |
| params      | fp32 master weights (matrices, lm_head, scalars); wte and value embeddings in the  |
|             | compute dtype (trainer/model.py stores them in bf16 on CUDA)                       |
| grads       | one gradient per parameter, in the parameter's dtype                              |
| optimizer   | AdamW exp_avg + exp_avg_sq in the parameter's dtype, rows sharded /W (numel >=    |
|             | 1024; trainer/optim.py); Muon momentum (m, n) + factored second moment in fp32 for |
|             | the ceil(K / W) matrices of each K-matrix shape group this rank owns               |
| activations | what autograd keeps for backward, per token: per layer ACT_BYTES x n_embd, plus    |
|             | LOGIT_BYTES x padded vocab for the logits/softcap/cross-entropy chain; under fp8    |
|             | also the 1-byte e4m3 copy of every converted weight (saved for backward)           |
| workspace   | WORKSPACE_BYTES fixed: cuBLAS/NCCL workspaces, compile scratch, allocator slack    |

Peak = max(static + activations + workspace, static + optimizer-step transients + workspace), where
static = params + grads + optimizer state and the transients are the stacked Muon gradients/params
the step builds after backward has freed the activations (with W > 1 also the reduce-scatter stack,
a copy of every matrix gradient).

Activation coefficients:
- Eager (CPU, uncompiled CUDA): EAGER_ACT_ELEMS values of width n_embd per layer and token in the
  compute dtype, of which EAGER_LINEAR_INPUT_ELEMS are Linear inputs that fp8 keeps as 1-byte copies
  (trainer/fp8.py), plus EAGER_MODEL_ELEMS per token for the embeddings/smear/final norm. Counted
  from the saved tensors of trainer/model.py and checked on CPU by tests/plan/test_memory.py against
  autograd's saved tensors at depths 2-6 (error stated in docs/benchmarks.md).
- Compiled (CUDA, the training path): torch.compile's partitioner recomputes cheap pointwise ops
  instead of saving them but keeps buffers of its own; measured, it comes to about what eager keeps per
  layer (38 bytes against eager's 40 in bf16) and much less for the logits. COMPILED_ACT_BYTES and COMPILED_LOGIT_BYTES are
  fitted to bench/gpu_check.sh's peak memory on an H200 (2026-11-30; d12 and d20 at 32 x 2048, bf16 and
  fp8; predicted/measured 1.02-1.10 except d12 fp8, see docs/benchmarks.md). They keep the reference's
  published facts: d24/d26 fit 16 but not 32 sequences on 80 GB (nanochat README, issue #443), d20 runs
  32 sequences on 80 GB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

GIB = 2**30
USABLE_FRACTION = 0.92  # of the card's memory: CUDA context (~0.5 GiB), NCCL buffers, fragmentation
WORKSPACE_BYTES = 2 * GIB  # fixed: cuBLAS workspaces, torch.compile scratch, allocator slack
MAX_DEVICE_BATCH = 32  # the reference's largest --device-batch-size; bigger buys no speed at T=2048
SMALL_NUMEL = 1024  # trainer/optim.py: AdamW params below this are replicated, not sharded

# Bytes per n_embd value per layer per token, compiled: a two-point fit of measured peak minus params, grads and
# optimizer state (d12, d20; docs/benchmarks.md).
COMPILED_ACT_BYTES = {"bf16": 38, "fp8": 34}
COMPILED_LOGIT_BYTES = 2  # per padded-vocab entry per token: the bf16 logits the fused loss keeps
# Eager: values of width n_embd kept per layer per token (trainer/model.py, counted from autograd):
# residual/mix inputs 3, q/k after rotary 2, q/k/v/out of attention 4, the attention output reshaped 1,
# the MLP's normed input 1, c_fc output (= relu output) 4, relu^2 output 4, ~1 for the value embedding
# and its gate on alternating layers = 20; the Linear inputs (qkv, c_proj, c_fc, mlp c_proj) of those
# are kept in fp8 as 1-byte copies by trainer/fp8.py, the bf16 ones as well where another op needs them.
EAGER_ACT_ELEMS = 20
EAGER_FP8_SAVED_ELEMS = 4  # measured: fp8 replaces ~4 of the 20 per layer by 1-byte copies
EAGER_MODEL_ELEMS = 6  # embedding, smear, x0, backout, final norm, lm_head input
EAGER_LOGIT_BYTES = 8  # two fp32 copies of the logits (cast, softcap) kept for backward


@dataclass(frozen=True)
class MemoryEstimate:
    device_batch_size: int
    seq_len: int
    world_size: int
    precision: str  # bf16 | fp8
    compiled: bool
    params: int  # bytes per rank
    grads: int
    optimizer: int
    activations: int
    optimizer_step: int  # transient during the optimizer step (activations freed by then)
    workspace: int
    peak: int
    capacity: int  # usable bytes on the card (0 = not a GPU: no limit)

    @property
    def fits(self) -> bool:
        return self.capacity == 0 or self.peak <= self.capacity

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_gib"] = round(self.peak / GIB, 2)
        d["capacity_gib"] = round(self.capacity / GIB, 2)
        d["fits"] = self.fits
        return d


def capacity_bytes(memory_gib: float) -> int:
    """Usable bytes on a card of `memory_gib` GiB (0 stays 0: a CPU worker, no limit)."""
    return int(memory_gib * GIB * USABLE_FRACTION)


def muon_groups(arch) -> dict[tuple[int, int], int]:
    """Shape -> count of the transformer matrices (trainer/optim.py makes one Muon group per shape)."""
    n, L, kv = arch.n_embd, arch.n_layer, arch.n_kv_head * arch.head_dim
    q = arch.n_head * arch.head_dim
    groups: dict[tuple[int, int], int] = {}
    for shape, k in (((q, n), L), ((kv, n), 2 * L), ((n, q), L), ((4 * n, n), L), ((n, 4 * n), L),
                     ((arch.n_kv_head, 12), len(arch.value_embed_layers))):
        if k:
            groups[shape] = groups.get(shape, 0) + k
    return groups


def activation_bytes_per_token(arch, precision: str, compiled: bool, act_bytes: int) -> float:
    """Bytes autograd keeps per token of a micro-batch (see the module docstring)."""
    n, L, V = arch.n_embd, arch.n_layer, arch.padded_vocab_size
    if compiled:
        return L * COMPILED_ACT_BYTES[precision] * n + COMPILED_LOGIT_BYTES * V
    per_layer = EAGER_ACT_ELEMS * act_bytes
    if precision == "fp8":
        per_layer -= EAGER_FP8_SAVED_ELEMS * (act_bytes - 1)
    return L * per_layer * n + EAGER_MODEL_ELEMS * act_bytes * n + EAGER_LOGIT_BYTES * V


def estimate(arch, params, *, device_batch_size: int, world_size: int = 1, precision: str = "bf16",
             compiled: bool = True, act_bytes: int = 2, memory_gib: float = 0) -> MemoryEstimate:
    """Peak bytes per rank; `params` is a trainer.plan.ParamCounts, `act_bytes` the compute dtype's size
    (2 for bf16 on CUDA, 4 for fp32 on CPU), `memory_gib` the card's memory (0 = no limit)."""
    if precision not in COMPILED_ACT_BYTES:
        raise ValueError(f"precision: must be bf16 or fp8, got {precision!r}")
    W = world_size
    fp32_params = params.transformer_matrices + params.lm_head + params.scalars
    emb_params = params.wte + params.value_embeds
    p_bytes = 4 * fp32_params + act_bytes * emb_params
    # AdamW: two moments like the parameter; the big ones sharded by rows over W ranks.
    adam = 2 * (4 * params.lm_head + act_bytes * emb_params) // W + 2 * 4 * params.scalars
    # Muon: momentum (m, n) + second moment (m or n) in fp32 for the owned ceil(K / W) matrices per shape.
    groups = muon_groups(arch)
    muon = sum(math.ceil(k / W) * 4 * (m * n + (m if m >= n else n)) for (m, n), k in groups.items())
    largest = max(4 * k * m * n for (m, n), k in groups.items())
    if W > 1:  # the reduce-scatter stack of every matrix gradient + this rank's chunk of each
        step_transient = sum(4 * (math.ceil(k / W) * (W + 2)) * m * n for (m, n), k in groups.items())
    else:  # the largest group's stacked gradients and params, and a bf16 copy for the orthogonalisation
        step_transient = 3 * largest
    acts = int(device_batch_size * arch.seq_len * activation_bytes_per_token(arch, precision, compiled, act_bytes))
    if precision == "fp8":  # each fp8 layer also keeps its weight's 1-byte e4m3 copy for backward
        acts += params.scaling
    static = 2 * p_bytes + adam + muon
    peak = static + max(acts, step_transient) + WORKSPACE_BYTES
    return MemoryEstimate(device_batch_size=device_batch_size, seq_len=arch.seq_len, world_size=W,
                          precision=precision, compiled=compiled, params=p_bytes, grads=p_bytes,
                          optimizer=adam + muon, activations=acts, optimizer_step=step_transient,
                          workspace=WORKSPACE_BYTES, peak=peak, capacity=capacity_bytes(memory_gib))


def largest_device_batch(arch, params, *, limit: int, world_size: int, precision: str, memory_gib: float,
                         compiled: bool = True) -> int | None:
    """The largest power of two <= min(limit, MAX_DEVICE_BATCH) whose estimate fits, or None (not even 1)."""
    b = 1 << (max(1, min(limit, MAX_DEVICE_BATCH)).bit_length() - 1)
    while b >= 1:
        if estimate(arch, params, device_batch_size=b, world_size=world_size, precision=precision,
                    compiled=compiled, memory_gib=memory_gib).fits:
            return b
        b //= 2
    return None


def refusal(spec, gpu, architecture, param_counts, gpus: dict) -> str:
    """One line for a depth/GPU combination where not even one sequence fits: what would fit instead.

    `architecture`, `param_counts` and `gpus` are trainer.plan's (passed in: plan imports this module).
    """
    shape = dict(vocab_size=spec.vocab_size, seq_len=spec.seq_len, head_dim=spec.head_dim,
                 window_pattern=spec.window_pattern)

    def peak(depth: int, g) -> MemoryEstimate:
        a = architecture(depth, **shape)
        return estimate(a, param_counts(a), device_batch_size=1, world_size=spec.gpus, precision=spec.precision,
                        memory_gib=g.memory_gib)

    need = peak(spec.depth, gpu)
    deepest = next((d for d in range(spec.depth - 1, 0, -1) if peak(d, gpu).fits), None)
    others = [g.name for g in gpus.values() if not g.local and g.name != gpu.name and peak(spec.depth, g).fits]
    fits = [f"depth <= {deepest} on {gpu.name}"] if deepest else []
    fits += [f"d{spec.depth} on {name}" for name in others]
    return (f"depth: d{spec.depth} does not fit on {gpu.name} ({gpu.memory_gib} GiB) even at 1 sequence of "
            f"{spec.seq_len} per GPU with {spec.gpus} GPU(s): needs ~{need.peak / GIB:.0f} GiB, "
            f"{need.capacity / GIB:.0f} usable; what fits: " + (", ".join(fits) or "nothing in the catalog"))

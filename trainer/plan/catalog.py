"""The GPU catalog and how fast the recipe runs on it: peaks, memory, prices, and the MFU prior.

- `GPUS`: dense bf16 peak FLOP/s (no 2:4 sparsity), memory and default on-demand price per GPU type;
- `mfu_prior(depth, gpu, precision)`: the expected model FLOPs utilisation, from published runs;
- `catalog_gpu(device_name)`: our name for a device as torch names it.
Hours and dollars follow in pricing.py. Sources: docs/recipe.md (cost model); each constant names its own.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# GPU catalog. Peaks: NVIDIA's data sheets (dense bf16), the same figures as nanochat's
# nanochat/common.py get_peak_flops. Prices: on-demand market listings, May 2026 (docs/recipe.md, cost model).


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
# recipe (docs/recipe.md, cost model): d12 41% (nanochat dev/LOG.md 2026-01-12), d18 46% (LOG 2026-02-19,
# dense baseline), d24 50.0% (leaderboard run 1, 4.33e19 FLOPs / 10,949 s), d26 47.7% (LOG 2026-02-02,
# 630K tok/s). Linear in between, flat outside. Multi-node runs are assumed to match (not measured).
MFU_ANCHORS = ((12, 0.41), (18, 0.46), (24, 0.50), (26, 0.477))
# Shown in every plan (and stored in it): the k8s/examples golden plans carry this exact text, so a change
# here means regenerating them (LLMCTL_REGEN=1 pytest tests/cli/kube/test_rayjob.py -k golden).
MFU_SOURCE = "nanochat 8xH100 bf16: d12 41%, d18 46%, d24 50%, d26 47.7% (nanochat README and dev/LOG.md; docs/recipe.md)"
# fp8 (tensorwise) over bf16 tokens/s by depth, each point a measurement of the same step with only the matmul
# precision changed; linear in between, flat outside. Small models gain nothing (their matmuls are too small).
FP8_SPEEDUP_POINTS = (
    (12, 1.010, "d12 1.01x (llmctl bench/gpu_check.sh, 1xH200, 2026-11-30)"),
    (20, 1.183, "d20 1.18x (llmctl bench/gpu_check.sh, 1xH200, 2026-11-30)"),
    (26, 1.175, "d26 1.17x (nanochat dev/LOG.md 2026-02-02, 8xH100: 740K vs 630K tok/s)"),
)
FP8_GPUS = ("h100", "h200")  # fp8 tensor cores (compute capability >= 8.9) in the catalog
FP8_MIN_USEFUL_DEPTH = 16  # below it the measured gain is under ~1.1x: a plan says so (d12: 1.01x)
CPU_MFU = 0.25  # rough prior for the eager fp32 CPU path of the local run

# What an SFT step costs per token, relative to a pretraining step of the same tokens: conversations are rendered
# and packed per row, rows are padded, and a loss mask is applied. On CPU: the demo preset (d4, 2 workers,
# docs/benchmarks.md, 2026-11-30) ran SFT at 1,049 tok/s against pretraining's 2,981 at the same load: 2.8x.
# On GPUs no SFT step has been measured yet: the padded tokens are inside the planned batch and the data work
# overlaps the step, so 1.0x is assumed (and said so in the plan) until bench/gpu_check.sh measures one.
SFT_STEP_COST_CPU = (2.8, "SFT x2.8 per token (measured: demo preset d4 on CPU, 2026-11-30)")
SFT_STEP_COST_GPU = (1.0, "SFT x1.0 per token (assumed: no GPU measurement yet)")


def catalog_gpu(device_name: str) -> str | None:
    """Our catalog's name for a device as torch names it ("cpu", "NVIDIA H100 80GB HBM3", ...), or None."""
    name = device_name.lower()
    if name == "cpu":
        return "cpu"
    for key, ours in (("h100 pcie", "h100-pcie"), ("h100", "h100"), ("h200", "h200"), ("a100", "a100")):
        if key in name:
            return ours
    return None


def _interpolate(points, depth: int) -> float:
    """The value at `depth` of (depth, value, ...) points: linear in between, flat outside."""
    if depth <= points[0][0]:
        return points[0][1]
    if depth >= points[-1][0]:
        return points[-1][1]
    for (d0, v0, *_), (d1, v1, *_) in zip(points, points[1:]):
        if d0 <= depth <= d1:
            return v0 + (v1 - v0) * (depth - d0) / (d1 - d0)
    raise AssertionError("unreachable: points are sorted by depth")


def fp8_speedup(depth: int) -> tuple[float, str]:
    """(fp8/bf16 tokens/s at `depth`, the measurements it comes from): `FP8_SPEEDUP_POINTS` interpolated."""
    return _interpolate(FP8_SPEEDUP_POINTS, depth), "; ".join(src for _, _, src in FP8_SPEEDUP_POINTS)


def sft_step_cost(gpu: GPU) -> tuple[float, str]:
    """(cost of an SFT token / a pretraining token on this GPU type, where the figure comes from)."""
    return SFT_STEP_COST_CPU if gpu.local else SFT_STEP_COST_GPU


def mfu_prior(depth: int, gpu: GPU, precision: str) -> tuple[float, str]:
    """(expected MFU, where it comes from): `MFU_ANCHORS` interpolated by depth; x `fp8_speedup` for fp8."""
    if gpu.local:
        return CPU_MFU, "rough prior for eager fp32 on CPU (local run)"
    mfu = _interpolate(MFU_ANCHORS, depth)
    source = MFU_SOURCE
    if precision == "fp8" and gpu.name in FP8_GPUS:
        factor, _ = fp8_speedup(depth)
        mfu *= factor
        source += f"; x{factor:.3f} for fp8 tensorwise at d{depth} (measured: d12 1.01x, d20 1.18x, d26 1.17x)"
    return mfu, source

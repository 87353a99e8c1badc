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
# here means regenerating them (LLMCTL_REGEN=1 pytest tests/test_rayjob.py -k golden).
MFU_SOURCE = "nanochat 8xH100 bf16: d12 41%, d18 46%, d24 50%, d26 47.7% (nanochat README and dev/LOG.md; docs/recipe.md)"
FP8_SPEEDUP = 1.17  # tensorwise fp8 at d26: 740K vs 630K tok/s (LOG 2026-02-02); bf16-equivalent MFU
FP8_GPUS = ("h100", "h200")  # fp8 tensor cores (compute capability >= 8.9) in the catalog
FP8_MIN_USEFUL_DEPTH = 20  # nanochat dev/LOG.md: fp8 was slower at d12; its gain was measured at d26
CPU_MFU = 0.25  # rough prior for the eager fp32 CPU path of the local run


def catalog_gpu(device_name: str) -> str | None:
    """Our catalog's name for a device as torch names it ("cpu", "NVIDIA H100 80GB HBM3", ...), or None."""
    name = device_name.lower()
    if name == "cpu":
        return "cpu"
    for key, ours in (("h100 pcie", "h100-pcie"), ("h100", "h100"), ("h200", "h200"), ("a100", "a100")):
        if key in name:
            return ours
    return None


def mfu_prior(depth: int, gpu: GPU, precision: str) -> tuple[float, str]:
    """(expected MFU, where it comes from): `MFU_ANCHORS` interpolated by depth; x `FP8_SPEEDUP` for fp8."""
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

"""The multi-node efficiency model: what the interconnect adds to a step once a run spans nodes.

The MFU prior (trainer/plan/pricing.py) was measured on one 8-GPU node, so NVLink's share of a step is already in
it. Across nodes the optimizer's collectives (trainer/optim.py: a reduce-scatter of the gradients and an
all-gather of the updated parameters per step, whatever the grad accumulation) cross the inter-node fabric,
whose bus bandwidth is an order of magnitude or more below NVLink's. Ring traffic of a reduce-scatter plus
an all-gather is that of one all-reduce of the parameters (nccl-tests PERFORMANCE.md: for all-reduce,
busbw = algbw x 2(n-1)/n, so t = S x 2(n-1)/n / busbw). Per step, on n GPUs over more than one node:

    t_fabric = S x 2(n-1)/n / B_fabric  +  k x 2 x log2(n) x latency
    t_nvlink = S x 2(m-1)/m / B_nvlink          (m = GPUs per node: what the prior already contains)
    t_extra  = max(0, t_fabric - t_nvlink)
    step     = t_compute (the prior's, at n x linear speed) + t_extra

S: bytes of the parameters as the model holds them (fp32 matrices and head, bf16 embeddings: the same
bytes as one model copy in a checkpoint); k: collectives per step (two per parameter group); B_fabric:
the cluster's measured inter-node all-reduce bus bandwidth (`llmctl doctor --network`), or the default
below. No overlap of communication with compute is assumed (nanochat's optimizer overlaps part of it with
its own update, not with the backward pass), so the model errs on the slow side.
"""

from __future__ import annotations

import math

NODE_GPUS = 8  # GPUs per worker pod / node (the cluster config's workers.gpusPerNode default)
# nccl-tests all_reduce_perf on one 8xH100 SXM node reaches ~450-480 GB/s busbw (NVLink 4, 900 GB/s per GPU
# bidirectional; NVIDIA's DGX H100 tuning guides); 450 is the figure the prior's node sustained.
NVLINK_BUSBW = 450e9
# Across nodes, 8 x 400 Gb/s InfiniBand NDR or EFA per node is 400 GB/s of line rate; rail-optimised NCCL
# reaches ~75-90% of it on large messages. 300 GB/s is the default until the cluster's own check measures it.
FABRIC_BUSBW = 300e9
# What a run falls back to without RDMA: NCCL's socket transport over one 100 GbE NIC (12.5 GB/s line rate).
TCP_BUSBW = 10e9
FABRIC_LATENCY = 10e-6  # seconds per hop of a small inter-node collective (IB/EFA: ~5-20 us)
COLLECTIVES_PER_STEP = 2 * 4  # reduce-scatter + all-gather for each parameter group (optim.py: 4 groups)


def param_bytes(params) -> float:
    """Bytes of one copy of the parameters (plan.ParamCounts), as the collectives move them."""
    return 4.0 * params.transformer_matrices + 2.0 * (params.wte + params.value_embeds) + 4.0 * params.lm_head


def ring_seconds(nbytes: float, n: int, busbw: float) -> float:
    """All-reduce time of nbytes over n ranks at bus bandwidth busbw (bytes/s)."""
    return 0.0 if n <= 1 else nbytes * 2 * (n - 1) / n / busbw


def extra_step_seconds(params, gpus: int, busbw: float | None = None, node_gpus: int = NODE_GPUS) -> float:
    """Seconds the inter-node fabric adds to one optimizer step (0 on one node)."""
    if gpus <= node_gpus:
        return 0.0
    s = param_bytes(params)
    fabric = ring_seconds(s, gpus, busbw or FABRIC_BUSBW)
    fabric += COLLECTIVES_PER_STEP * 2 * math.log2(gpus) * FABRIC_LATENCY
    return max(0.0, fabric - ring_seconds(s, node_gpus, NVLINK_BUSBW))


def scaled_throughput(linear: float, batch: int, params, gpus: int, busbw_gbs: float | None) -> float:
    """Tokens/s of the whole run: `linear` (n GPUs x per-GPU speed) slowed by the fabric's time per step."""
    return batch / (batch / linear + extra_step_seconds(params, gpus, busbw_gbs and busbw_gbs * 1e9))


def breakdown(params, gpus: int, step_seconds: float, busbw_gbs: float | None, *, local: bool) -> dict:
    """One optimizer step, as the plan shows and stores it (RunPlan.interconnect): compute seconds (at the MFU
    prior, linear in GPUs), interconnect seconds and their share, the bus bandwidth assumed or given and what it
    is. `link`: "local" (CPU workers of one machine, gloo: not modelled), "nvlink" (one node: inside the MFU
    prior) or "fabric" (across nodes: the ring model above)."""
    link = "local" if local else "nvlink" if gpus <= NODE_GPUS else "fabric"
    extra = extra_step_seconds(params, gpus, busbw_gbs and busbw_gbs * 1e9) if link == "fabric" else 0.0
    return {"link": link, "step_seconds": step_seconds, "compute_seconds": step_seconds - extra,
            "interconnect_seconds": extra, "interconnect_share": extra / step_seconds if step_seconds else 0.0,
            "busbw": (busbw_gbs or FABRIC_BUSBW / 1e9) * 1e9 if link == "fabric" else 0.0,
            "busbw_source": ("given" if busbw_gbs else "assumed: 8x400G InfiniBand/EFA") if link == "fabric" else "",
            "bytes_per_step": param_bytes(params) if link == "fabric" else 0.0}


def step_breakdown(plan) -> dict:
    """The plan's step breakdown (`breakdown`, stored in the plan)."""
    return plan.interconnect

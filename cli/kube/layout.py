"""The worker layout: how a run's GPUs fill pods of one node each (the RayJob's worker group, topology placement,
the interconnect check). No imports from the rest of cli/kube: everything that places workers may use it.
"""

from __future__ import annotations

import math


class LayoutError(ValueError):
    """The requested GPUs cannot be laid out as whole pods (the message says why and what to use)."""


def worker_layout(gpus: int, gpus_per_node: int = 8) -> tuple[int, int]:
    """(pods, GPUs per pod): ceil(gpus / per_node) pods of min(gpus, per_node) GPUs; no idle GPUs allowed."""
    per_pod = min(gpus, gpus_per_node)
    pods = math.ceil(gpus / gpus_per_node)
    if pods * per_pod != gpus:
        raise LayoutError(f"gpus: {gpus} GPUs do not fill {pods} pods of {per_pod} (nodes have {gpus_per_node}); "
                          f"above {gpus_per_node}, use a multiple of {gpus_per_node}")
    return pods, per_pod

"""Bad GPU nodes: a rank that fails with a GPU or NCCL error records its node in the run's storage, and the
run's next cluster keeps off it.

Why in storage: the device plugin keeps *new* pods off a GPU it saw fail, but a retried run lands on the same
node whenever its other GPUs are still advertised, and fails again (NVIDIA's answer is node-level remediation;
KubeRay reports Xid 79 as AppFailed, kuberay#4823). A rank knows its node (LLMCTL_NODE, the pod's
`spec.nodeName` through the downward API, cli/kube/pods.py) and writes, without any Kubernetes API token,
`<run>/bad-nodes.json`:

    {"nodes": {"<node>": {"kind": "xid", "error": "<first line>", "attempt": 2, "rank": 5, "at": "<utc>"}}}

`llmctl submit` of the same run (a retry that resumes from the last checkpoint) reads it and gives the worker
group a required node affinity `kubernetes.io/hostname NotIn [<nodes>]` (cli/kube/rayjob.py via
`exclude_nodes`); `llmctl status` lists them. `classify` decides what counts: Xid and ECC errors, CUDA
device-side failures, NCCL errors and watchdog timeouts; an ordinary Python exception does not mark a node.
"""

from __future__ import annotations

import os
import re
import time

BAD_NODES = "bad-nodes.json"
NODE_ENV = "LLMCTL_NODE"

# (kind, pattern) in order: the first match names the failure.
PATTERNS = (
    ("xid", re.compile(r"\bXid\b[^0-9]{0,20}(\d+)", re.I)),
    ("ecc", re.compile(r"uncorrectable ECC|ECC error|DBE|row.?remap", re.I)),
    ("cuda", re.compile(r"CUDA error: (an illegal memory access|unspecified launch failure|uncorrectable|"
                        r"misaligned address|device-side assert|an illegal instruction)|cudaErrorECCUncorrectable|"
                        r"CUDA error: .*(ECC|hardware)|GPU is lost|fallen off the bus|CUBLAS_STATUS_EXECUTION_FAILED",
                        re.I)),
    ("nccl", re.compile(r"NCCL (error|WARN)|ncclSystemError|ncclInternalError|ncclUnhandledCudaError|"
                        r"ProcessGroupNCCL.*(Watchdog|timeout|timed out)|NCCL communicator was aborted", re.I)),
)


def classify(text: str) -> str | None:
    """'xid' | 'ecc' | 'cuda' | 'nccl' when `text` (an exception, a log tail) shows a GPU or fabric failure."""
    for kind, pat in PATTERNS:
        if pat.search(text or ""):
            return kind
    return None


def record(run_url: str, node: str, kind: str, error: str, *, attempt: int, rank: int,
           storage_options: dict | None = None) -> dict:
    """Add `node` to the run's bad-nodes.json (concurrent ranks: storage.update_json loses no update)."""
    from trainer.storage import update_json

    first = (error or "").strip().splitlines()[0][:300] if (error or "").strip() else ""

    def change(doc):
        doc = doc if isinstance(doc, dict) and isinstance(doc.get("nodes"), dict) else {"nodes": {}}
        doc["nodes"].setdefault(node, {"kind": kind, "error": first, "attempt": attempt, "rank": rank,
                                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return doc

    return update_json(f"{run_url.rstrip('/')}/{BAD_NODES}", change, storage_options, replace_invalid=True)


def bad_nodes(run_url: str, storage_options: dict | None = None) -> dict[str, dict]:
    from trainer.storage import read_json

    doc = read_json(f"{run_url.rstrip('/')}/{BAD_NODES}", storage_options)
    nodes = (doc or {}).get("nodes") if isinstance(doc, dict) else None
    return {str(k): v for k, v in nodes.items()} if isinstance(nodes, dict) else {}


def record_if_gpu_failure(exc: BaseException, run_url: str, *, attempt: int, rank: int,
                          storage_options: dict | None = None) -> str | None:
    """On a rank's exception: record this node when the error is a GPU/NCCL one; the kind, or None. Never
    raises (the original error is what the run reports)."""
    node = os.environ.get(NODE_ENV)
    kind = classify(f"{type(exc).__name__}: {exc}")
    if not node or not kind:
        return None
    try:
        record(run_url, node, kind, f"{type(exc).__name__}: {exc}", attempt=attempt, rank=rank,
               storage_options=storage_options)
    except Exception:  # noqa: BLE001 - the failure itself matters more than its record
        return None
    return kind


def exclude_nodes(pod_spec: dict, nodes) -> None:
    """A required node affinity keeping `pod_spec` off `nodes` (ANDed into every existing required term)."""
    nodes = sorted(set(nodes))
    if not nodes:
        return
    expr = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": nodes}
    aff = pod_spec.setdefault("affinity", {})
    node = aff.setdefault("nodeAffinity", {})
    req = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = req.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        term.setdefault("matchExpressions", []).append(dict(expr, values=list(nodes)))

"""What a run costs: the GPU catalog, the MFU prior, the fixed overheads, and the dollars formula.

`trainer/plan.py` turns a spec into a model and a schedule; this module turns that into hours and dollars.
Stdlib only (the CLI imports it on start-up). The numbers and their sources are in docs/recipe.md (cost
model); each constant names its source here too.

- `GPUS`: dense bf16 peak FLOP/s (no 2:4 sparsity), memory and default on-demand price per GPU type;
- `mfu_prior(depth, gpu, precision)`: the expected model FLOPs utilisation, from published runs;
- `overhead_hours(...)`: scheduling and image pull, Ray start, compile warm-up, evals, checkpoint upload;
- `dollars(hours, gpus, price_per_gpu_hour)`: the one dollars formula (plan, loop, eval stage, metrics, status).
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

# Fixed overheads (hours), estimated separately from training (docs/recipe.md, cost model): pod scheduling
# and a ~10 GB image pull at ~100 MB/s, Ray worker-group start (<=60 s, ray PR #60376) and NCCL init,
# torch.compile warm-up (modded-nanogpt: ~7 min the first time), and the final checkpoint upload.
SCHEDULING_HOURS = 5 / 60
RAY_START_HOURS = 2 / 60
COMPILE_HOURS = 5 / 60
CHECKPOINT_BANDWIDTH = 200e6  # bytes/s to object storage (s3fs measured 11 MB/s-1 GB/s; ASYNC hides the rest)

# CORE (DCLM's 22 in-context-learning tasks, arXiv 2406.11794; nanochat nanochat/core_eval.py with the eval
# bundle's core.yaml). The names are fixed, so the metric `llmctl_core_task_centered{task}` stays bounded.
CORE_TASKS = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)
# Forward tokens of one full CORE pass, for the estimate only. Assumption, not a measurement: about 90,000
# examples in the 22 tasks (approximate dataset sizes, hellaswag counted twice for its 0- and 10-shot
# variants), each scored as 1-4 sequences of few-shot prompt + answer, about 1,500 tokens per example in
# total. The report card shows the measured time beside it.
CORE_EXAMPLES = 90_000
CORE_TOKENS_PER_EXAMPLE = 1_500


def catalog_gpu(device_name: str) -> str | None:
    """Our catalog's name for a device as torch names it ("cpu", "NVIDIA H100 80GB HBM3", ...), or None."""
    name = device_name.lower()
    if name == "cpu":
        return "cpu"
    for key, ours in (("h100 pcie", "h100-pcie"), ("h100", "h100"), ("h200", "h200"), ("a100", "a100")):
        if key in name:
            return ours
    return None


def dollars(hours: float, gpus: int, price_per_gpu_hour: float) -> float:
    """What `hours` of wall time on `gpus` GPUs costs: GPU-hours x the price per GPU-hour."""
    return hours * gpus * price_per_gpu_hour


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


def core_tokens(max_per_task: int | None, seq_len: int) -> int:
    """Forward tokens of one CORE pass, capped at `max_per_task` examples per task; prompts are cut to the
    context (at most 3 sequences of `seq_len` per example)."""
    examples = CORE_EXAMPLES if max_per_task is None else min(CORE_EXAMPLES, len(CORE_TASKS) * max_per_task)
    return examples * min(CORE_TOKENS_PER_EXAMPLE, 3 * seq_len)


def checkpoint_bytes(p) -> float:
    """Bytes of one whole checkpoint (trainer/checkpoint.py), all ranks: fp32 matrices and head, bf16
    embeddings, x3 for the model plus the optimizer's state (moments) beside it. `p`: plan.ParamCounts."""
    return 3.0 * (4 * p.transformer_matrices + 2 * (p.wte + p.value_embeds) + 4 * p.lm_head)


def overhead_hours(gpu: GPU, *, stages: int, trained: int, eval_hours: float, checkpoint_bytes: float) -> dict:
    """The fixed overheads of a run, in hours, by kind. `stages`: Ray Train fits (one per stage); `trained`:
    training stages (each compiles and uploads a final checkpoint); `eval_hours`: val passes and the eval
    stage; `checkpoint_bytes`: one whole checkpoint, all ranks. A local run pays no scheduling, start or compile."""
    return {
        "scheduling_and_image_pull": 0.0 if gpu.local else SCHEDULING_HOURS,
        "ray_start": 0.0 if gpu.local else RAY_START_HOURS * stages,
        "compile": 0.0 if gpu.local else COMPILE_HOURS * trained,
        "evals": eval_hours,
        "checkpoint_upload": trained * checkpoint_bytes / CHECKPOINT_BANDWIDTH / 3600,
    }

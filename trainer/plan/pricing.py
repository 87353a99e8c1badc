"""What a run costs: the one dollars formula, the fixed overheads, and the eval stage's forward tokens.

- `dollars(hours, gpus, price_per_gpu_hour)`: the one dollars formula (plan, loop, eval stage, metrics, status);
- `overhead_hours(...)`: scheduling and image pull, Ray start, compile warm-up, evals, checkpoint upload;
- `checkpoint_bytes(params)`, `core_tokens(...)`: what the overheads are made of.
Spot prices, preemptions and the Young/Daly interval are in spot.py. Sources: docs/recipe.md (cost model).
"""

from __future__ import annotations

from trainer.plan.catalog import GPU
from trainer.plan.recipe import CORE_TASKS

# Fixed overheads (hours), estimated separately from training (docs/recipe.md, cost model): pod scheduling
# and a ~10 GB image pull at ~100 MB/s, Ray worker-group start (<=60 s, ray PR #60376) and NCCL init,
# torch.compile warm-up (modded-nanogpt: ~7 min the first time), and the final checkpoint upload.
SCHEDULING_HOURS = 5 / 60
RAY_START_HOURS = 2 / 60
COMPILE_HOURS = 5 / 60
CHECKPOINT_BANDWIDTH = 200e6  # bytes/s to object storage (s3fs measured 11 MB/s-1 GB/s; ASYNC hides the rest)

# Forward tokens of one full CORE pass, for the estimate only. Assumption, not a measurement: about 90,000
# examples in the 22 tasks (approximate dataset sizes, hellaswag counted twice for its 0- and 10-shot
# variants), each scored as 1-4 sequences of few-shot prompt + answer, about 1,500 tokens per example in
# total. The report card shows the measured time beside it.
CORE_EXAMPLES = 90_000
CORE_TOKENS_PER_EXAMPLE = 1_500


def dollars(hours: float, gpus: int, price_per_gpu_hour: float) -> float:
    """What `hours` of wall time on `gpus` GPUs costs: GPU-hours x the price per GPU-hour."""
    return hours * gpus * price_per_gpu_hour


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

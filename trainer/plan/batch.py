"""The batch: how many tokens a step takes, and how they are cut into device batches and accumulation steps.

One home for every batch rule:
- `auto_batch_size`: tokens per optimizer step by Power Lines (Bergsma et al., arXiv 2505.13738), B ∝ D^0.383;
- `split`: device batch x grad accumulation so that device_batch x T x GPUs x accum == the total batch, with
  the checks the optimizer's sharding needs (the GPU count divides the sequences and the padded vocab);
- `fitting_batch`: the largest power-of-two device batch the memory model (memory.py) fits on a GPU;
- `for_world` / `check_elastic`: the same plan re-cut for another world size (elastic runs, re-sharding a
  checkpoint of N ranks on M): the total batch stays fixed, so the recipe and the data stream do too.
"""

from __future__ import annotations

import dataclasses
import math

from trainer.plan import memory
from trainer.plan.catalog import GPU, GPUS
from trainer.plan.recipe import B_REF, POWER_LINES_EXPONENT
from trainer.plan.shape import Architecture, architecture, param_counts
from trainer.plan.spec import PlanError, RunSpec


def auto_batch_size(scaling: int, scaling_ref: int) -> int:
    """Tokens per step by Power Lines: B = 2^round(log2(B_REF * (D/D_REF)^0.383)), D = ratio x N.

    Both D carry the same ratio, so only N/N_ref matters: 2^18 at d8, 2^19 at d10-16, 2^20 at d18-26.
    """
    return 2 ** round(math.log2(B_REF * (scaling / scaling_ref) ** POWER_LINES_EXPONENT))


def default_device_batch_size(depth: int, gpu: GPU) -> int:
    """Sequences per GPU per micro-step that fit in memory (nanochat miniseries: 32 to d16, 16 to d26, 8 above,
    on 80 GB; OOM reports at 32 for d24+ in issue #443). GPUs with >= 140 GB take twice as many."""
    base = 32 if depth <= 16 else 16 if depth <= 26 else 8
    if gpu.local:
        return 4
    return min(32, base * 2) if gpu.memory_gib >= 140 else base


def sequences_per_rank(total_batch: int, seq_len: int, world: int, padded_vocab: int) -> int:
    """Sequences each of `world` ranks takes per optimizer step, or a PlanError naming the rule broken: whole
    sequences, shared evenly by the ranks, and a GPU count dividing the padded vocab (the AdamW row shards)."""
    if total_batch % seq_len:
        raise PlanError(f"total_batch_size: {total_batch:,} tokens is not a whole number of {seq_len}-token sequences")
    seqs = total_batch // seq_len
    if world < 1 or seqs % world:
        raise PlanError(
            f"gpus: {total_batch:,} tokens per step = {seqs:,} sequences of {seq_len}, which {world} GPUs cannot "
            f"share evenly; the recipe keeps the total batch fixed, so use a GPU count dividing {seqs:,} "
            f"(a power of two: 1, 2, 4, 8, 16, ...)")
    if padded_vocab % world:
        raise PlanError(
            f"gpus: the optimizer shards the {padded_vocab:,}-row embeddings across GPUs, which needs the GPU "
            f"count to divide it; {world} does not (use a power of two)")
    return seqs // world


def split(spec: RunSpec, batch: int, a: Architecture, gpu: GPU) -> tuple[int, int]:
    """(device batch, grad accumulation) with dbs x T x gpus x accum == batch, or a PlanError. The device
    batch is the spec's when given (it must divide the sequences per GPU), else the memory model's choice."""
    per_gpu = sequences_per_rank(batch, spec.seq_len, spec.gpus, a.padded_vocab_size)
    if gpu.local:
        dbs = spec.device_batch_size or min(default_device_batch_size(spec.depth, gpu), per_gpu)
    else:
        dbs = spec.device_batch_size or fitting_batch(spec, a, gpu, per_gpu)
    if per_gpu % dbs:
        raise PlanError(
            f"device_batch_size: {per_gpu} sequences per GPU per step (= {batch:,} / {spec.seq_len} / {spec.gpus}) "
            f"is not a multiple of {dbs}; pick a power of two <= {per_gpu}")
    return dbs, per_gpu // dbs


def fitting_batch(spec: RunSpec, a: Architecture, gpu: GPU, per_gpu: int) -> int:
    """The largest power-of-two device batch the memory model fits on this GPU, or a one-line PlanError."""
    dbs = memory.largest_device_batch(a, param_counts(a), limit=per_gpu, world_size=spec.gpus,
                                      precision=spec.precision, memory_gib=gpu.memory_gib)
    if dbs is None:
        raise PlanError(memory.refusal(spec, gpu, architecture, param_counts, GPUS))
    return dbs


# ---------------------------------------------------------------------------------------------
# Another world size: the planned total batch re-cut (elastic runs; a checkpoint of N ranks restored on M)


def split_for_world(total_batch: int, seq_len: int, device_batch: int, world: int, padded_vocab: int) -> tuple[int, int]:
    """(device batch, grad accum) keeping `total_batch` tokens per step on `world` ranks: the planned device
    batch, or the largest divisor of the sequences per rank below it; a PlanError when no cut exists."""
    per_rank = sequences_per_rank(total_batch, seq_len, world, padded_vocab)
    dbs = min(device_batch, per_rank)
    while per_rank % dbs:
        dbs -= 1
    return dbs, per_rank // dbs


def for_world(plan, world: int):
    """The plan as run on `world` ranks: same total batch and schedules, device batch and accumulation re-cut."""
    if world == plan.spec.gpus:
        return plan
    dbs, accum = split_for_world(plan.total_batch_size, plan.arch.seq_len, plan.device_batch_size, world,
                                 plan.arch.padded_vocab_size)
    stages = tuple(dataclasses.replace(s, device_batch_size=dbs, grad_accum=accum if s.name != "eval" else 1)
                   for s in plan.stages)
    return dataclasses.replace(plan, device_batch_size=dbs, grad_accum=accum, stages=stages)


def check_elastic(plan, min_gpus: int | None) -> None:
    """Refuse, in one line, an elastic range the recipe cannot run at both ends."""
    if min_gpus is None:
        return
    if min_gpus > plan.spec.gpus:
        raise PlanError(f"min_gpus: {min_gpus} is more than --gpus {plan.spec.gpus} (the most the run may use)")
    split_for_world(plan.total_batch_size, plan.arch.seq_len, plan.device_batch_size, min_gpus,
                    plan.arch.padded_vocab_size)

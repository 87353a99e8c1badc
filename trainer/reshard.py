"""Re-sharding: a checkpoint written by N ranks, restored on M ranks (M != N), with the same recipe and the
same data stream.

Three things are per rank in a checkpoint (trainer/checkpoint.py) and are re-cut here, as pure functions:

- the recipe at the new world size (`for_world`): the total batch (tokens per optimizer step) is the plan's,
  so sequences per step S = total / T are fixed; each of the M ranks takes S / M of them as
  device_batch x grad_accum, with device_batch = min(planned device batch, S / M) and
  grad_accum = S / M / device_batch. LR, weight decay and momentum are functions of the step alone
  (trainer/plan.py), so they continue unchanged. A world size that does not divide S, or the padded vocab
  (the AdamW row shards), is refused with one line naming it;
- the optimizer shards (`reshard_optimizer`): the layout rules of trainer/optim.py applied backwards then
  forwards: AdamW row shards concatenated in rank order and cut again into M, replicated entries taken from
  rank 0, each Muon matrix's state taken from the old rank that owned it (chunk = ceil(K / N)) and handed to
  the new owner (chunk = ceil(K / M));
- the data position (`partition_loader_states`): PretrainLoader rank r of W reads row groups r, r+W, ... of
  every shard, epoch after epoch, and its state names the last row group it took and the documents it
  buffered but did not pack. Ranks run at different speeds through the row groups (documents differ in
  length), so there is no single cursor. Re-sharding computes, from the N states, E = the furthest epoch any
  rank reached, and the pool of everything not yet taken in epochs <= E: for each old rank, the rest of its
  row groups through epoch E (plus any earlier pool it still held). The pooled row groups, in stream order
  (epoch, shard, row group), go to new rank k mod M; the buffered documents, in stream order, likewise.
  Each new rank reads its pooled row groups first, then continues at epoch E + 1 with the ordinary r of M
  rule. Every document of the planned stream is therefore packed exactly once: the ones already packed are
  behind every old rank's position, each one buffered goes to exactly one new buffer, each row group not yet
  taken to exactly one new rank. Only the rank a document lands on (and so its place in the order) changes.
  SFT's conversation stream is re-cut the same way (`partition_sft_states`), by stream position instead of
  row group.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from trainer.spec import PlanError

LOADER_RESHARD = "reshard"  # kind of the loader state checkpoint.restore hands a loader after a world-size change


# ----------------------------------------------------------------------------------------- the recipe


def split_for_world(total_batch: int, seq_len: int, device_batch: int, world: int, padded_vocab: int) -> tuple[int, int]:
    """(device batch, grad accum) that keep `total_batch` tokens per step on `world` ranks, or a PlanError."""
    seqs = total_batch // seq_len
    if world < 1 or seqs % world:
        raise PlanError(f"gpus: the total batch of {total_batch:,} tokens ({seqs:,} sequences of {seq_len}) cannot "
                        f"be shared evenly by {world} GPUs; the recipe keeps it fixed, so use a GPU count dividing {seqs:,}")
    if padded_vocab % world:
        raise PlanError(f"gpus: the optimizer shards the {padded_vocab:,}-row embeddings across GPUs; {world} does "
                        f"not divide it (use a power of two)")
    per_rank = seqs // world
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


# ----------------------------------------------------------------------------------------- the optimizer


def reshard_optimizer(old: list[dict], optimizer) -> dict:
    """This rank's optimizer state dict for `optimizer` (world M, rank r) from the N saved per-rank states."""
    import torch

    from trainer.optim import SMALL_NUMEL, STATE_FORMAT

    N, M, r = len(old), optimizer.world_size, optimizer.rank
    for i, sd in enumerate(old):
        want = {"format": STATE_FORMAT, "world_size": N, "rank": i}
        if sd.get("sharding") != want:
            raise ValueError(f"optimizer shard {i}: saved for {sd.get('sharding')}, expected {want}")
    state: dict = {}
    for saved, group in zip(old[0]["param_groups"], optimizer.param_groups):
        ids, params = saved["params"], group["params"]
        if len(ids) != len(params) or saved.get("kind") != group["kind"]:
            raise ValueError(f"optimizer group {group['name']!r}: saved {saved.get('kind')} x {len(ids)}, "
                             f"this optimizer has {group['kind']} x {len(params)}")
        if group["kind"] == "adamw":
            for k, p in zip(ids, params):
                entries = [sd["state"].get(k) for sd in old]
                if entries[0] is None:
                    continue  # never stepped
                big = p.numel() >= SMALL_NUMEL
                new = {"step": entries[0]["step"]}
                for name in ("exp_avg", "exp_avg_sq"):
                    full = torch.cat([e[name] for e in entries]) if big and N > 1 else entries[0][name]
                    n = p.shape[0] // M
                    new[name] = (full[r * n:(r + 1) * n] if big and M > 1 else full).clone()
                state[k] = new
        else:
            K = len(ids)
            old_chunk, new_chunk = -(-K // N), -(-K // M)
            for i in range(min(K, r * new_chunk), min(K, (r + 1) * new_chunk)):
                entry = old[i // old_chunk]["state"].get(ids[i])
                if entry is not None:
                    state[ids[i]] = {name: t.clone() for name, t in entry.items()}
    return {"state": state, "param_groups": old[0]["param_groups"],
            "sharding": {"format": STATE_FORMAT, "world_size": M, "rank": r}}


# ----------------------------------------------------------------------------------------- the data


def rule_positions(rank: int, world: int, num_shards: int, row_groups: Callable[[int], int], *,
                   start: tuple[int, int, int | None], last_epoch: int) -> list[tuple[int, int, int]]:
    """(epoch, shard, rg) rank `rank` of `world` reads by the ordinary rule, strictly after `start`
    ((epoch, shard, None) = from the beginning of that shard), through epoch `last_epoch`."""
    out = []
    epoch, s0, rg0 = start
    while epoch <= last_epoch:
        for s in range(s0, num_shards):
            n = row_groups(s)
            first = rank if rg0 is None or s != s0 else rg0 + world
            out.extend((epoch, s, rg) for rg in range(first, n, world))
        epoch, s0, rg0 = epoch + 1, 0, None
    return out


def _row_groups_or_zero(row_groups: Callable[[int], int]) -> Callable[[int], int]:
    from trainer.shards import ShardError

    def count(s: int) -> int:
        try:
            return row_groups(s)
        except ShardError:
            return 0  # undecodable: the loader skips (or refuses) it the same way on every world size
    return count


def partition_loader_states(states: list[dict], rank: int, world: int, *, names: list[str],
                            row_groups: Callable[[int], int], epochs: int | None = None) -> dict:
    """This rank's PretrainLoader state (world `world`) from the N old ranks' states; see the module docstring."""
    from trainer.shards import DataError

    index = {n: i for i, n in enumerate(names)}

    def shard(name: str) -> int:
        if name not in index:
            raise DataError(f"loader state refers to shard {name}, which is not in this split")
        return index[name]

    N = len(states)
    for i, s in enumerate(states):
        if s.get("kind") != "pretrain" or s.get("rank") != i or s.get("world_size") != N:
            raise DataError(f"loader state {i} of {N}: kind {s.get('kind')!r}, rank {s.get('rank')!r}, "
                            f"world_size {s.get('world_size')!r} (expected pretrain, {i}, {N})")
    reached = [s["after"][0] if s["after"] else 0 for s in states]
    restarts = [s.get("restart_epoch") or 0 for s in states]
    E = max(reached + [r - 1 for r in restarts])
    if epochs is not None:
        E = min(E, epochs)
    count = _row_groups_or_zero(row_groups)
    pool: list[tuple[int, int, int]] = []
    buffered: list[tuple[int, int, int]] = []
    for i, s in enumerate(states):
        pool.extend((e, shard(n), rg) for e, n, rg in s.get("pending", []))
        if s.get("restart_epoch"):
            start = (s["restart_epoch"], 0, None)
        elif s["after"]:
            e, n, rg = s["after"]
            start = (e, shard(n), rg)
        else:
            start = (1, 0, None)
        pool.extend(rule_positions(i, N, len(names), count, start=start, last_epoch=E))
        buffered.extend((shard(n), rg, j) for n, rg, docs in s["buffer"] for j in docs)
    # Buffered refs carry no epoch: a small corpus read over several epochs may buffer one document twice (two
    # epochs' copies), so they are a multiset; row groups in the pool carry their epoch and must be unique.
    if len(set(pool)) != len(pool):
        raise DataError("loader states overlap: the same row group of one epoch is claimed by two ranks")
    pool.sort()
    buffered.sort()
    mine = pool[rank::world]
    runs: list[list] = []
    for s, rg, j in buffered[rank::world]:
        if runs and runs[-1][0] == names[s] and runs[-1][1] == rg:
            runs[-1][2].append(j)
        else:
            runs.append([names[s], rg, [j]])
    skipped = []
    for s in states:
        skipped.extend(x for x in s.get("skipped", []) if x not in skipped)
    return {"kind": "pretrain", "version": 1, "split": states[0]["split"], "rank": rank, "world_size": world,
            "after": None, "buffer": runs, "batches": sum(s["batches"] for s in states) // world,
            "skipped": skipped, "pending": [[e, names[s], rg] for e, s, rg in mine], "restart_epoch": E + 1}


def partition_sft_states(states: list[dict], rank: int, world: int, *, conversations: int,
                         epochs: int | None) -> dict:
    """This rank's SFTLoader state (world `world`) from the N old ranks' states.

    SFT rank r of W renders the conversations at stream positions r, r+W, r+2W, ... (position p is
    conversation p mod n of epoch p // n + 1; its state's cursor and epoch name its next position). With P the
    furthest next position of any old rank (at most the end of the planned epochs), the pool is every position
    below P that no rank rendered: each old rank's own positions from its next one up to P, plus any pool it
    still held. Pooled positions (in stream order) and buffered conversations go to new rank k mod M, like the
    pretraining pool; new rank k then continues from position P + k in steps of M. So every position is
    rendered once, and every rendered conversation is packed once. `consumed` (the LR schedule's progress) is
    the old ranks' total scaled to this rank's share, so the schedule continues where it was."""
    from trainer.shards import DataError

    N, n = len(states), conversations
    for i, s in enumerate(states):
        if s.get("kind") != "sft" or s.get("rank") != i or s.get("world_size") != N or s.get("conversations") != n:
            raise DataError(f"SFT loader state {i} of {N}: kind {s.get('kind')!r}, rank {s.get('rank')!r}, world_size "
                            f"{s.get('world_size')!r}, conversations {s.get('conversations')!r} "
                            f"(expected sft, {i}, {N}, {n})")
    nxt = [(s["epoch"] - 1) * n + s["cursor"] for s in states]
    P = max(nxt) if epochs is None else min(max(nxt), epochs * n)
    pool: list[int] = []
    for i, s in enumerate(states):
        pool.extend((e - 1) * n + j for e, j in s.get("pending", []))
        pool.extend(range(nxt[i], P, N))
    if len(set(pool)) != len(pool):
        raise DataError("SFT loader states overlap: the same conversation of one epoch is claimed by two ranks")
    pool.sort()
    buffered = sorted(j for s in states for j in s["buffer"])
    start = P + rank
    share = len(range(rank, n, world))
    return {"kind": "sft", "version": 1, "rank": rank, "world_size": world, "conversations": n,
            "cursor": start % n, "epoch": start // n + 1, "buffer": buffered[rank::world],
            "consumed": round(sum(s["consumed"] for s in states) * share / n),
            "batches": sum(s["batches"] for s in states) // world, "last": False,
            "pending": [[p // n + 1, p % n] for p in pool[rank::world]]}


def reshard_request(states: list[dict], rank: int, world: int) -> dict:
    """What checkpoint.restore hands the loader after a world-size change: all old states, resolved by the
    loader itself (only it knows the shards' row-group counts, or the number of conversations)."""
    kinds = {s.get("kind") for s in states}
    if len(kinds) != 1 or not kinds <= {"pretrain", "sft"}:
        raise PlanError(f"gpus: resuming {'/'.join(sorted(map(str, kinds)))} data on {world} ranks from a checkpoint "
                        f"of {len(states)} is not supported (pretraining and SFT re-shard); resume on "
                        f"{len(states)} GPUs")
    return {"kind": LOADER_RESHARD, "states": states, "rank": rank, "world_size": world}

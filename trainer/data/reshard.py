"""Re-sharding the data position: the loader states of N ranks, re-cut for M ranks, so that a resumed run
packs every document of the planned stream exactly once (pure functions; trainer/checkpoint.py calls
`reshard_request`, each loader resolves it).

PretrainLoader rank r of W reads row groups r, r+W, ... of
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

from typing import Callable

from trainer.plan.spec import PlanError

LOADER_RESHARD = "reshard"  # kind of the loader state checkpoint.restore hands a loader after a world-size change


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
    from trainer.data.shards import ShardError

    def count(s: int) -> int:
        try:
            return row_groups(s)
        except ShardError:
            return 0  # undecodable: the loader skips (or refuses) it the same way on every world size
    return count


def partition_loader_states(states: list[dict], rank: int, world: int, *, names: list[str],
                            row_groups: Callable[[int], int], epochs: int | None = None) -> dict:
    """This rank's PretrainLoader state (world `world`) from the N old ranks' states; see the module docstring."""
    from trainer.data.shards import DataError

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
    from trainer.data.shards import DataError

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

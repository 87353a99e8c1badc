"""Re-sharding the optimizer: a checkpoint written by N ranks, restored on M ranks (M != N).

The recipe at the new world size is the planner's (trainer/plan/batch.py `for_world`: the total batch stays
fixed, device batch x accumulation is re-cut, LR/WD/momentum are functions of the step alone); the data
position is re-cut by trainer/data/reshard.py. What is left is the optimizer's per-rank state
(`reshard_optimizer`): the layout rules of trainer/optim.py applied backwards then forwards: AdamW row shards
concatenated in rank order and cut again into M, replicated entries taken from rank 0, each Muon matrix's state
taken from the old rank that owned it (chunk = ceil(K / N)) and handed to the new owner (chunk = ceil(K / M)).
"""

from __future__ import annotations


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

"""trainer/reshard.py: a checkpoint of N ranks restored on M ranks, M != N both ways, with the same recipe.

Checks: the recipe re-cut for a new world size keeps the total batch (bad sizes refused in one line);
the optimizer shards re-cut 2 -> 1 and 1 -> 2 continue training exactly like an uninterrupted run (real gloo
ranks, tolerance 1e-6); the data stream re-cut 2 -> 1, 1 -> 2, 3 -> 2 and 2 -> 1 -> 2 packs every document
of the epoch exactly once (a document-level audit over the real PretrainLoader on real parquet shards); the
val pass scores the same tokens, and the same weights the same val bpb, at any world size. CPU only.

Run: .venv/bin/pytest tests/test_reshard.py
"""

from __future__ import annotations

import collections
import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import checkpoint, reshard
from trainer.data import reshard as data_reshard
from trainer.plan import batch
from trainer.data.corpus import iter_python_docs
from trainer.data.pretrain import PretrainLoader
from trainer.model import build_model
from trainer.optim import build_optimizer
from trainer.plan import PlanError, RunSpec, plan
from trainer.data.shards import ShardReader, list_shards, write_shards
from trainer.data.tokenizer import Tokenizer

# --------------------------------------------------------------------------------------------- the recipe


def test_reshard_keeps_the_total_batch_and_recuts_accumulation():
    p = plan(RunSpec(depth=26, gpus=16, min_gpus=8, spot=True))
    for world in (1, 2, 4, 8, 32):
        q = batch.for_world(p, world)
        for s in q.stages:
            if s.name != "eval":
                assert q.device_batch_size * q.arch.seq_len * world * s.grad_accum == p.total_batch_size
        assert [s.lr_frac for s in q.stages] == [s.lr_frac for s in p.stages]
        assert [(s.steps, s.warmup_steps, s.warmdown_steps, s.momentum) for s in q.stages] == \
               [(s.steps, s.warmup_steps, s.warmdown_steps, s.momentum) for s in p.stages]
        assert q.optim == p.optim
    assert batch.for_world(p, 16) is p
    assert plan(RunSpec(depth=26, gpus=16)).name == p.name  # capacity flags do not change what is trained


def test_reshard_refuses_bad_combinations_in_one_line():
    with pytest.raises(PlanError, match=r"^min_gpus: must be an integer from 1 to --gpus \(8\), got 16$"):
        RunSpec(depth=12, gpus=8, min_gpus=16)
    p = plan(RunSpec(depth=26, gpus=16))
    with pytest.raises(PlanError, match="which 3 GPUs cannot share evenly") as e:
        batch.check_elastic(p, 3)
    assert "\n" not in str(e.value)
    with pytest.raises(PlanError, match="which 3 GPUs cannot share evenly"):
        batch.for_world(p, 3)


# --------------------------------------------------------------------------------------------- the optimizer

SPEC = dict(depth=2, vocab_size=512, seq_len=64, head_dim=32)
BATCH, STEPS, SPLIT = 4, 4, 2  # 4 rows per step (device batch 2: 1 rank x 2 accum or 2 ranks x 1), 4 steps, resize after 2


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (BATCH, 65), generator=g) for _ in range(STEPS)]


def _train(world: int, rank: int, steps: range, ckpt: str | None = None, save: str | None = None,
           ortho_dtype: torch.dtype | None = None) -> dict:
    """Steps `steps` on this rank's rows (accumulation fills the total batch of 4 rows); restore from `ckpt`
    first (any world size), save to `save` after. Polar Express in `ortho_dtype` (None: this CPU's default)."""
    p = batch.for_world(plan(RunSpec(gpus=1, device_batch_size=2, total_batch_size=BATCH * 64, **SPEC)), world)
    torch.manual_seed(0)
    model = build_model(p.arch, "cpu")
    opt = build_optimizer(model, p.optim, world_size=world, rank=rank, ortho_dtype=ortho_dtype)
    if ckpt:
        checkpoint.restore(ckpt, model=model, optimizer=opt, rank=rank, world_size=world)
    per = BATCH // world
    accum = p.grad_accum
    assert p.device_batch_size * accum == per
    batches = _batches()
    for step in steps:
        rows = batches[step][rank * per:(rank + 1) * per]
        for a in range(accum):
            sub = rows[a * per // accum:(a + 1) * per // accum]
            (model(sub[:, :-1], sub[:, 1:]) / accum).backward()
        for g in opt.param_groups:
            if "momentum" in g:
                g["momentum"] = 0.9
        opt.step()
        model.zero_grad(set_to_none=True)
    if save:
        state = {"kind": "pretrain", "version": 1, "split": "train", "rank": rank, "world_size": world,
                 "after": None, "buffer": [], "batches": 0, "skipped": []}
        checkpoint.save(save, model=model, optimizer=opt, loader_state=state, rank=rank, world_size=world,
                        step=steps.stop, stage="pretrain", run="r", loop_state={})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_main(rank: int, world: int, port: int, job: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        steps, ckpt, save, out, ortho_dtype = job
        params = _train(world, rank, range(*steps), ckpt, save, ortho_dtype)
        if out:
            torch.save(params, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _equal(a: dict, b: dict) -> None:
    for name, value in a.items():
        assert torch.equal(value, b[name]), (name, (value - b[name]).abs().max().item())


@pytest.mark.parametrize("ortho_dtype", [pytest.param(torch.float32, id="float32"),
                                         pytest.param(torch.bfloat16, id="bf16")])
def test_reshard_optimizer_2_to_1_and_1_to_2_continue_like_an_uninterrupted_run(tmp_path, ortho_dtype):
    """Bit for bit (tolerance 0, every parameter), with either Polar Express dtype forced: W=2 ranks equal
    1 rank with 2x accumulation bit for bit (tests/test_optim.py), and re-sharding only moves saved values, so
    any misplaced moment or Muon buffer shows at once; a rounding-level difference would not stay small
    (AdamW on backout_lambda's ~0 gradient amplifies it), so no tolerance would tell the two apart."""
    straight = _train(1, 0, range(STEPS), ortho_dtype=ortho_dtype)
    two = str(tmp_path / "two")
    mp.spawn(_rank_main, args=(2, _port(), ((0, SPLIT), None, two, None, ortho_dtype)), nprocs=2, join=True)
    _equal(_train(1, 0, range(SPLIT, STEPS), ckpt=two, ortho_dtype=ortho_dtype), straight)  # 2 -> 1

    one = str(tmp_path / "one")
    _train(1, 0, range(SPLIT), save=one, ortho_dtype=ortho_dtype)
    out = str(tmp_path / "params")
    mp.spawn(_rank_main, args=(2, _port(), ((SPLIT, STEPS), one, None, out, ortho_dtype)), nprocs=2, join=True)
    for r in range(2):  # 1 -> 2
        _equal(torch.load(f"{out}.rank{r}", weights_only=True), straight)


def test_reshard_optimizer_round_trip_through_four_ranks_is_exact():
    p = plan(RunSpec(gpus=1, device_batch_size=1, total_batch_size=BATCH * 64, **SPEC))
    torch.manual_seed(0)
    model = build_model(p.arch, "cpu")
    opt = build_optimizer(model, p.optim)
    for x in _batches()[:2]:
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    sd = opt.state_dict()

    class As:  # what reshard_optimizer reads of an optimizer: its groups, world size and rank
        def __init__(self, world, rank):
            self.param_groups, self.world_size, self.rank = opt.param_groups, world, rank

    four = [reshard.reshard_optimizer([sd], As(4, r)) for r in range(4)]
    assert sum(len(s["state"]) for s in four) > len(sd["state"])  # small AdamW entries replicated on each
    back = reshard.reshard_optimizer(four, As(1, 0))
    assert back["sharding"] == sd["sharding"] and sorted(back["state"]) == sorted(sd["state"])
    for k, entry in sd["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(back["state"][k][name]), torch.as_tensor(value)), (k, name)
    with pytest.raises(ValueError, match="saved for"):
        reshard.reshard_optimizer([four[1], four[0], four[2], four[3]], As(1, 0))


# --------------------------------------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """~360 real documents in 2 train shards + 1 val shard, row groups of 8 (so ranks race through them)."""
    texts = [f"[{i:04d}] {t[:900]}" for i, t in enumerate(itertools.islice(iter_python_docs(include_site_packages=False), 360))]
    url = f"file://{tmp_path_factory.mktemp('shards')}"
    write_shards(texts, url, shard_chars=110_000, row_group_size=8)
    tok = Tokenizer.train(texts, 300)
    return url, tok


def _all_docs(url: str) -> list[tuple]:
    urls = list_shards(url)[:-1]
    r = ShardReader(urls, None, 1, 0.0, None)
    names = [os.path.basename(u) for u in urls]
    return [(names[s], rg, j) for s in range(len(urls)) for rg in range(r.num_row_groups(s))
            for j in range(len(r.read_row_group(s, rg)))]


def _loaders(url, tok, world, states=None):
    out = []
    for rank in range(world):
        ld = PretrainLoader(url, tok, batch_size=2, seq_len=64, rank=rank, world_size=world, epochs=1,
                            buffer_size=12, state=None if states is None else data_reshard.reshard_request(states, rank, world)
                            if states[0]["world_size"] != world else states[rank])
        ld.audit = []
        out.append(ld)
    return out


def _run(loaders, batches: int | None) -> list:
    """Every loader takes `batches` batches (None: until the epoch runs out); their states."""
    for ld in loaders:
        for _ in itertools.count() if batches is None else range(batches):
            try:
                next(ld)
            except StopIteration:
                break
    return [ld.state_dict() for ld in loaders]


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (3, 2), (2, 1, 2)])
def test_reshard_data_packs_every_document_exactly_once(shards, worlds):
    url, tok = shards
    every = _all_docs(url)
    seen: list = []
    states = None
    for i, world in enumerate(worlds):
        loaders = _loaders(url, tok, world, states)
        last = i == len(worlds) - 1
        states = _run(loaders, None if last else 5 + 2 * i)
        for ld in loaders:
            seen.extend(ld.audit)
            ld.close()
    left = [(n, rg, j) for s in states for n, rg, docs in s["buffer"] for j in docs]  # partial last batches
    counts = collections.Counter(seen + left)
    assert [d for d, c in counts.items() if c > 1] == []  # none repeated
    assert sorted(counts) == sorted(every)  # none skipped
    assert len(seen) > 0.8 * len(every)


def test_reshard_data_state_resumes_exactly_on_the_new_world_size(shards):
    """After a re-shard, a rank's own state (pool still pending) restores to exactly the same next batches."""
    url, tok = shards
    states = _run(_loaders(url, tok, 2), 3)
    a, = _loaders(url, tok, 1, states)
    for _ in range(2):
        next(a)
    mid = a.state_dict()
    assert mid["pending"] and mid["restart_epoch"] == 2
    expect = [next(a)[0] for _ in range(3)]
    b = PretrainLoader(url, tok, batch_size=2, seq_len=64, rank=0, world_size=1, epochs=1, buffer_size=12, state=mid)
    assert all(torch.equal(x, next(b)[0]) for x in expect)
    a.close(), b.close()


def test_reshard_pool_and_buffers_from_hand_written_states():
    """Two shards of 4 row groups; rank 0 of 2 took rg 0 and 2 of shard a, rank 1 rg 1 of shard a (epoch 1).
    The pool is every untaken row group of epoch 1; a document buffered twice (two epochs' copies, a small
    corpus) is kept twice; a row group claimed twice is refused."""
    def state(rank, after, buffer):
        return {"kind": "pretrain", "version": 1, "split": "train", "rank": rank, "world_size": 2, "after": after,
                "buffer": buffer, "batches": 3, "skipped": []}

    old = [state(0, [1, "a", 2], [["a", 2, [0, 1]], ["a", 2, [1]]]), state(1, [1, "a", 1], [["a", 1, [5]]])]
    new = [data_reshard.partition_loader_states(old, r, 3, names=["a", "b"], row_groups=lambda s: 4) for r in range(3)]
    pool = sorted(tuple(x) for n in new for x in n["pending"])
    assert pool == [(1, "a", 3), (1, "b", 0), (1, "b", 1), (1, "b", 2), (1, "b", 3)]
    assert all(n["restart_epoch"] == 2 and n["world_size"] == 3 for n in new)
    docs = sorted((name, rg, j) for n in new for name, rg, js in n["buffer"] for j in js)
    assert docs == [("a", 1, 5), ("a", 2, 0), ("a", 2, 1), ("a", 2, 1)]
    from trainer.data.shards import DataError

    with pytest.raises(DataError, match="claimed by two ranks"):
        data_reshard.partition_loader_states([old[0], state(1, [1, "a", 1], []) | {"pending": [[1, "a", 3]]}], 0, 1,
                                        names=["a", "b"], row_groups=lambda s: 4)


# --------------------------------------------------------------------------------------------- the val pass


def _val_plan(url: str, gpus: int):
    """A plan for `gpus` GPUs whose pretraining data is `url`, with a val pass of 2 batches of 2 rows per GPU."""
    import dataclasses

    p = plan(RunSpec(gpus=gpus, device_batch_size=2, total_batch_size=gpus * 2 * 64, eval_tokens=gpus * 2 * 2 * 64,
                     **{**SPEC, "vocab_size": 300}))
    return dataclasses.replace(p, urls={**p.urls, "data": url})


def _val_batches(p, tok, world: int) -> list[list]:
    """Each rank's val batches (inputs) at `world` ranks, through trainer/worker.py's ValPass."""
    from trainer.worker import ValPass, Worker

    out = []
    for rank in range(world):
        val = ValPass(p, "pretrain", tok, Worker(rank, world, 0, torch.device("cpu")))
        out.append([x for x, _ in val])
        assert len(out[-1]) == val.steps and val.tokens == p.stage("pretrain").eval_tokens
    return out


@pytest.mark.parametrize("planned", [2, 4])
def test_reshard_val_pass_scores_the_same_tokens_at_any_world_size(shards, planned):
    """The cause of the 2->1 gap in tests/test_preempt_resize.py: each rank's val loader packs the row groups
    of its own rank, so at 1 rank the pass read other documents (measured on one model: 4.89 bpb at 1 rank,
    4.34 at 2). ValPass reads the planned world size's streams, split between however many ranks there are."""
    url, tok = shards
    p = _val_plan(url, planned)
    at_planned = _val_batches(p, tok, planned)  # one stream per rank, as a run at its planned size reads
    streams = [b for rank in at_planned for b in rank]
    for world in (1, 2, planned):
        got = _val_batches(p, tok, world)
        # rank r scores streams r, r + W, ...: together exactly the planned size's batches
        by_stream = {v: got[v % world][(v // world) * 2:(v // world) * 2 + 2] for v in range(planned)}
        flat = [b for v in range(planned) for b in by_stream[v]]
        assert len(flat) == len(streams) and all(torch.equal(a, b) for a, b in zip(flat, streams))
    # and the old per-rank reading at 1 rank would have scored other rows (what the test above guards against)
    one = PretrainLoader(url, tok, batch_size=2, seq_len=64, rank=0, world_size=1, split="val")
    old = [next(one)[0] for _ in range(len(streams))]
    one.close()
    assert not all(torch.equal(a, b) for a, b in zip(old, streams))


def test_reshard_val_bpb_of_the_same_weights_is_the_same_at_one_and_two_ranks(shards, tmp_path):
    """Real gloo ranks: val bpb (trainer/evaluate.py, all-reduced sums) of one model through ValPass at 2 ranks
    equals the figure at 1 rank."""
    from trainer.evaluate import evaluate_bpb
    from trainer.worker import ValPass, Worker

    url, tok = shards
    p = _val_plan(url, 2)
    torch.manual_seed(0)
    model = build_model(p.arch, "cpu")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    tok.save(f"file://{tmp_path}/tok")
    # spawn, not fork: this process already runs loader and tokenizer threads, whose locks a fork would copy held
    mp.spawn(_val_rank, args=(2, _port(), str(tmp_path), url), nprocs=2, join=True)
    two = float((tmp_path / "bpb").read_text())
    val = ValPass(p, "pretrain", tok, Worker(0, 1, 0, torch.device("cpu")))
    with torch.no_grad():
        one = evaluate_bpb(model.eval(), val, val.steps, torch.tensor(tok.token_bytes()))
    assert two == pytest.approx(one, rel=1e-9)


def _val_rank(rank: int, world: int, port: int, tmp: str, url: str) -> None:
    from trainer.evaluate import evaluate_bpb
    from trainer.worker import ValPass, Worker

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tok = Tokenizer.load(f"file://{tmp}/tok")
        p = _val_plan(url, 2)
        model = build_model(p.arch, "cpu")
        model.load_state_dict(torch.load(f"{tmp}/model.pt", weights_only=True))
        val = ValPass(p, "pretrain", tok, Worker(rank, world, 0, torch.device("cpu")))
        with torch.no_grad():
            bpb = evaluate_bpb(model.eval(), val, val.steps, torch.tensor(tok.token_bytes()))
        if rank == 0:
            with open(f"{tmp}/bpb", "w") as f:
                f.write(repr(bpb))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- SFT's conversations


def _conversations(k: int = 150) -> list[dict]:
    """`k` one- or two-turn conversations of varied lengths (so ranks pack different counts per batch)."""
    rows = []
    for i in range(k):
        msgs = [{"role": "user", "content": f"question {i}: " + "why " * (i % 7)},
                {"role": "assistant", "content": f"answer {i} " + "because " * (i % 11)}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": "done."}]
        rows.append({"messages": msgs})
    return rows


def _sft_loaders(tok, world: int, states=None) -> list:
    from trainer.data.sft import SFTLoader

    out = []
    for rank in range(world):
        state = None if states is None else (states[rank] if states[0]["world_size"] == world
                                             else data_reshard.reshard_request(states, rank, world))
        ld = SFTLoader(_conversations(), tok, batch_size=2, seq_len=64, rank=rank, world_size=world, buffer_size=8,
                       state=state)
        ld.audit = []
        out.append(ld)
    return out


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (3, 2), (2, 1, 2)])
def test_reshard_sft_packs_every_conversation_exactly_once(shards, worlds):
    _, tok = shards
    seen: list = []
    states = None
    for i, world in enumerate(worlds):
        loaders = _sft_loaders(tok, world, states)
        if states is not None:  # the LR schedule's progress carries over (each rank's share of the total)
            before = sum(s["consumed"] for s in states) / 150
            assert all(ld.progress == pytest.approx(before, abs=0.02) for ld in loaders)
        states = _run(loaders, None if i == len(worlds) - 1 else 4 + 2 * i)
        for ld in loaders:
            seen.extend(ld.audit)
    assert all(s["buffer"] == [] and "pending" not in s for s in states)  # the epoch ran out on every rank
    counts = collections.Counter(seen)
    assert [c for c, k in counts.items() if k > 1] == []  # none repeated
    assert sorted(counts) == list(range(150))  # none skipped


def test_reshard_sft_state_resumes_exactly_on_the_new_world_size(shards):
    """A re-shard's pool is part of the new rank's own state: restored, it yields exactly the same batches."""
    from trainer.data.sft import SFTLoader

    _, tok = shards
    states = _run(_sft_loaders(tok, 2), 3)
    a, = _sft_loaders(tok, 1, states)
    next(a)
    mid = a.state_dict()
    assert mid["pending"] and mid["world_size"] == 1
    expect = [next(a)[0] for _ in range(3)]
    b = SFTLoader(_conversations(), tok, batch_size=2, seq_len=64, buffer_size=8, state=mid)
    assert all(torch.equal(x, next(b)[0]) for x in expect)


def test_reshard_sft_refuses_states_of_another_dataset(shards):
    from trainer.data.shards import DataError

    _, tok = shards
    states = _run(_sft_loaders(tok, 2), 1)
    states[1]["conversations"] = 149
    with pytest.raises(DataError, match="SFT loader state 1 of 2: .*conversations 149"):
        _sft_loaders(tok, 1, states)

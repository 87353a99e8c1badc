"""`llmctl submit --preflight`: a short per-node check before a long run, on the run's own workers.

Each rank: a matmul in the training precision checked against a float32 reference (a GPU that computes wrong
answers fails here, before hours are spent on it) and timed (TFLOP/s); then an all-reduce among the ranks of
its node (NVLink inside one node: a bad link or GPU shows as a low bus bandwidth or a hang bounded by the
collective timeout). Rank 0 gathers every rank's figures and writes `<run>/preflight.json`:

    {"attempt": 1, "ok": false, "nodes": {"<node>": {"ok": false, "ranks": [0, 1], "matmul_tflops": [...],
     "max_rel_err": 0.002, "allreduce_busbw_gbs": 410.0, "why": "..."}}}

A failed node is also recorded in `<run>/bad-nodes.json` (kind "preflight"; trainer/gpu_health.py) and the
attempt fails (PreflightFailed), so `llmctl submit --avoid-bad-nodes` places the run elsewhere. Turned on by
the RayJob's LLMCTL_PREFLIGHT=1 (cli/submit.py); trainer/launch.py runs it once per attempt before the stages.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist

ENV = "LLMCTL_PREFLIGHT"
MATMUL_N = 4096  # on a GPU; 256 on CPU (the tests)
MAX_REL_ERR = 0.05  # bf16 against float32 on random normal inputs is ~0.3-1%; a wrong answer is far above
MIN_TFLOPS_SHARE = 0.3  # a rank below 30% of its node's best is throttled or faulty
ALLREDUCE_BYTES = 256 << 20  # on a GPU; 1 MiB on CPU


class PreflightFailed(RuntimeError):
    """A node failed the preflight; the run's bad-nodes.json names it."""


def matmul_check(device: torch.device, n: int | None = None, dtype=None) -> tuple[float, float]:
    """(TFLOP/s, max relative error against float32) of an n x n matmul in `dtype` (bf16 on GPU)."""
    n = n or (MATMUL_N if device.type == "cuda" else 256)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator(device="cpu").manual_seed(1234)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    ref = a.float() @ b.float()
    a_, b_ = a.to(dtype), b.to(dtype)
    out = a_ @ b_  # warm-up
    reps = 10 if device.type == "cuda" else 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = a_ @ b_
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / reps
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    return 2 * n**3 / seconds / 1e12, err


def allreduce_check(device: torch.device, group=None, nbytes: int | None = None) -> float:
    """Bus bandwidth (GB/s) of an all-reduce among `group` (nccl-tests' busbw = bytes x 2(n-1)/n / time)."""
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    nbytes = nbytes or (ALLREDUCE_BYTES if device.type == "cuda" else 1 << 20)
    if n <= 1:
        return 0.0
    t = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dist.all_reduce(t, group=group)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        dist.all_reduce(t, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / reps
    return nbytes * 2 * (n - 1) / n / seconds / 1e9


def judge(rows: list[dict], *, speed: bool = True) -> dict:
    """Per node: ok or why not, from every rank's {rank, node, tflops, err, busbw}. `speed`: judge matmul speed
    too (on GPUs; CPU ranks share cores, so their timings say nothing about the hardware)."""
    nodes: dict[str, dict] = {}
    for r in rows:
        d = nodes.setdefault(r["node"], {"ranks": [], "matmul_tflops": [], "max_rel_err": 0.0,
                                         "allreduce_busbw_gbs": r["busbw"]})
        d["ranks"].append(r["rank"])
        d["matmul_tflops"].append(round(r["tflops"], 3))
        d["max_rel_err"] = max(d["max_rel_err"], r["err"])
        d["allreduce_busbw_gbs"] = min(d["allreduce_busbw_gbs"], r["busbw"])
    for d in nodes.values():
        why = []
        if d["max_rel_err"] > MAX_REL_ERR:
            why.append(f"matmul wrong by {d['max_rel_err']:.3g} (limit {MAX_REL_ERR})")
        best = max(d["matmul_tflops"])
        slow = [rk for rk, tf in zip(d["ranks"], d["matmul_tflops"]) if speed and tf < MIN_TFLOPS_SHARE * best]
        if slow:
            why.append(f"rank(s) {slow} below {MIN_TFLOPS_SHARE:.0%} of the node's best matmul speed")
        d["ok"] = not why
        if why:
            d["why"] = "; ".join(why)
    return nodes


def run_check(device: torch.device, rank: int, local_rank: int, world: int, node: str | None = None) -> dict:
    """This rank's figures; the all-reduce is among the ranks that share its node (one group per node)."""
    node = node or os.environ.get("LLMCTL_NODE") or socket.gethostname()
    tflops, err = matmul_check(device)
    busbw = 0.0
    if dist.is_initialized() and world > 1:
        # every rank learns every rank's node, then joins its node's group (new_group is collective over all)
        names: list = [None] * world
        dist.all_gather_object(names, node)
        groups = {}
        for n in sorted(set(names)):
            groups[n] = dist.new_group([r for r, x in enumerate(names) if x == n])
        busbw = allreduce_check(device, groups[node])
    return {"rank": rank, "node": node, "tflops": tflops, "err": err, "busbw": busbw}


def preflight_loop(config: dict) -> None:
    """The Ray Train loop: every rank checks; rank 0 writes preflight.json and names failed nodes."""
    import json

    from trainer.gpu_health import record
    from trainer.storage import write_json
    from trainer.worker import worker_context

    w = worker_context()
    row = run_check(w.device, w.rank, w.local_rank, w.world)
    rows: list = [None] * w.world
    if dist.is_initialized() and w.world > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    run_url = json.loads(config["plan"])["urls"]["run"]
    opts = config.get("storage_options")
    nodes = judge(rows, speed=w.device.type == "cuda")
    if w.rank == 0:
        doc = {"attempt": config.get("attempts", 1), "ok": all(d["ok"] for d in nodes.values()), "nodes": nodes}
        write_json(f"{run_url}/preflight.json", doc, opts)
        for name, d in nodes.items():
            if not d["ok"]:
                record(run_url, name, "preflight", d["why"], attempt=config.get("attempts", 1), rank=d["ranks"][0],
                       storage_options=opts)
    bad = {n: d["why"] for n, d in nodes.items() if not d["ok"]}
    if bad:
        raise PreflightFailed("preflight failed on " + "; ".join(f"{n}: {why}" for n, why in sorted(bad.items())))


def run_preflight(p, storage_options: dict | None, *, attempts: int = 1, workers=None, local: bool = False) -> dict:
    """Run the check on the run's workers (one Ray Train fit, no retries) and return preflight.json;
    raises PreflightFailed when a node failed (the attempt then fails before its stages)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.storage import ray_storage
    from trainer.storage import read_json

    n = workers if isinstance(workers, int) else (max(workers) if workers else p.spec.gpus)
    storage_path, storage_fs = ray_storage(p.urls["run"], storage_options or {})
    trainer = TorchTrainer(
        preflight_loop, train_loop_config={"plan": p.to_json(), "storage_options": storage_options,
                                           "attempts": attempts},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=not local),
        torch_config=TorchConfig(backend="gloo" if local else "nccl", timeout_s=600),
        run_config=RunConfig(name=f"preflight-{attempts}", storage_path=storage_path,
                             storage_filesystem=storage_fs, failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps the rank's error; the stored document says what failed
        doc = read_json(f"{p.urls['run']}/preflight.json", storage_options)
        if doc and not doc.get("ok"):
            raise PreflightFailed("preflight failed on " + "; ".join(
                f"{name}: {d.get('why')}" for name, d in sorted(doc["nodes"].items()) if not d.get("ok"))) from None
        raise PreflightFailed(f"preflight did not finish: {type(e).__name__}: {str(e)[:300]}") from None
    return read_json(f"{p.urls['run']}/preflight.json", storage_options)

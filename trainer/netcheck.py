"""The interconnect check: all-reduce bus bandwidth and latency across the run's workers, against what the
configured fabric should give, with the likely cause when it falls short.

Runs as a Ray Train job with the same worker layout as a training run (`llmctl doctor --network --gpus N`
renders it as a RayJob: cli/netcheck.py), NCCL on GPUs and gloo on a local CPU cluster (the test). Each
rank all-reduces float32 tensors at the sizes the optimizer's collectives use (one parameter group's
gradients, up to all parameters of the run's depth) and at a small size for latency; the bus bandwidth is
nccl-tests' definition, busbw = bytes / seconds x 2(n-1)/n (nccl-tests doc/PERFORMANCE.md), so it compares
directly with `llmctl plan --interconnect-gbs` and trainer/plan/interconnect.py's model.

Likely causes of a shortfall, from what the worker sees: no RDMA device (/sys/class/infiniband is empty:
NCCL falls back to TCP sockets; on EKS the EFA device plugin's `vpc.amazonaws.com/efa` resource, on IB the
RDMA shared device plugin's `rdma/...` resource must be requested), NCCL told not to use it
(NCCL_IB_DISABLE=1, NCCL_NET=Socket), or a single node (NVLink only: the check measured no fabric).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SMALL = 8 * 1024  # bytes: a latency-bound all-reduce
SIZES = (SMALL, 1 << 20, 16 << 20, 64 << 20, 256 << 20)  # up to one large parameter group's gradients
PASS_FRACTION = 0.6  # ✓ when the measured busbw reaches this share of the expected figure


def rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


def measure(sizes=SIZES, iters: int = 5, warmup: int = 2) -> list[dict]:
    """Time all_reduce at each size on the current process group; every rank returns the same list."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    out = []
    for nbytes in sizes:
        t = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
        for _ in range(warmup):
            dist.all_reduce(t)
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        _sync(device)
        dt = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's time is the collective's time
        seconds = float(dt.item())
        algbw = t.numel() * 4 / seconds
        out.append({"bytes": t.numel() * 4, "seconds": seconds, "algbw": algbw, "busbw": algbw * 2 * (n - 1) / n})
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def verdict(results: list[dict], *, expected_busbw: float, world: int, nodes: int, env: dict, rdma: list[str],
            backend: str) -> tuple[bool, list[str]]:
    """(ok, lines): ✓/✗ on bandwidth at the largest size and on latency, with the likely cause."""
    big, small = max(results, key=lambda r: r["bytes"]), min(results, key=lambda r: r["bytes"])
    ok = big["busbw"] >= PASS_FRACTION * expected_busbw
    lines = [f"{'✓' if ok else '✗'} all-reduce bus bandwidth {big['busbw'] / 1e9:.1f} GB/s at "
             f"{big['bytes'] / 2**20:.0f} MiB over {world} ranks ({backend}); "
             f"expected ~{expected_busbw / 1e9:.0f} GB/s"]
    lines.append(f"  latency {small['seconds'] * 1e6:.0f} us per {small['bytes'] // 1024} KiB all-reduce")
    if not ok:
        lines.append("  likely cause: " + likely_cause(env=env, rdma=rdma, nodes=nodes, backend=backend))
    return ok, lines


def likely_cause(*, env: dict, rdma: list[str], nodes: int, backend: str) -> str:
    if backend != "nccl":
        return f"{backend} is not NCCL: this measures the CPU path, not the GPU fabric"
    if env.get("NCCL_NET", "").lower() == "socket" or env.get("NCCL_IB_DISABLE") == "1":
        return "NCCL is configured for TCP sockets (NCCL_NET=Socket or NCCL_IB_DISABLE=1 in the pod's env)"
    if nodes > 1 and not rdma:
        return ("no RDMA device in the worker pod (/sys/class/infiniband is empty): NCCL fell back to TCP "
                "sockets; request the RDMA/EFA device resource (workers.extraResources) and an unlimited memlock")
    if nodes <= 1:
        return "one node only: this measured NVLink/PCIe, not the fabric; run with --gpus over two nodes"
    return ("RDMA devices are present but slow: check NCCL_DEBUG=INFO for 'NET/Socket', GPUDirect RDMA "
            "(nvidia-peermem), and that NCCL_SOCKET_IFNAME/NCCL_IB_HCA name the fabric's interfaces")


def train_fn(config: dict) -> dict:
    """Ray Train worker function: measure, and gather each rank's node and RDMA devices."""
    import ray.train
    import torch.distributed as dist

    results = measure(tuple(config.get("sizes", SIZES)), config.get("iters", 5))
    ctx = ray.train.get_context()
    devices = rdma_devices()
    local = {"rdma": devices, "node": os.environ.get("HOSTNAME", "")}
    everyone = [None] * ctx.get_world_size()
    dist.all_gather_object(everyone, local)
    return {"results": results, "ranks": everyone}  # Ray Train hands back rank 0's as Result.return_value


def run_check(gpus: int, *, use_gpu: bool, sizes=SIZES, iters: int = 5) -> dict:
    """Run the check on the current Ray cluster; {"results": [...], "ranks": [...], "backend": ...}."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    backend = "nccl" if use_gpu else "gloo"
    trainer = TorchTrainer(train_fn, train_loop_config={"sizes": list(sizes), "iters": iters},
                           scaling_config=ScalingConfig(num_workers=gpus, use_gpu=use_gpu),
                           torch_config=TorchConfig(backend=backend, timeout_s=600),
                           run_config=RunConfig(name=f"netcheck-{int(time.time())}"))
    return {**trainer.fit().return_value, "backend": backend}


def result_line(out: dict, *, ok: bool, expected_gbs: float, world: int, nodes: int, cause: str | None) -> dict:
    """The check's last log line, as JSON: what `llmctl doctor --network` reads back from the RayJob's log
    (cli/netcheck.py `parse_result`) and stores as the cluster's measured interconnect."""
    big, small = max(out["results"], key=lambda r: r["bytes"]), min(out["results"], key=lambda r: r["bytes"])
    return {"ok": ok, "busbw_gbs": big["busbw"] / 1e9, "latency_us": small["seconds"] * 1e6,
            "expected_gbs": expected_gbs, "world": world, "nodes": nodes, "backend": out["backend"],
            "cause": cause, "results": out["results"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.netcheck", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--expect-gbs", type=float, required=True, help="expected all-reduce bus bandwidth, GB/s")
    ap.add_argument("--node-gpus", type=int, default=8)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU workers (a local check)")
    args = ap.parse_args(argv)
    out = run_check(args.gpus, use_gpu=not args.cpu)
    nodes = len({r["node"] for r in out["ranks"]}) or 1
    env, rdma = dict(os.environ), out["ranks"][0]["rdma"]
    ok, lines = verdict(out["results"], expected_busbw=args.expect_gbs * 1e9, world=args.gpus, nodes=nodes,
                        env=env, rdma=rdma, backend=out["backend"])
    print("\n".join(lines))
    print(json.dumps(result_line(out, ok=ok, expected_gbs=args.expect_gbs, world=args.gpus, nodes=nodes,
                                 cause=None if ok else likely_cause(env=env, rdma=rdma, nodes=nodes,
                                                                     backend=out["backend"]))))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of one training step (forward + backward + optimizer) of our GPT, and on CUDA its MFU.

Builds the model and optimizer exactly as a run would (trainer.plan -> build_model -> build_optimizer), feeds
fixed random tokens, times whole steps after warm-up (compile included there on CUDA) and prints:
- tokens/s = batch x seq / median step time, and the share of the step spent in the optimizer;
- MFU = FLOPs/token (the planner's, equal to the model's) x tokens/s / peak, against the GPU's dense bf16
  peak from trainer.costs.GPUS, or on CPU against the planner's nominal CPU peak (which the planner
  assumes is reached at CPU_MFU = 0.25; this ratio is the measured counterpart).
The last line is the same result as JSON.

Run: .venv/bin/python bench/train_step.py                      (CPU default: d4, seq 512, batch 2)
     python bench/train_step.py --depth 20 --seq 2048 --batch 0  (GPU; batch 0 = largest power of two that fits)
     add --fp8 for trainer/fp8.py's fp8 matmuls; bench/gpu_check.sh runs bf16 and fp8 side by side
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trainer.model import build_model, compute_dtype
from trainer.optim import build_optimizer
from trainer.costs import CPU_MFU, GPUS
from trainer.plan import RunSpec, plan


def gpu_type(device: torch.device) -> str | None:
    """Our catalog's name for this device (None when the catalog has no peak for it)."""
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key, ours in (("h100 pcie", "h100-pcie"), ("h100", "h100"), ("h200", "h200"), ("a100", "a100")):
        if key in name:
            return ours
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(depth: int, batch: int, seq: int, vocab: int, steps: int, warmup: int, device: torch.device,
            compile: bool | None, fp8: bool = False) -> dict:
    p = plan(RunSpec(depth=depth, seq_len=seq, vocab_size=vocab, device_batch_size=batch,
                     total_batch_size=batch * seq, gpu_type=gpu_type(device) or "h100",
                     precision="fp8" if fp8 else "bf16"))
    torch.manual_seed(0)
    model = build_model(p.arch, device, compile=compile, fp8=fp8)
    opt = build_optimizer(model, p.optim)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]
    step_s, opt_s = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        model(x, y).backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        model.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
    med = statistics.median(step_s)
    return dict(depth=depth, batch=batch, seq=seq, vocab=vocab, device=str(device), dtype=str(compute_dtype(device)),
                fp8=fp8,
                threads=torch.get_num_threads(), steps=steps, step_s_median=med, step_s_min=min(step_s),
                step_s_max=max(step_s), tokens_per_s=batch * seq / med,
                optimizer_share=statistics.median(opt_s) / med, flops_per_token=p.flops_per_token,
                params_total=p.params.total, memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                                         if device.type == "cuda" else None))


def largest_batch(args, device: torch.device) -> dict:
    """Try batch 64, 32, ... on CUDA; the first that runs without running out of memory wins."""
    for b in (64, 32, 16, 8, 4, 2, 1):
        try:
            return measure(args.depth, b, args.seq, args.vocab, args.steps, args.warmup, device, args.compile,
                           args.fp8)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"batch {b}: out of memory")
    raise SystemExit("even batch 1 does not fit")


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=12 if cuda else 4)
    ap.add_argument("--seq", type=int, default=2048 if cuda else 512)
    ap.add_argument("--batch", type=int, default=0 if cuda else 2,
                    help="sequences per step; 0 = the largest power of two that fits (CUDA)")
    ap.add_argument("--vocab", type=int, default=32_768)
    ap.add_argument("--steps", type=int, default=10 if cuda else 5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5 if cuda else 2, help="untimed steps first (compile on CUDA)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--compile", type=int, choices=(0, 1), default=None, help="default: 1 on CUDA, 0 on CPU")
    ap.add_argument("--fp8", action="store_true", help="fp8 matmuls (trainer/fp8.py) for the large Linear layers")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if args.batch == 0 and device.type == "cuda":
        r = largest_batch(args, device)
    else:
        r = measure(args.depth, args.batch or 1, args.seq, args.vocab, args.steps, args.warmup, device,
                    None if args.compile is None else bool(args.compile), args.fp8)

    kind = gpu_type(device)
    peak = GPUS[kind].peak_bf16 if kind else None
    r["gpu_type"], r["peak_flops"] = kind, peak
    r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak if peak else None
    print(f"d{r['depth']} batch {r['batch']} x seq {r['seq']} on {r['device']} ({r['dtype']}, {r['threads']} threads): "
          f"step {r['step_s_median'] * 1e3:.1f} ms median (min {r['step_s_min'] * 1e3:.1f}, max "
          f"{r['step_s_max'] * 1e3:.1f}) over {r['steps']} steps")
    print(f"tokens/s: {r['tokens_per_s']:,.0f}; optimizer share of the step: {r['optimizer_share']:.1%}")
    if device.type == "cpu":
        print(f"MFU against the planner's nominal CPU peak ({peak / 1e9:.0f} GFLOP/s): {r['mfu']:.3f} "
              f"(the planner assumes {CPU_MFU}), i.e. measured / assumed = {r['mfu'] / CPU_MFU:.2f}")
    elif peak:
        print(f"MFU against the {kind} dense bf16 peak ({peak / 1e12:.1f} TFLOP/s): {r['mfu']:.1%}; "
              f"peak memory {r['memory_gib']:.1f} GiB")
    else:
        print(f"MFU: no peak in trainer.costs.GPUS for {torch.cuda.get_device_name(device)}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()

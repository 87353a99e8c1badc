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

--compare (CPU): the optimizer's kernel choices (trainer/optim.py `kernels`, `ortho_dtype`) side by side in one
process, each on its own copy of the same model and data, steps interleaved round-robin so load changes hit
every variant alike; prints each one's median step and optimizer time and its step-time ratio to the
reference (the median of per-round ratios), with the load average before and after:
     .venv/bin/python bench/train_step.py --compare --threads 1 --depth 4 --batch 8 --seq 256 --vocab 4096 \
         --head-dim 64        (the local presets' shape; add --compare-compiled for a torch.compile'd, inductor
                               C++, reference variant: its first step shows the compile time)
--compare-process (CPU): whole configurations before/after, each a fresh process of this script (the allocator
setting, trainer/allocator.py, is per process), in rounds with the order rotated; ratios per round:
     .venv/bin/python bench/train_step.py --compare-process --threads 1 --depth 4 --batch 8 --seq 256 \
         --vocab 4096 --head-dim 64 --rounds 5
Every CPU measurement runs with the allocator setting a CPU training worker applies (--malloc keep) unless
--malloc default is given; --kernels picks the optimizer's kernels (default: the device's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from trainer.model import build_model, compute_dtype
from trainer.allocator import keep_freed_memory
from trainer.optim import KERNELS, adamw_update, build_optimizer, muon_update
from trainer.plan.catalog import CPU_MFU, GPUS, catalog_gpu
from trainer.plan import RunSpec, plan
from trainer.plan.recipe import HEAD_DIM


def gpu_type(device: torch.device) -> str | None:
    """Our catalog's name for this device (None when the catalog has no peak for it)."""
    return catalog_gpu(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(depth: int, batch: int, seq: int, vocab: int, steps: int, warmup: int, device: torch.device,
            compile: bool | None, fp8: bool = False, head_dim: int = HEAD_DIM, kernels: str | None = None) -> dict:
    p = plan(RunSpec(depth=depth, seq_len=seq, vocab_size=vocab, device_batch_size=batch, head_dim=head_dim,
                     total_batch_size=batch * seq, gpu_type=gpu_type(device) or "h100",
                     precision="fp8" if fp8 else "bf16"))
    torch.manual_seed(0)
    model = build_model(p.arch, device, compile=compile, fp8=fp8)
    opt = build_optimizer(model, p.optim, kernels=kernels)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]
    step_s, opt_s, cpu_s, faults = [], [], [], []
    for i in range(warmup + steps):
        _sync(device)
        c0, f0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        model(x, y).backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        model.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        if i == 0:
            first = t2 - t0  # compile included where it compiles
        if i >= warmup:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
            cpu_s.append(time.process_time() - c0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    med = statistics.median(step_s)
    return dict(depth=depth, batch=batch, seq=seq, vocab=vocab, device=str(device), dtype=str(compute_dtype(device)),
                fp8=fp8, kernels=opt.kernels, ortho_dtype=str(opt.ortho_dtype),
                threads=torch.get_num_threads(), steps=steps, first_step_s=first, step_s_median=med,
                step_s_min=min(step_s),
                step_s_max=max(step_s), cpu_s_median=statistics.median(cpu_s),
                page_faults_per_step=statistics.median(faults), tokens_per_s=batch * seq / med,
                optimizer_share=statistics.median(opt_s) / med, flops_per_token=p.flops_per_token,
                params_total=p.params.total, memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                                         if device.type == "cuda" else None))


# --compare: name -> (kernels, ortho_dtype); None = the optimizer's default for that kernel choice
VARIANTS = {"reference": ("reference", torch.float32), "cpu-fp32": ("cpu", torch.float32), "cpu": ("cpu", None)}


def compare(args) -> dict:
    """Every variant steps once per round, in turn; the first `warmup` rounds are not timed."""
    device = torch.device("cpu")
    p = plan(RunSpec(depth=args.depth, seq_len=args.seq, vocab_size=args.vocab, device_batch_size=args.batch,
                     total_batch_size=args.batch * args.seq, gpu_type="cpu", head_dim=args.head_dim))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    variants = dict(VARIANTS)
    if args.compare_compiled:
        variants["compiled"] = ("reference", torch.float32)
    runs, first = {}, {}
    for name, (kernels, ortho) in variants.items():
        torch.manual_seed(0)
        model = build_model(p.arch, device)
        opt = build_optimizer(model, p.optim, kernels=kernels)
        opt.ortho_dtype = ortho or opt.ortho_dtype
        if name == "compiled":  # what trainer/optim.py does on CUDA, here with inductor's C++ backend
            opt._adamw = torch.compile(adamw_update, dynamic=False, fullgraph=True)
            opt._muon = torch.compile(muon_update, dynamic=False, fullgraph=True)
        times = {"step": [], "opt": [], "cpu": [], "opt_cpu": []}
        runs[name] = (model, opt, times, str(opt.ortho_dtype).replace("torch.", ""))
    load_before = os.getloadavg()
    for i in range(args.warmup + args.steps):
        for name, (model, opt, t, _) in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            model(x, y).backward()
            c1, t1 = time.process_time(), time.perf_counter()
            opt.step()
            model.zero_grad(set_to_none=True)
            c2, t2 = time.process_time(), time.perf_counter()
            if i == 0:
                first[name] = t2 - t0
            if i >= args.warmup:
                t["step"].append(t2 - t0)
                t["opt"].append(t2 - t1)
                t["cpu"].append(c2 - c0)
                t["opt_cpu"].append(c2 - c1)
    load_after = os.getloadavg()
    ref = runs["reference"][2]
    out = dict(depth=args.depth, batch=args.batch, seq=args.seq, vocab=args.vocab, threads=torch.get_num_threads(),
               steps=args.steps, warmup=args.warmup, malloc=args.malloc, load_before=load_before,
               load_after=load_after, variants={})
    for name, (model, opt, t, ortho) in runs.items():
        ratios = [a / b for a, b in zip(t["step"], ref["step"])]
        cpu_ratios = [a / b for a, b in zip(t["cpu"], ref["cpu"])]
        opt_ratios = [a / b for a, b in zip(t["opt_cpu"], ref["opt_cpu"])]
        out["variants"][name] = dict(kernels=opt.kernels, ortho_dtype=ortho, step_s_median=statistics.median(t["step"]),
                                     opt_s_median=statistics.median(t["opt"]), first_step_s=first[name],
                                     ratio_to_reference=statistics.median(ratios),
                                     ratio_iqr=_iqr(ratios), cpu_s_median=statistics.median(t["cpu"]),
                                     opt_cpu_s_median=statistics.median(t["opt_cpu"]),
                                     cpu_ratio_to_reference=statistics.median(cpu_ratios),
                                     cpu_ratio_iqr=_iqr(cpu_ratios),
                                     opt_ratio_to_reference=statistics.median(opt_ratios),
                                     tokens_per_s=args.batch * args.seq /
                                     statistics.median(t["step"]))
    return out


def _iqr(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def print_compare(r: dict) -> None:
    print(f"d{r['depth']} batch {r['batch']} x seq {r['seq']}, vocab {r['vocab']}, CPU float32, {r['threads']} "
          f"thread(s), malloc {r['malloc']}; {r['steps']} timed rounds after {r['warmup']} warm-up; load average "
          f"(1/5/15 min) before {'/'.join(f'{v:.2f}' for v in r['load_before'])}, after "
          f"{'/'.join(f'{v:.2f}' for v in r['load_after'])}")
    print("medians per step; CPU = this process's CPU time (robust to other processes' load), wall = elapsed")
    print(f"{'variant':<10} {'kernels':<10} {'NS dtype':<9} {'CPU ms':>7} {'optim CPU ms':>13} {'optim share':>12} "
          f"{'wall ms':>8} {'1st step ms':>12} {'optim CPU / ref':>16} {'CPU / ref (IQR)':>22} {'wall / ref':>10}")
    for name, v in r["variants"].items():
        print(f"{name:<10} {v['kernels']:<10} {v['ortho_dtype']:<9} {v['cpu_s_median'] * 1e3:>7.0f} "
              f"{v['opt_cpu_s_median'] * 1e3:>13.0f} {v['opt_cpu_s_median'] / v['cpu_s_median']:>12.1%} "
              f"{v['step_s_median'] * 1e3:>8.0f} {v['first_step_s'] * 1e3:>12.0f} "
              f"{v['opt_ratio_to_reference']:>16.3f} {v['cpu_ratio_to_reference']:>8.3f} "
              f"({v['cpu_ratio_iqr'][0]:.3f}-{v['cpu_ratio_iqr'][1]:.3f}) {v['ratio_to_reference']:>10.3f}")


# --compare-process: whole configurations, each in its own process (the allocator setting is per process)
CONFIGS = {"before": ("reference", "default"), "kernels": ("cpu", "default"), "after": ("cpu", "keep")}


def compare_process(args) -> dict:
    """Round r runs every configuration once, as a fresh process timing --steps steps after --warmup, in an
    order rotated each round; ratios are per round against "before" (median and range over rounds)."""
    names = list(CONFIGS)
    common = ["--depth", str(args.depth), "--batch", str(args.batch), "--seq", str(args.seq), "--vocab",
              str(args.vocab), "--head-dim", str(args.head_dim), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--device", "cpu"] + (["--threads", str(args.threads)] if args.threads else [])
    rounds: list[dict] = []
    load_before = os.getloadavg()
    for r in range(args.rounds):
        got = {}
        for name in names[r % len(names):] + names[: r % len(names)]:
            kernels, malloc = CONFIGS[name]
            out = subprocess.run([sys.executable, __file__, *common, "--kernels", kernels, "--malloc", malloc],
                                 capture_output=True, text=True, check=True).stdout
            got[name] = json.loads(out.strip().splitlines()[-1])
        rounds.append(got)
    load_after = os.getloadavg()
    res = dict(depth=args.depth, batch=args.batch, seq=args.seq, vocab=args.vocab, threads=args.threads,
               steps=args.steps, warmup=args.warmup, rounds=args.rounds, load_before=load_before,
               load_after=load_after, configs={})
    for name in names:
        steps = [g[name]["step_s_median"] for g in rounds]
        ratios = [g[name]["step_s_median"] / g["before"]["step_s_median"] for g in rounds]
        cpu_ratios = [g[name]["cpu_s_median"] / g["before"]["cpu_s_median"] for g in rounds]
        res["configs"][name] = dict(kernels=CONFIGS[name][0], malloc=CONFIGS[name][1],
                                    ortho_dtype=rounds[0][name]["ortho_dtype"],
                                    step_s_median=statistics.median(steps),
                                    optimizer_share=statistics.median(g[name]["optimizer_share"] for g in rounds),
                                    cpu_s_median=statistics.median(g[name]["cpu_s_median"] for g in rounds),
                                    page_faults_per_step=statistics.median(g[name]["page_faults_per_step"]
                                                                           for g in rounds),
                                    ratio_to_before=statistics.median(ratios), ratio_min=min(ratios),
                                    ratio_max=max(ratios), cpu_ratio_to_before=statistics.median(cpu_ratios),
                                    cpu_ratio_min=min(cpu_ratios), cpu_ratio_max=max(cpu_ratios))
    return res


def print_compare_process(r: dict) -> None:
    print(f"d{r['depth']} batch {r['batch']} x seq {r['seq']}, vocab {r['vocab']}, CPU float32, "
          f"{r['threads'] or 'default'} thread(s); {r['rounds']} rounds of one process per configuration, each "
          f"timing {r['steps']} steps after {r['warmup']}; load average before "
          f"{'/'.join(f'{v:.2f}' for v in r['load_before'])}, after {'/'.join(f'{v:.2f}' for v in r['load_after'])}")
    print("medians per step; CPU = the process's CPU time (robust to other processes' load), wall = elapsed")
    print(f"{'config':<8} {'kernels':<10} {'NS dtype':<15} {'malloc':<8} {'CPU ms':>7} {'page faults':>12} "
          f"{'wall ms':>8} {'optim share':>12} {'CPU / before (min-max)':>23} {'wall / before (min-max)':>24}")
    for name, c in r["configs"].items():
        print(f"{name:<8} {c['kernels']:<10} {c['ortho_dtype']:<15} {c['malloc']:<8} {c['cpu_s_median'] * 1e3:>7.0f} "
              f"{c['page_faults_per_step']:>12,.0f} {c['step_s_median'] * 1e3:>8.0f} {c['optimizer_share']:>12.1%} "
              f"{c['cpu_ratio_to_before']:>8.3f} ({c['cpu_ratio_min']:.3f}-{c['cpu_ratio_max']:.3f}) "
              f"{c['ratio_to_before']:>9.3f} ({c['ratio_min']:.3f}-{c['ratio_max']:.3f})")


def largest_batch(args, device: torch.device) -> dict:
    """Try batch 64, 32, ... on CUDA; the first that runs without running out of memory wins."""
    for b in (64, 32, 16, 8, 4, 2, 1):
        try:
            return measure(args.depth, b, args.seq, args.vocab, args.steps, args.warmup, device, args.compile,
                           args.fp8, args.head_dim, args.kernels)
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
    ap.add_argument("--threads", type=int, default=None, help="torch threads (a local run's worker uses 1)")
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM, help="head dimension (the local presets use 64)")
    ap.add_argument("--compare", action="store_true", help="CPU: the optimizer's kernel variants, interleaved")
    ap.add_argument("--compare-compiled", action="store_true", help="with --compare: add a torch.compile'd variant")
    ap.add_argument("--compare-process", action="store_true",
                    help="CPU: before/after configurations (kernels, allocator), one process each, in rounds")
    ap.add_argument("--rounds", type=int, default=5, help="with --compare-process: rounds")
    ap.add_argument("--kernels", choices=KERNELS, default=None, help="trainer/optim.py kernels (default: per device)")
    ap.add_argument("--malloc", choices=("default", "keep"), default="keep",
                    help="keep: trainer/allocator.py's setting, as every CPU training worker applies it")
    args = ap.parse_args()
    if args.malloc == "keep":
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_process:
        r = compare_process(args)
        print_compare_process(r)
        print(json.dumps(r))
        return
    if args.compare:
        r = compare(args)
        print_compare(r)
        print(json.dumps(r))
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if args.batch == 0 and device.type == "cuda":
        r = largest_batch(args, device)
    else:
        r = measure(args.depth, args.batch or 1, args.seq, args.vocab, args.steps, args.warmup, device,
                    None if args.compile is None else bool(args.compile), args.fp8, args.head_dim, args.kernels)

    kind = gpu_type(device)
    peak = GPUS[kind].peak_bf16 if kind else None
    r["gpu_type"], r["peak_flops"] = kind, peak
    r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / peak if peak else None
    print(f"d{r['depth']} batch {r['batch']} x seq {r['seq']} on {r['device']} ({r['dtype']}, {r['threads']} threads): "
          f"step {r['step_s_median'] * 1e3:.1f} ms median (min {r['step_s_min'] * 1e3:.1f}, max "
          f"{r['step_s_max'] * 1e3:.1f}) over {r['steps']} steps; first step {r['first_step_s']:.1f} s")
    print(f"tokens/s: {r['tokens_per_s']:,.0f}; optimizer share of the step: {r['optimizer_share']:.1%} "
          f"({r['kernels']} kernels, Polar Express in {r['ortho_dtype'].replace('torch.', '')})")
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

"""One prepared GPU check: bf16 vs fp8 training throughput, MFU, peak memory vs the memory model, decode speed.

Run by bench/gpu_check.sh on one H100/H200 (or several: then a 2-rank NCCL step is added). Every
measurement runs in its own subprocess with its own timeout, so a crash, an out-of-memory or a hung
compile costs one row, not the table; each row is printed as soon as it is measured, and the table and
the results (JSON) are written to $OUT (or a temp folder). The rows:

- train d12/d20 x bf16/fp8: the real training step (trainer.model.build_model compiled, FlexAttention
  sliding windows, trainer.fp8 for fp8, trainer.optim's Muon+AdamW on one rank) at the device batch
  trainer.plan picks for this GPU (largest power of two the memory model fits; halved and retried on
  an out-of-memory), seq 2048, with the gradient accumulation the reference's 8-GPU run has at that
  depth. tokens/s over the timed optimizer steps after warm-up (compile included there); MFU =
  the planner's FLOPs/token x tokens/s / the GPU's dense bf16 peak (trainer.plan.GPUS), the
  reference's "bf16 MFU" also for fp8; peak memory = torch.cuda.max_memory_allocated vs
  trainer.memory's prediction.
- decode: trainer.engine.Engine on a random-init d12 (KV cache, eager), 1 and 8 samples.
- dist: 2 ranks, NCCL, 2 sharded optimizer steps; checks the ranks end with identical weights.

`--quick` runs the same code paths tiny and uncompiled on CPU (d2, seq 128, gloo for the 2-rank check)
so the script is tested end to end without a GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, kind, depth, precision, timeout seconds), in order of importance for the goals (d20 bf16
# MFU, fp8 speed-up); decode first as it is quick and proves the CUDA model path. Compile (model, FlexAttention,
# one optimizer kernel per parameter shape) takes 1-3 min per config on first use; each row's timeout is also
# cut to what is left of the total budget, and a row that no longer fits is reported as skipped.
FULL = [
    ("decode d12", "decode", 12, "bf16", 45),
    ("train d20 bf16", "train", 20, "bf16", 200),  # the first compile of the optimizer kernels for d20 shapes
    ("train d20 fp8", "train", 20, "fp8", 200),  # reuses them from the inductor cache (same shapes)
    ("train d12 bf16", "train", 12, "bf16", 120),
    ("train d12 fp8", "train", 12, "fp8", 160),
    ("dist 2 ranks", "dist", 4, "bf16", 90),
]
# --quick is the CPU test of the script (tests/test_gpu_check.py), ~30 s on an idle 2-core machine. Its rows'
# timeouts only catch a hang: they are generous, because a loaded test machine can be 10x slower (the CPU fp8
# row took over 60 s under a load average of 30), and a timeout there would fail the test for no fault.
QUICK = [
    ("decode d2", "decode", 2, "bf16", 600),
    ("train d2 bf16", "train", 2, "bf16", 600),
    ("train d2 fp8", "train", 2, "fp8", 600),
    ("dist 2 ranks", "dist", 2, "bf16", 600),
]
TOTAL_BUDGET_S = 480  # the whole table in under 8 minutes (plus start-up)
QUICK_BUDGET_S = 2400  # --quick: only a bound on a hung test


# ---------------------------------------------------------------------------------------------
# Child side: one measurement, printed as one "RESULT <json>" line.


def _gpu_type(torch, device) -> str:
    from trainer.plan.catalog import catalog_gpu

    return catalog_gpu(_device_name(torch, device)) or "h100"  # unknown: measured against the H100 peak, said in the row


def _device_name(torch, device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _setup(quick: bool):
    import torch

    device = torch.device("cpu" if quick or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return torch, device


def _shape(quick: bool) -> dict:
    return dict(seq_len=32, vocab_size=512, head_dim=64) if quick else dict(seq_len=2048)


def run_train(depth: int, precision: str, quick: bool) -> dict:
    torch, device = _setup(quick)
    from trainer.plan import memory
    from trainer.model import build_model
    from trainer.optim import build_optimizer
    from trainer.plan.catalog import GPUS
    from trainer.plan import RunSpec, plan

    kind = _gpu_type(torch, device)
    gpu = GPUS[kind]
    shape = _shape(quick)
    one = plan(RunSpec(depth=depth, gpus=1, gpu_type=kind, precision=precision, stages=("pretrain",), **shape))
    eight = plan(RunSpec(depth=depth, gpus=8, gpu_type="h100", precision=precision, stages=("pretrain",), **shape))
    accum = 1 if quick else eight.grad_accum  # per-GPU work of the reference's 8-GPU run at this depth
    warmup, steps = (1, 2) if quick else (3, 8)
    T = one.arch.seq_len
    dbs = 1 if quick else one.device_batch_size
    tried = []
    r = None
    while r is None and dbs >= 1:
        try:
            r = _time_train(torch, device, one, dbs, accum, warmup, steps, precision, quick,
                            build_model, build_optimizer)
        except torch.OutOfMemoryError:
            tried.append(dbs)
            dbs //= 2
        if r is None:  # outside the except: the failed attempt's tensors are unreachable now
            gc.collect()
            torch.cuda.empty_cache()
    if r is None:
        raise RuntimeError(f"out of memory even at device batch 1 (tried {tried})")
    est = memory.estimate(one.arch, one.params, device_batch_size=dbs, world_size=1, precision=precision,
                          compiled=device.type == "cuda", act_bytes=2 if device.type == "cuda" else 4,
                          memory_gib=gpu.memory_gib)
    tps = dbs * T * accum / r["step_s"]
    return dict(r, depth=depth, precision=precision, batch=dbs, seq=T, accum=accum, oom_at=tried,
                planned_batch=one.device_batch_size, tokens_per_s=tps, gpu_type=kind,
                flops_per_token=one.flops_per_token, peak_flops=gpu.peak_bf16,
                mfu=one.flops_per_token * tps / gpu.peak_bf16,
                predicted_gib=est.peak / memory.GIB, predicted=est.to_dict(),
                params_total=one.params.total, device=_device_name(torch, device))


def _time_train(torch, device, p, dbs, accum, warmup, steps, precision, quick, build_model, build_optimizer):
    import statistics

    torch.manual_seed(0)
    model = build_model(p.arch, device, compile=not quick and device.type == "cuda", fp8=precision == "fp8")
    n_fp8 = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    opt = build_optimizer(model, p.optim)
    g = torch.Generator().manual_seed(1)
    T, V = p.arch.seq_len, p.arch.vocab_size
    data = torch.randint(0, V, (accum, dbs, T + 1), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        for a in range(accum):
            loss = model(data[a, :, :-1], data[a, :, 1:]) / accum
            loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item() * accum)
    measured = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    med = statistics.median(times)
    return dict(step_s=med, step_s_min=min(times), step_s_max=max(times), steps=steps, warmup=warmup,
                warmup_s=time.perf_counter() - t_start - sum(times), measured_gib=measured, fp8_layers=n_fp8,
                first_loss=losses[0], last_loss=losses[-1])


def run_decode(depth: int, quick: bool) -> dict:
    torch, device = _setup(quick)
    from trainer.serve.engine import Engine
    from trainer.model import build_model
    from trainer.plan.shape import architecture

    arch = architecture(depth, **_shape(quick))
    torch.manual_seed(0)
    model = build_model(arch, device, compile=False)
    model.eval()
    engine = Engine(model)
    prompt = list(range(1, 33))
    new = 16 if quick else 256
    out = {}
    for n in (1, 8):
        list(engine.generate(prompt, num_samples=n, max_tokens=4, temperature=1.0))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        k = sum(1 for _ in engine.generate(prompt, num_samples=n, max_tokens=new, temperature=1.0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[f"samples_{n}"] = dict(steps=k, seconds=dt, tokens_per_s=k * n / dt)
    return dict(depth=depth, new_tokens=new, prompt=len(prompt), tokens_per_s=out["samples_1"]["tokens_per_s"],
                tokens_per_s_8=out["samples_8"]["tokens_per_s"], detail=out)


def _dist_rank(rank: int, world: int, port: int, depth: int, quick: bool, q) -> None:
    torch, device = _setup(quick)
    import torch.distributed as dist

    from trainer.model import build_model
    from trainer.optim import build_optimizer
    from trainer.plan import RunSpec, plan

    backend = "gloo" if device.type == "cpu" else "nccl"
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shape = _shape(quick)
        p = plan(RunSpec(depth=depth, gpus=world, gpu_type="cpu" if quick else "h100", stages=("pretrain",),
                         device_batch_size=2, total_batch_size=2 * world * shape.get("seq_len", 2048), **shape))
        torch.manual_seed(0)  # same init on every rank
        model = build_model(p.arch, device, compile=False)
        opt = build_optimizer(model, p.optim, world_size=world, rank=rank)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        T = p.arch.seq_len
        losses = []
        t0 = time.perf_counter()
        for _ in range(2):
            data = torch.randint(0, p.arch.vocab_size, (2, T + 1), generator=g).to(device)
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        check = torch.stack([q_.detach().float().sum() for q_ in model.parameters()]).to(device)
        every = [torch.zeros_like(check) for _ in range(world)]
        dist.all_gather(every, check)
        same = all(torch.equal(every[0], e) for e in every[1:])
        if rank == 0:
            q.put(dict(world=world, backend=backend, same_weights=bool(same), losses=losses,
                       seconds=time.perf_counter() - t0))
    finally:
        dist.destroy_process_group()


def run_dist(depth: int, quick: bool) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_rank, args=(r, 2, port, depth, quick, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    r = None
    while r is None and any(pr.is_alive() for pr in procs):  # read before joining: a queue's writer waits for it
        try:
            r = q.get(timeout=1)
        except queue.Empty:
            pass
    if r is None:  # the ranks may have exited between two reads
        try:
            r = q.get(timeout=2)
        except queue.Empty:
            pass
    for pr in procs:
        pr.join()
    codes = [pr.exitcode for pr in procs]
    if any(codes) or r is None:
        raise RuntimeError(f"rank exit codes {codes}, result {r}")
    if not r["same_weights"]:
        raise RuntimeError(f"ranks disagree on the weights after 2 steps: {r}")
    return r


def child(spec: dict) -> None:
    kind, depth, precision, quick = spec["kind"], spec["depth"], spec["precision"], spec["quick"]
    if kind == "train":
        r = run_train(depth, precision, quick)
    elif kind == "decode":
        r = run_decode(depth, quick)
    else:
        r = run_dist(depth, quick)
    print("RESULT " + json.dumps(r), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side: run each row in its own subprocess, print as it comes.

HEAD = (f"{'check':<16} {'batch':>9} {'tok/s':>11} {'MFU':>6} {'step ms':>8} {'mem GiB':>8} "
        f"{'pred GiB':>8} {'pred/mem':>8}  note")


def fmt_row(name: str, r: dict | None, err: str | None) -> str:
    if err:
        return f"{name:<16} {'-':>9} {'-':>11} {'-':>6} {'-':>8} {'-':>8} {'-':>8} {'-':>8}  FAILED: {err}"
    kind = r.get("_kind")
    if kind == "train":
        mem = r["measured_gib"]
        ratio = f"{r['predicted_gib'] / mem:.2f}" if mem else "-"
        note = f"loss {r['first_loss']:.2f}->{r['last_loss']:.2f}, warm-up {r['warmup_s']:.0f}s"
        if r["oom_at"]:
            note += f", OOM at batch {r['oom_at']}"
        if r["precision"] == "fp8":
            note += f", {r['fp8_layers']} fp8 layers"
        return (f"{name:<16} {str(r['batch']) + 'x' + str(r['accum']):>9} {r['tokens_per_s']:>11,.0f} "
                f"{r['mfu']:>6.1%} {r['step_s'] * 1e3:>8.1f} {mem if mem is not None else float('nan'):>8.1f} "
                f"{r['predicted_gib']:>8.1f} {ratio:>8}  {note}")
    if kind == "decode":
        return (f"{name:<16} {'1':>9} {r['tokens_per_s']:>11,.0f} {'':>6} {1e3 / r['tokens_per_s']:>8.2f} "
                f"{'':>8} {'':>8} {'':>8}  8 samples: {r['tokens_per_s_8']:,.0f} tok/s; {r['new_tokens']} new tokens")
    return (f"{name:<16} {'2':>9} {'':>11} {'':>6} {'':>8} {'':>8} {'':>8} {'':>8}  {r['backend']} OK: ranks agree "
            f"after 2 sharded steps, losses {', '.join(f'{x:.3f}' for x in r['losses'])}, {r['seconds']:.1f}s")


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt)\b.*")


def error_line(stderr: str, returncode: int | None) -> str:
    """The most telling line of a failed child's stderr: the last exception line (torch appends hints after it)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    found = [ln for ln in lines if _EXCEPTION.match(ln)]
    msg = found[-1] if found else (lines[-1] if lines else f"exit code {returncode}, no output")
    return msg[:300]


def run_one(name: str, kind: str, depth: int, precision: str, timeout: float, quick: bool, out_dir: str) -> tuple:
    """Run one row in a child process; its stdout/stderr are kept in out_dir/<row>.log for diagnosis."""
    spec = json.dumps(dict(kind=kind, depth=depth, precision=precision, quick=quick))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, errs = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it spawned (ranks, compile workers)
        out, errs = proc.communicate()
    with open(os.path.join(out_dir, re.sub(r"\W+", "_", name) + ".log"), "w") as f:
        f.write(f"$ {kind} d{depth} {precision} (rc {proc.returncode})\n--- stdout\n{out[-20000:]}\n"
                f"--- stderr\n{errs[-60000:]}\n")
    for line in out.splitlines():
        if line.startswith("RESULT "):  # measured, even if the child then hung on its way out
            r = json.loads(line[len("RESULT "):])
            r["_kind"] = kind
            return r, None
    if timed_out:
        return None, f"timed out after {timeout:.0f}s"
    return None, error_line(errs, proc.returncode)


def environment(quick: bool) -> dict:
    info = dict(python=sys.version.split()[0], quick=quick, date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["gpus"] = torch.cuda.device_count()  # NVML: no CUDA context in this process (the rows need the memory)
    except Exception as e:  # noqa: BLE001 -- reported, not fatal: the rows say what failed
        info["torch_error"] = repr(e)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", default=os.environ.get("GPU_CHECK_QUICK") == "1",
                    help="tiny CPU version of every row (d2, seq 128, no compile, gloo)")
    ap.add_argument("--only", help="comma-separated row names to run (default all)")
    ap.add_argument("--budget", type=float, help=f"seconds for the whole table (default {TOTAL_BUDGET_S}; "
                    f"--quick: {QUICK_BUDGET_S})")
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for results (default $OUT)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # the result is out: skip interpreter teardown (compile worker pools can take a while)
    out = args.out or tempfile.mkdtemp(prefix="gpu_check-")
    os.makedirs(out, exist_ok=True)
    env = environment(args.quick)
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows = QUICK if args.quick else list(FULL)
    if args.budget is None:
        args.budget = QUICK_BUDGET_S if args.quick else TOTAL_BUDGET_S
    if not args.quick and env.get("gpus", 0) < 2:
        rows = [r for r in rows if r[1] != "dist"]
    if args.only:
        want = {w.strip() for w in args.only.split(",")}
        rows = [r for r in rows if r[0] in want]
    print(HEAD, flush=True)
    t0 = time.monotonic()
    results, lines = [], []
    for name, kind, depth, precision, timeout in rows:
        left = args.budget - (time.monotonic() - t0)
        if left < 20:
            r, err = None, "skipped: the time budget is spent"
        else:
            r, err = run_one(name, kind, depth, precision, min(timeout, left), args.quick, out)
        line = fmt_row(name, r, err)
        print(line, flush=True)
        lines.append(line)
        results.append(dict(name=name, kind=kind, depth=depth, precision=precision, error=err, result=r))
    summary = summarize(results)
    for s in summary:
        print(s, flush=True)
    table = "\n".join([HEAD, *lines, *summary])
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(dict(environment=env, results=results, summary=summary,
                       seconds=time.monotonic() - t0), f, indent=2)
    with open(os.path.join(out, "gpu_check.txt"), "w") as f:
        f.write("gpu_check: " + json.dumps(env) + "\n" + table + "\n")
    print(f"gpu_check: {time.monotonic() - t0:.0f}s; wrote {out}/gpu_check.json and gpu_check.txt", flush=True)
    return 0 if all(r["error"] is None for r in results) else 1


def summarize(results: list[dict]) -> list[str]:
    """fp8/bf16 speed-up per depth and the issue's goals (d20 bf16 MFU >= 50%, fp8 >= 1.3x bf16)."""
    train = {(r["depth"], r["precision"]): r["result"] for r in results if r["kind"] == "train" and r["result"]}
    lines = []
    for depth in sorted({d for d, _ in train}):
        b, f = train.get((depth, "bf16")), train.get((depth, "fp8"))
        if b and f:
            lines.append(f"summary: d{depth} fp8/bf16 tokens/s = {f['tokens_per_s'] / b['tokens_per_s']:.3f} "
                         f"(goal >= 1.3); bf16 MFU {b['mfu']:.1%}, fp8 bf16-equivalent MFU {f['mfu']:.1%}")
    if (20, "bf16") in train:
        lines.append(f"summary: d20 bf16 MFU {train[(20, 'bf16')]['mfu']:.1%} (goal >= 50%)")
    for (depth, prec), r in sorted(train.items()):
        if r.get("measured_gib"):  # calibration of trainer/plan/memory.py's activation coefficients
            m = r["predicted"]
            static = m["params"] + m["grads"] + m["optimizer"]
            act = r["measured_gib"] * 2**30 - static
            lines.append(f"summary: d{depth} {prec} memory: measured {r['measured_gib']:.1f} GiB = static "
                         f"{static / 2**30:.1f} + activations {act / 2**30:.1f}; predicted activations "
                         f"{m['activations'] / 2**30:.1f} (measured/predicted {act / m['activations']:.2f}: scale "
                         f"trainer/plan/memory.py COMPILED_ACT_BYTES/COMPILED_LOGIT_BYTES by it)")
    return lines


if __name__ == "__main__":
    sys.exit(main())

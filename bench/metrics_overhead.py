"""Overhead of the Prometheus exporter (trainer/metrics.py) on a training step: per-step time with and without it.

The step is our GPT's (trainer.model + trainer.optim, built from a plan as a run does; a tiny torch MLP if
trainer.model cannot be imported, and the output says so) on CPU. "With" is what a worker does: `on_step`
after the step while a scraper thread fetches /metrics from the RunMetrics HTTP server every
--scrape-interval seconds (1 s by default: 15x a default Prometheus scrape, so the cost is on the high
side). "Without" is the bare step, the scraper paused. The conditions alternate step by step (ABBA), so the
load of a shared machine hits both alike; each pair of neighbouring steps gives one ratio, and the script
prints their median and spread, and the ratio of mean step times over the pairs whose steps are within 1.5x
of the median step (load spikes dropped).

A shared 2-core box is noisy at the 1% level, so the script also times the exporter's two costs directly:
one `on_step` call (in the training thread) and one scrape's rendering (which takes the GIL from the
training thread), and prints the overhead they imply: 1 + (on_step + render x step / scrape interval) / step.

Goal: ratio <= 1.01.
Run: .venv/bin/python bench/metrics_overhead.py            (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request

import torch

from trainer.metrics import RunMetrics
from trainer.plan import RunSpec, plan


def build_step(depth: int, seq: int, batch: int, vocab: int):
    """(step function returning the loss as a float, tokens per step, what model it is)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    try:
        from trainer.model import build_model
        from trainer.optim import build_optimizer
    except ImportError as e:
        model = torch.nn.Sequential(torch.nn.Embedding(vocab, 256), torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, vocab))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> float:
            loss = torch.nn.functional.cross_entropy(model(x).view(-1, vocab), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return step, batch * seq, f"a tiny torch MLP (trainer.model not importable: {e})"
    p = plan(RunSpec(depth=depth, seq_len=seq, vocab_size=vocab, device_batch_size=batch, total_batch_size=batch * seq))
    torch.manual_seed(0)
    model = build_model(p.arch, "cpu", compile=False)
    opt = build_optimizer(model, p.optim)

    def step() -> float:
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step, batch * seq, f"our GPT d{depth} (trainer.model), batch {batch} x seq {seq}, vocab {vocab}"


def scraper(url: str, interval: float, active: threading.Event, stop: threading.Event, count: list) -> None:
    while not stop.wait(interval):
        if active.is_set():
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            count[0] += 1


def on_step_cost(n: int = 20_000) -> float:
    """Seconds per RunMetrics.on_step call (the exporter's work inside the training thread)."""
    p = plan(RunSpec(depth=12, gpus=8))
    m = RunMetrics(p, "pretrain", rank=0, local_rank=0, world_size=8, device_name="NVIDIA H100 80GB HBM3")
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        m.on_step(i, 65_536, 0.5, 0.001, 3.0)
    return (time.perf_counter() - t0) / n


def render_cost(n: int = 2_000) -> float:
    """Seconds to render one scrape of a worker's registry (what the HTTP server does per scrape)."""
    from prometheus_client import generate_latest

    from trainer.metrics import CORE_TASKS

    p = plan(RunSpec(depth=12, gpus=8, budget_cap=100.0))
    m = RunMetrics(p, "pretrain", rank=0, local_rank=0, world_size=8, device_name="NVIDIA H100 80GB HBM3")
    m.on_step(1, 65_536, 0.5, 0.001, 3.0)
    m.on_val(1.0)
    m.on_checkpoint(1.0)
    m.on_core(0.2, dict.fromkeys(CORE_TASKS, 0.2))  # the largest registry a worker has
    t0 = time.perf_counter()
    for _ in range(n):
        generate_latest(m.registry)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--pairs", type=int, default=100, help="pairs of steps (one with, one without)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--scrape-interval", type=float, default=1.0)
    args = ap.parse_args()

    step, tokens, what = build_step(args.depth, args.seq, args.batch, args.vocab)
    run_plan = plan(RunSpec(depth=args.depth, gpus=1, gpu_type="cpu", seq_len=args.seq, num_iterations=10**6))
    metrics = RunMetrics(run_plan, "pretrain", rank=0, local_rank=0, world_size=1, device_name=None, port=0,
                         addr="127.0.0.1")
    active, stop, scrapes = threading.Event(), threading.Event(), [0]
    t = threading.Thread(target=scraper, args=(metrics.url, args.scrape_interval, active, stop, scrapes), daemon=True)
    t.start()

    for _ in range(args.warmup):
        step()
    pairs, n = [], 0
    for i in range(args.pairs):
        pair = {}
        for cond in (("without", "with") if i % 2 == 0 else ("with", "without")):  # ABBA
            (active.set if cond == "with" else active.clear)()
            t0 = time.perf_counter()
            loss = step()
            if cond == "with":
                n += 1
                metrics.on_step(n, tokens, time.perf_counter() - t0, 0.0, loss)
            pair[cond] = time.perf_counter() - t0
        pairs.append(pair)
    stop.set()
    t.join()
    metrics.close()

    ratios = [p["with"] / p["without"] for p in pairs]
    q = statistics.quantiles(ratios, n=4)
    typical = statistics.median([p[c] for p in pairs for c in p])
    calm = [p for p in pairs if max(p.values()) <= 1.5 * typical]
    mean_ratio = (sum(p["with"] for p in calm) / sum(p["without"] for p in calm)) if calm else float("nan")
    call, render = on_step_cost(), render_cost()
    implied = 1 + (call + render * typical / args.scrape_interval) / typical
    result = dict(model=what, threads=torch.get_num_threads(), pairs=len(pairs), step_s_median=typical,
                  ratio_median=statistics.median(ratios), ratio_q1=q[0], ratio_q3=q[2], calm_pairs=len(calm),
                  ratio_mean_calm=mean_ratio, scrapes=scrapes[0], scrape_interval_s=args.scrape_interval,
                  on_step_s=call, render_s=render, ratio_implied=implied)
    print(f"step: {what} on CPU ({result['threads']} threads): {typical * 1e3:.1f} ms median over "
          f"{2 * len(pairs)} steps")
    print(f"with/without, per neighbouring pair: median {result['ratio_median']:.3f} (IQR {q[0]:.3f}-{q[2]:.3f}); "
          f"mean over {len(calm)} calm pairs {mean_ratio:.3f}; {scrapes[0]} scrapes every {args.scrape_interval:g} s")
    print(f"exporter costs: on_step {call * 1e6:.1f} us per step, one scrape rendered in {render * 1e6:.0f} us "
          f"-> implied ratio {implied:.5f}")
    print(f"goal <= 1.01: {'met' if max(implied, result['ratio_median']) <= 1.01 else 'NOT met'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

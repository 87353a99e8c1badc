"""Serving throughput and latency: `llmctl serve` over HTTP vs the same batching engine called in-process.

One run of this script builds a model with the local run's shape (d4, 256 wide, head_dim 64, context 512; the
vocabulary is the tokenizer's, trained on a small built-in text) and
random unit-scale weights, saves it as a run (plan, tokenizer, SFT checkpoint) in a temp dir, then at
concurrency 1, 4 and 16 (clients that each send requests back to back) measures:

- in-process: trainer/serve/batching.py's BatchEngine in this process, requests submitted from client threads;
- served: the same run behind trainer/serve/app.py on a local Ray Serve (one replica), streamed completions over
  HTTP (the SSE path the chat page and the openai client use), parsed by a minimal client;
- and once, the one-request-at-a-time baseline: trainer/serve/engine.py `Engine.generate` called sequentially.

Every request is the same kind: a 12-token prompt, 64 greedy new tokens (the prompts differ per request).
Prints tokens/s and p50/p99 time to first token (arrival -> first token) per path, and served/in-process
ratios. torch runs 1 thread in both paths (the replica gets one CPU).

Run: .venv/bin/python bench/serve.py [--requests-per-client 4] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request

import torch

TEXT = " ".join(f"the {a} {b} runs over the {c} and stops at {n}" for n, (a, b, c) in enumerate(
    [("quick", "fox", "dog"), ("small", "model", "cluster"), ("ray", "replica", "queue"), ("kube", "pod", "node")]
    * 400))


def build_run(root: str):
    from trainer import checkpoint
    from trainer.launch import write_plan
    from trainer.model import build_model
    from trainer.plan import RunSpec, plan
    from trainer.data.tokenizer import Tokenizer

    tok = Tokenizer.train([TEXT], vocab_size=4096)  # a small corpus: fewer merges; the model matches its size
    p = plan(RunSpec(depth=4, gpus=1, gpu_type="cpu", vocab_size=tok.vocab_size, seq_len=512, head_dim=64, device_batch_size=4,
                     total_batch_size=4 * 512, num_iterations=4, sft_tokens=4 * 512 * 2, storage_root=f"file://{root}",
                     name="bench", stages=("pretrain", "sft"), dataset="sample", sft_dataset="sample-sft",
                     tokenizer="bench"))
    write_plan(p, {})
    tok.save(p.urls["tokenizer"])
    torch.manual_seed(0)
    model = build_model(p.arch, "cpu", compile=False)
    with torch.no_grad():  # unit-scale weights: every layer matters, logits spread (bench/decode.py does the same)
        for name, w in model.named_parameters():
            if w.dim() >= 2:
                w.copy_(torch.randn_like(w) * (1.0 if "wte" in name or "value_embeds" in name else w.size(-1) ** -0.5))
    checkpoint.save(f"{p.urls['run'][len('file://'):]}/sft/{checkpoint.dir_name('sft', 1)}", model=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loader_state={}, rank=0, world_size=1,
                    step=1, stage="sft", run=p.name, loop_state={})
    return p, model.eval(), tok


def prompts(n: int) -> list[str]:
    words = TEXT.split()
    return [" ".join(words[7 * i: 7 * i + 9]) for i in range(n)]


def drive(concurrency: int, per_client: int, one) -> tuple[float, int, list[float]]:
    """`concurrency` client threads, each making `per_client` calls of one(i) -> (ttft, tokens); returns
    (wall seconds, tokens, TTFTs)."""
    texts = prompts(concurrency * per_client)
    ttfts, tokens, lock = [], [0], threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            ttft, n = one(texts[c * per_client + k])
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, tokens[0], ttfts


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    torch.set_num_threads(1)

    from trainer.serve.batching import BatchEngine
    from trainer.serve.engine import CHAT_STOP_TOKENS, Engine

    root = tempfile.mkdtemp(prefix="llmctl-bench-serve-")
    p, model, tok = build_run(root)
    stops = [tok.encode_special(s) for s in CHAT_STOP_TOKENS]
    m = args.max_tokens

    def encode(text):
        return tok.encode(text, prepend_bos=True)

    # --- the one-at-a-time baseline: Engine.generate, sequential
    seq = Engine(model, stop_tokens=stops)

    def sequential(text):
        t0 = time.perf_counter()
        first, n = None, 0
        for col in seq.generate(encode(text), max_tokens=m, temperature=0.0):
            if col[0] in seq.stop_tokens:
                break
            first = first or time.perf_counter() - t0
            n += 1
        return first or 0.0, n

    results = {}
    wall, n, tt = drive(1, args.requests_per_client * 4, sequential)
    results["sequential"] = (wall, n, tt)

    # --- in-process: the batching engine, submitted from client threads
    engine = BatchEngine(model, max_len=p.arch.seq_len, stop_tokens=stops, max_batch=16, max_queue=64,
                         vocab_size=tok.vocab_size).start()

    def inprocess(text):
        done, first, count = threading.Event(), [None], [0]
        t0 = time.perf_counter()

        def emit(token, finish):
            if token is not None:
                first[0] = first[0] or time.perf_counter() - t0
                count[0] += 1
            if finish is not None:
                done.set()

        engine.submit(encode(text), max_tokens=m, emit=emit, temperature=0.0)
        done.wait()
        return first[0] or 0.0, count[0]

    for c in args.concurrency:
        before = engine.stats.rows + engine.stats.prefills
        wall, _, tt = drive(c, args.requests_per_client, inprocess)
        results[("in-process", c)] = (wall, engine.stats.rows + engine.stats.prefills - before, tt)
    engine.stop()

    # --- served: Ray Serve on this machine, streamed completions over HTTP
    import ray
    from ray import serve

    from trainer.serve.app import start_local

    port = 8765
    start_local({"run_url": p.urls["run"], "max_batch": 16, "max_queue": 64, "metrics_port": 0,
                 "cpus_per_replica": 1}, port=port, num_cpus=2)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def served(text):
        body = json.dumps({"model": p.name, "prompt": text, "max_tokens": m, "temperature": 0.0,
                           "stream": True}).encode()
        t0 = time.perf_counter()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        first, n = None, 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                if json.loads(line[6:])["choices"][0]["text"]:
                    first = first or time.perf_counter() - t0
        return first or 0.0, 0  # tokens: the engine's own count (text chunks can merge tokens), see below

    try:
        for c in args.concurrency:
            before = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())["engine"]
            wall, _, tt = drive(c, args.requests_per_client, served)
            after = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())["engine"]
            n = (after["rows"] - before["rows"]) + (after["prefills"] - before["prefills"])
            results[("served", c)] = (wall, n, tt)
    finally:
        serve.shutdown()
        ray.shutdown()

    a = p.arch
    print(f"model d{a.n_layer} {a.n_embd} wide, context {a.seq_len}, vocab {tok.vocab_size}; {m} greedy tokens "
          f"per request, {args.requests_per_client} requests per client; 1 torch thread")
    wall, n, tt = results["sequential"]
    print(f"{'path':24s} {'conc':>4s} {'tokens':>7s} {'tokens/s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s}")
    print(f"{'Engine.generate, serial':24s} {1:4d} {n:7d} {n / wall:9.1f} {pct(tt, .5) * 1e3:7.1f}ms "
          f"{pct(tt, .99) * 1e3:7.1f}ms")
    for c in args.concurrency:
        for path in ("in-process", "served"):
            wall, n, tt = results[(path, c)]
            print(f"{path:24s} {c:4d} {n:7d} {n / wall:9.1f} {pct(tt, .5) * 1e3:7.1f}ms {pct(tt, .99) * 1e3:7.1f}ms")
    print("ratios served / in-process (tokens/s; TTFT p50, p99):")
    for c in args.concurrency:
        (wi, ni, ti), (ws, ns, ts) = results[("in-process", c)], results[("served", c)]
        print(f"  concurrency {c:2d}: tokens/s {ns / ws / (ni / wi):.2f}x; TTFT p50 {pct(ts, .5) / pct(ti, .5):.2f}x, "
              f"p99 {pct(ts, .99) / pct(ti, .99):.2f}x")
    wall, n, _ = results["sequential"]
    best = max(args.concurrency)
    wi, ni, _ = results[("in-process", best)]
    print(f"batching gain in-process at concurrency {best}: {ni / wi / (n / wall):.2f}x the serial tokens/s")
    print("median TTFT in-process by concurrency: "
          + ", ".join(f"{c}: {statistics.median(results[('in-process', c)][2]) * 1e3:.1f}ms" for c in args.concurrency))


if __name__ == "__main__":
    main()

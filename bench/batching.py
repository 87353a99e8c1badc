"""Continuous batching vs one request at a time: trainer/serve/batching.py's BatchEngine against Engine.generate.

Same model, same prompts, one run: `--requests` requests of `--prompt-tokens` random tokens and `--new-tokens`
greedy new tokens each. The serial path runs them one after another through `Engine.generate`. The batched
path submits them all to a `BatchEngine` with `--max-batch` rows, which decodes up to that many per step.
Prints tokens/s of each, the ratio, the mean rows per decode step, and how many requests came out token for
token equal to the serial path (greedy: all of them in fp32; in bf16 the batched attention reduces in another
order, so near-ties can flip).

Random unit-scale weights (bench/decode.py's recipe) in the shape trainer.plan.architecture gives `--depth`.
Runs on CPU in fp32 or, with `--device cuda`, in the model's bf16 compute dtype.

Run: .venv/bin/python bench/batching.py [--device cuda --depth 20 --requests 64 --max-batch 64]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch


def random_model(depth: int, seq_len: int, vocab: int, head_dim: int, device: str):
    from trainer.model import build_model
    from trainer.plan.shape import architecture

    torch.manual_seed(0)
    model = build_model(architecture(depth, vocab_size=vocab, seq_len=seq_len, head_dim=head_dim), device,
                        compile=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * (1.0 if "wte" in name or "value_embeds" in name else p.size(-1) ** -0.5))
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from trainer.serve.batching import BatchEngine
    from trainer.serve.engine import Engine

    dev = args.device
    model = random_model(args.depth, args.seq_len, args.vocab, args.head_dim, dev)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (args.prompt_tokens + i % 7,), generator=g).tolist()
               for i in range(args.requests)]
    n = args.new_tokens

    serial = Engine(model)
    serial.generate_batch(prompts[0], max_tokens=4, temperature=0.0)  # warm-up (kernels, allocator)
    sync(dev)
    t0 = time.perf_counter()
    ref = [serial.generate_batch(p, max_tokens=n, temperature=0.0)[0] for p in prompts]
    sync(dev)
    t_serial = time.perf_counter() - t0

    engine = BatchEngine(model, max_len=args.prompt_tokens + 7 + n, max_batch=args.max_batch,
                         max_queue=args.requests)
    outs = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def collector(i):
        def emit(token, finish):
            if token is not None:
                outs[i].append(token)
            if finish is not None:
                done.release()
        return emit

    warm = threading.Event()
    engine.submit(prompts[0], max_tokens=4, temperature=0.0, emit=lambda t, f: f and warm.set())
    engine.start()
    warm.wait()
    steps0, rows0 = engine.stats.steps, engine.stats.rows
    sync(dev)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(p, max_tokens=n, temperature=0.0, emit=collector(i))
    for _ in prompts:
        done.acquire()
    sync(dev)
    t_batched = time.perf_counter() - t0
    engine.stop()

    tokens = sum(len(r) for r in ref)
    steps, rows = engine.stats.steps - steps0, engine.stats.rows - rows0
    equal = sum(a == b for a, b in zip(outs, ref))
    a = model.arch
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"model d{a.n_layer} {a.n_embd} wide, vocab {a.vocab_size}, {model.cos.dtype} on {name}; {args.requests} "
          f"requests x ({args.prompt_tokens}-{args.prompt_tokens + 6} prompt + {n} greedy) tokens; max batch "
          f"{args.max_batch}")
    print(f"{'path':28s} {'seconds':>8s} {'tokens/s':>10s}")
    print(f"{'serial Engine.generate':28s} {t_serial:8.2f} {tokens / t_serial:10.1f}")
    print(f"{'BatchEngine (continuous)':28s} {t_batched:8.2f} {sum(map(len, outs)) / t_batched:10.1f}")
    print(f"ratio {t_serial / t_batched:.2f}x; {steps} decode steps, {rows / max(steps, 1):.1f} rows per step; "
          f"{equal}/{len(prompts)} requests token-for-token equal to the serial path")


if __name__ == "__main__":
    main()

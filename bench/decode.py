"""Decoding speed: KV-cache engine vs recomputing the whole sequence for every new token, same model, one run.

Greedy decoding of N new tokens (default 256) after a short prompt, on CPU, with the local run's model shape
(d4: 256 wide, head_dim 64, SSSL windows, 4,096-token vocabulary). Weights are random at unit scale, so
the two paths must also agree token for token (printed). Prints tokens/s of each and the ratio (goal >= 5x).
The two paths alternate over `--repeats` rounds so machine noise hits both alike; medians are compared.

Run: .venv/bin/python bench/decode.py [--new-tokens 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def random_model(depth: int, seq_len: int, vocab: int, head_dim: int, seed: int = 0):
    from trainer.model import build_model
    from trainer.plan.shape import architecture

    torch.manual_seed(seed)
    model = build_model(architecture(depth, vocab_size=vocab, seq_len=seq_len, head_dim=head_dim), "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * (1.0 if "wte" in name or "value_embeds" in name else p.size(-1) ** -0.5))
    return model.eval()


@torch.no_grad()
def recompute(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512, help="the model's context (windows: S = T/4 rounded to 128)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady on a shared box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from trainer.serve.engine import Engine

    model = random_model(args.depth, args.seq_len, args.vocab, args.head_dim)
    prompt = torch.randint(0, args.vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(model)
    n = args.new_tokens
    cached, full = [], []
    same = True
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = engine.generate_batch(prompt, max_tokens=n, temperature=0.0)[0]
        cached.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = recompute(model, prompt, n)
        full.append(time.perf_counter() - t0)
        same = same and a == b
    tc, tf = statistics.median(cached), statistics.median(full)
    a = model.arch
    print(f"model d{a.n_layer} {a.n_embd} wide, windows {a.windows}, vocab {a.vocab_size}; prompt {len(prompt)} "
          f"tokens, {n} new, greedy, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'path':24s} {'seconds':>8s} {'tokens/s':>9s}")
    print(f"{'KV cache (engine)':24s} {tc:8.2f} {n / tc:9.1f}")
    print(f"{'full recompute':24s} {tf:8.2f} {n / tf:9.1f}")
    print(f"ratio {tf / tc:.1f}x (goal >= 5x); same tokens: {same}")


if __name__ == "__main__":
    main()

"""Inference: the GPT with a key/value cache, sampling, and N continuations from one prompt.

Without a cache, every new token re-runs the whole sequence through the model (quadratic work). With
one, the prompt is run once (prefill) and each later step feeds only the newest token, whose query
attends to keys and values stored from earlier steps (nanochat `engine.py`; docs/recipe.md):

- `KVCache` preallocates, per layer, keys and values of shape (B, n_kv_head, max_len, head_dim) in the
  model's compute dtype: the (B, H, T, D) layout SDPA reads, so a layer's view needs no transpose.
  Sliding-window layers read only the last `window + 1` positions; rotary positions continue from the
  cache position; the smear's previous-token embedding is kept in the cache between steps.
- `Engine.generate` prefills the prompt once with batch 1, replicates the cache into N rows (a copy, not
  a recomputation), then samples one token per row per step and streams each step's column. A row is
  finished at its first stop token (`<|assistant_end|>` or `<|bos|>` for chat); generation ends when
  every row has finished or after `max_tokens`.
- Sampling: temperature 0 = argmax; otherwise optional top-k, divide by the temperature, softmax, and
  draw from a seeded `torch.Generator`, so the same seed gives the same text.

The model side (trainer/model.py) calls `KVCache.attend` in each attention layer and `advance` once per
forward; everything else about caching lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

DEFAULT_SEED = 42  # nanochat Engine.generate's default seed
CHAT_STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")  # a chat reply ends at either (nanochat engine.py)


class KVCache:
    """Keys and values of every layer for `batch` rows, preallocated to `max_len` positions.

    All rows advance together (one prompt, N continuations), so one position counter serves them all.
    `prev_embedding` (B, 1, n_embd) is the last token's normed embedding, which the smear of the next
    token mixes in; None before the first token.
    """

    def __init__(self, *, n_layer: int, n_kv_head: int, head_dim: int, windows: tuple[int, ...], batch: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if len(windows) != n_layer:
            raise ValueError(f"windows: {len(windows)} given for {n_layer} layers")
        if batch < 1 or max_len < 1:
            raise ValueError(f"batch and max_len must be >= 1, got {batch} and {max_len}")
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.windows = tuple(windows)
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, *, batch: int, max_len: int) -> KVCache:
        """A cache shaped for `model` (a trainer.model.GPT): its layers, heads, windows and compute dtype."""
        a = model.arch
        return cls(n_layer=a.n_layer, n_kv_head=a.n_kv_head, head_dim=a.head_dim, windows=a.windows,
                   batch=batch, max_len=max_len, dtype=model.cos.dtype, device=model.cos.device)

    @property
    def batch(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new positions' k, v (B, Hkv, T, D) for `layer`, then attend q (B, H, T, D) to the cache.

        Query at absolute position i sees keys j with j <= i and i - j <= window (FA3's window_size=(w, 0)),
        the same rule as the full forward. Only the keys some new query can see are read.
        """
        T, p = q.size(2), self.pos
        end = p + T
        if end > self.max_len:
            raise ValueError(f"kv_cache: {end} positions exceed the cache's {self.max_len}")
        self.k[layer, :, :, p:end] = k
        self.v[layer, :, :, p:end] = v
        w = self.windows[layer]
        lo = max(0, p - w)  # the oldest key the first new query can see
        keys, values = self.k[layer, :, :, lo:end], self.v[layer, :, :, lo:end]  # (B, Hkv, end - lo, D)
        gqa = q.size(1) != keys.size(1)
        if T == 1:  # decode: the slice is exactly what the query sees
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        qi = torch.arange(p, end, device=q.device)[:, None]
        kj = torch.arange(lo, end, device=q.device)[None, :]
        mask = (kj <= qi) & (qi - kj <= w)  # (T, end - lo)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)

    def advance(self, n: int) -> None:
        """Called by the model after its last layer: n positions were written."""
        self.pos += n

    def replicate(self, n: int) -> KVCache:
        """A new cache of n rows, each a copy of this single-row cache (prefill once, sample n times)."""
        if self.batch != 1:
            raise ValueError(f"replicate: the cache has {self.batch} rows; only a 1-row cache is replicated")
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k.repeat(1, n, 1, 1, 1), self.v.repeat(1, n, 1, 1, 1)
        out.windows, out.pos = self.windows, self.pos
        out.prev_embedding = None if self.prev_embedding is None else self.prev_embedding.repeat(n, 1, 1)
        return out


def sample_next(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                top_k: int | None = None) -> torch.Tensor:
    """One token per row from fp32 logits (B, V): argmax at temperature 0, else top-k / temperature / softmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        probs = F.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) index into the top k
        return indices.gather(-1, choice).squeeze(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    """Generates from a trainer.model.GPT with a KV cache. `stop_tokens`: ids that end a row."""

    def __init__(self, model, *, stop_tokens: Iterable[int] = ()) -> None:
        self.model = getattr(model, "_orig_mod", model)  # the cached path runs eagerly
        self.stop_tokens = frozenset(stop_tokens)

    @classmethod
    def for_chat(cls, model, tokenizer) -> Engine:
        """An engine whose rows end at `<|assistant_end|>` or `<|bos|>`."""
        return cls(model, stop_tokens=[tokenizer.encode_special(name) for name in CHAT_STOP_TOKENS])

    @property
    def device(self) -> torch.device:
        return self.model.cos.device

    @torch.no_grad()
    def generate(self, prompt: list[int], *, num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int = DEFAULT_SEED) -> Iterator[list[int]]:
        """Yield, at each step, the list of `num_samples` new token ids (one per row).

        A row that produced a stop token has finished: the stop token is yielded once and whatever the row
        yields afterwards is padding to be ignored (see `generate_batch`). Ends when every row finished or
        after `max_tokens` steps; never runs past the model's rotary table.
        """
        if not prompt:
            raise ValueError("prompt: needs at least one token (start it with <|bos|>)")
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: must be >= 1 or None, got {top_k}")
        limit = self.model.cos.size(1)  # positions the rotary table covers
        if len(prompt) >= limit:
            raise ValueError(f"prompt: {len(prompt)} tokens leave no room in the model's {limit} positions")
        max_tokens = min(max_tokens, limit - len(prompt))
        model, device = self.model, self.device
        rng = torch.Generator(device=device).manual_seed(seed)

        cache = KVCache.for_model(model, batch=1, max_len=len(prompt) + max_tokens)
        logits = model(torch.tensor([prompt], dtype=torch.long, device=device), kv_cache=cache)[:, -1]
        cache = cache.replicate(num_samples)
        logits = logits.expand(num_samples, -1)  # (N, V): every row starts from the same prefill
        done = [False] * num_samples
        for step in range(max_tokens):
            nxt = sample_next(logits, rng, temperature, top_k)  # (N,)
            column = nxt.tolist()
            yield column
            done = [d or t in self.stop_tokens for d, t in zip(done, column)]
            if all(done) or step == max_tokens - 1:
                return
            logits = model(nxt[:, None], kv_cache=cache)[:, -1]

    def generate_batch(self, prompt: list[int], *, num_samples: int = 1, **kwargs) -> list[list[int]]:
        """The `num_samples` continuations of `prompt`, each cut before its first stop token."""
        rows: list[list[int]] = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column in self.generate(prompt, num_samples=num_samples, **kwargs):
            for i, t in enumerate(column):
                if done[i]:
                    continue
                if t in self.stop_tokens:
                    done[i] = True
                else:
                    rows[i].append(t)
        return rows


def stream_text(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces for a stream of token ids, holding back bytes that do not yet form whole characters.
    Rendered by `tokenizer.decode_text` when it has one (no raw special tokens: tool calls as `<<expr=value>>`);
    a piece already shown is never taken back, so an open tool call shows as `<<expr` until it closes."""
    final = getattr(tokenizer, "decode_text", tokenizer.decode)
    partial = (lambda ids: tokenizer.decode_text(ids, partial=True)) if hasattr(tokenizer, "decode_text") else final
    ids: list[int] = []
    shown = 0
    for t in tokens:
        ids.append(t)
        text = partial(ids)
        stable = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD for now
        if stable > shown:
            yield text[shown:stable]
            shown = stable
    text = final(ids)
    if len(text) > shown:
        yield text[shown:]

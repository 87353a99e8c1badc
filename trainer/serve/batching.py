"""Continuous batching: many generation requests share each decode step of one model, joining and leaving freely.

`Engine.generate` (trainer/serve/engine.py) serves one prompt: every row of its cache sits at the same position.
A server meets prompts of different lengths that arrive at different times, so here each row has its own
position and the batch changes between steps (continuous batching, as in Orca, Yu et al. OSDI 2022, and vLLM):

- A new request is prefilled alone with the ordinary `KVCache` (exactly `Engine.generate`'s prefill); its keys,
  values and smear embedding are then copied into a free row of the shared `BatchCache`, and its first token is
  sampled from the prefill logits.
- Each decode step runs the model once on the newest token of every active row: `(rows, 1)`. Rows attend only
  to their own keys (a per-row causal + sliding-window mask over the columns in use).
- Rotary positions per row without touching the model: the model rotates q and k by `cache.pos`, which this
  cache keeps at 0 (the identity rotation); `attend` then rotates each row's q and k by that row's position.
  RoPE is a rotation of channel pairs and the q/k RMS norm that follows it in the model is rotation-invariant,
  so rotating after the norm equals rotating before it (Su et al. 2021, RoFormer §3.4).
- A row leaves at its stop token or at `max_tokens`; the last row moves into its place, so active rows are
  always rows 0..n-1 and a step computes nothing for empty rows.
- Each request samples with its own temperature, top-k and seeded generator (trainer/serve/engine.py `sample_next`).

Bounds: at most `max_batch` rows decode together; at most `max_queue` requests wait; a prompt plus its
`max_tokens` must fit `max_len` (the server's context). Requests arrive from any thread (`submit`); one engine
thread runs the model; results go back through each request's `emit(token_id | None, finish_reason | None)`.
An exception inside a step fails the requests in flight (finish "error") and the engine carries on.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from trainer.serve.engine import DEFAULT_SEED, KVCache, sample_next
from trainer.model import apply_rotary

DEFAULT_MAX_BATCH = 16  # rows decoded together; bench/serve.py measures concurrency 1, 4 and 16
DEFAULT_MAX_QUEUE = 64  # waiting requests beyond the batch; more get "queue full" (HTTP 503)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should answer 503 and let the client retry."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. `emit(token, finish)` is called from the engine thread: a token id with finish None,
    then once with token None and finish "stop" (a stop token, never emitted), "length" or "error"."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[int | None, str | None], None]
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = DEFAULT_SEED
    generated: int = 0
    last: int = -1
    cancelled: bool = False
    rng: torch.Generator | None = None

    def cancel(self) -> None:
        """The client went away: the engine drops the row at its next step."""
        self.cancelled = True


class BatchCache:
    """Keys/values of up to `rows` sequences, each at its own position; the model sees the first `n` rows.

    Implements the interface trainer/model.py expects of a cache: `pos` (kept 0, see the module docstring),
    `prev_embedding`, `attend(layer, q, k, v)` and `advance(T)`.
    """

    def __init__(self, model, *, rows: int, max_len: int) -> None:
        a = model.arch
        dtype, device = model.cos.dtype, model.cos.device
        shape = (a.n_layer, rows, a.n_kv_head, max_len, a.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._prev = torch.zeros((rows, 1, a.n_embd), dtype=dtype, device=device)
        self.windows = tuple(a.windows)
        self.cos, self.sin = model.cos[0], model.sin[0]  # (P, 1, D/2)
        self.lengths = [0] * rows  # positions stored per row (Python ints: no device sync to read them)
        self.n = 0
        self.pos = 0
        self._step: tuple | None = None  # per-step tensors, built by layer 0 and reused by the others

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def prev_embedding(self) -> torch.Tensor:
        return self._prev[: self.n].clone()  # a copy: the model reads it, then sets the new one in place

    @prev_embedding.setter
    def prev_embedding(self, value: torch.Tensor) -> None:
        self._prev[: self.n] = value

    def put(self, row: int, single: KVCache) -> None:
        """Copy a prefilled 1-row KVCache into `row`."""
        n = single.pos
        if n > self.max_len:
            raise ValueError(f"prefill of {n} positions exceeds the batch cache's {self.max_len}")
        self.k[:, row, :, :n] = single.k[:, 0, :, :n]
        self.v[:, row, :, :n] = single.v[:, 0, :, :n]
        self._prev[row] = single.prev_embedding[0]
        self.lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Row `src` takes the place of row `dst` (whose sequence is finished)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self._prev[dst] = self._prev[src]
        self.lengths[dst] = n

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, T = q.size(0), q.size(2)
        if T != 1:
            raise ValueError(f"BatchCache decodes one token per row, got {T}")
        if layer == 0 or self._step is None:
            pos = self.lengths[:n]
            if max(pos) >= self.max_len:
                raise ValueError(f"kv_cache: position {max(pos)} is past the batch cache's {self.max_len}")
            p = torch.tensor(pos, device=q.device)
            cos, sin = self.cos[p][:, None], self.sin[p][:, None]  # (n, 1, 1, D/2): broadcast over heads
            hi = max(pos) + 1
            self._step = (p, cos, sin, min(pos), hi)
        p, cos, sin, lo_pos, hi = self._step
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # each row at its own position
        rows = torch.arange(n, device=q.device)
        self.k[layer][rows, :, p] = k[:, :, 0]
        self.v[layer][rows, :, p] = v[:, :, 0]
        w = self.windows[layer]
        lo = max(0, lo_pos - w)  # the oldest key some row can see
        keys, values = self.k[layer, :n, :, lo:hi], self.v[layer, :n, :, lo:hi]
        j = torch.arange(lo, hi, device=q.device)[None, :]
        mask = (j <= p[:, None]) & (p[:, None] - j <= w)  # (n, hi - lo): own keys only, within the window
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None, :],
                                              enable_gqa=q.size(1) != keys.size(1))

    def advance(self, n: int) -> None:
        for i in range(self.n):
            self.lengths[i] += n
        self._step = None


@dataclasses.dataclass
class Stats:
    """What the engine did: decode steps, the rows they carried, prefills, and the largest batch seen."""

    steps: int = 0
    rows: int = 0
    prefills: int = 0
    max_rows: int = 0
    errors: int = 0


class BatchEngine:
    """A model served to many callers: `submit` from any thread; one thread prefills, decodes and samples."""

    def __init__(self, model, *, max_len: int, stop_tokens: Iterable[int] = (), max_batch: int = DEFAULT_MAX_BATCH,
                 max_queue: int = DEFAULT_MAX_QUEUE, vocab_size: int | None = None) -> None:
        """`vocab_size`: sample only ids below it (a tokenizer smaller than the model's vocabulary)."""
        self.model = getattr(model, "_orig_mod", model)
        limit = self.model.cos.size(1)
        if not 1 < max_len <= limit:
            raise ValueError(f"max_len: must be in 2..{limit} (the rotary table), got {max_len}")
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.max_len, self.max_batch, self.max_queue = max_len, max_batch, max_queue
        self.stop_tokens = frozenset(stop_tokens)
        self.vocab_size = vocab_size
        self.stats = Stats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._cond = threading.Condition()
        self._cache: BatchCache | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ callers
    def submit(self, prompt: list[int], *, max_tokens: int, emit, temperature: float = 1.0, top_k: int | None = None,
               seed: int = DEFAULT_SEED) -> Request:
        """Queue a request; raises ValueError for bad arguments, QueueFull when max_queue are waiting."""
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the context of "
                             f"{self.max_len} tokens")
        if not temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {top_k}")
        req = Request(list(prompt), max_tokens, emit, temperature, top_k, seed)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the bound is {self.max_queue})")
            self._waiting.append(req)
            self._cond.notify()
        return req

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> BatchEngine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="llmctl-batch-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a bad step fails its requests, never the engine
                self.stats.errors += 1
                for req in [*self._active]:
                    self._finish(req, "error")
                self._active.clear()
                self._cache = None
                print(f"llmctl batch engine: step failed ({type(e).__name__}: {e}); its requests got an error")

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests into free rows (prefill + first token), then one decode step for all rows."""
        if self._cache is None:
            self._cache = BatchCache(self.model, rows=self.max_batch, max_len=self.max_len)
        self._drop_cancelled()
        while len(self._active) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            if req.cancelled:
                continue
            try:
                self._admit(req)
            except Exception as e:  # noqa: BLE001 - a prefill that fails fails its own request only
                self.stats.errors += 1
                self._finish(req, "error")
                print(f"llmctl batch engine: prefill failed ({type(e).__name__}: {e})")
        if not self._active:
            return
        cache, n = self._cache, len(self._active)
        cache.n = n
        idx = torch.tensor([[r.last] for r in self._active], dtype=torch.long, device=self.model.cos.device)
        logits = self.model(idx, kv_cache=cache)[:, -1]
        self.stats.steps += 1
        self.stats.rows += n
        self.stats.max_rows = max(self.stats.max_rows, n)
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        # greedy rows: one argmax over the batch, one device sync; sampling rows draw from their own generators
        greedy = logits.argmax(dim=-1).tolist() if any(r.temperature == 0 for r in self._active) else None
        finished = [i for i, req in enumerate(list(self._active))
                    if self._take(req, logits[i:i + 1], greedy[i] if greedy and req.temperature == 0 else None)]
        for i in reversed(finished):
            self._release(i)

    def _admit(self, req: Request) -> None:
        device = self.model.cos.device
        req.rng = torch.Generator(device=device).manual_seed(req.seed)
        single = KVCache.for_model(self.model, batch=1, max_len=len(req.prompt))
        logits = self.model(torch.tensor([req.prompt], dtype=torch.long, device=device), kv_cache=single)[:, -1]
        self.stats.prefills += 1
        if self._take(req, logits):
            return
        row = len(self._active)
        self._cache.put(row, single)
        self._active.append(req)

    def _take(self, req: Request, logits: torch.Tensor, token: int | None = None) -> bool:
        """Sample the request's next token (unless `token` is its argmax, already taken) and hand it over;
        True when the request is finished."""
        if req.cancelled:
            return True
        if token is None:
            if self.vocab_size is not None:
                logits = logits[:, : self.vocab_size]
            token = int(sample_next(logits, req.rng, req.temperature, req.top_k)[0])
        tok = token
        req.generated += 1
        if tok in self.stop_tokens:
            self._finish(req, "stop")
            return True
        req.last = tok
        try:
            req.emit(tok, None)
        except Exception:  # noqa: BLE001 - a broken consumer leaves the batch; the others carry on
            return True
        if req.generated >= req.max_tokens:
            self._finish(req, "length")
            return True
        return False

    def _finish(self, req: Request, reason: str) -> None:
        try:
            req.emit(None, reason)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the others
            pass

    def _release(self, i: int) -> None:
        last = len(self._active) - 1
        if i != last:
            self._cache.move(last, i)
            self._active[i] = self._active[last]
        self._active.pop()

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._active))):
            if self._active[i].cancelled:
                self._release(i)

"""Pretraining batches: shards of text (trainer/data/shards.py) -> BOS-aligned, best-fit packed (B, T) batches.

`PretrainLoader` (one per rank):
- rank r of W reads row groups r, r+W, r+2W, … of every shard, epoch after epoch (each document is read by
  exactly one rank per epoch); the last shard is the validation split, the rest train;
- only the `text` column chunk of a row group is fetched, with one ranged GET (`ShardReader`); fetching runs
  ahead on I/O threads and tokenizing (tiktoken, numpy output, GIL released) on a producer thread, so both
  overlap the training step;
- packing follows the reference (docs/recipe.md, data): every row of T+1 tokens starts at a document boundary
  (BOS); repeatedly place the largest buffered document that fits whole, else crop the shortest one to fill
  the row (the rest of it is dropped); the buffer is refilled to >= `buffer_size` documents (one row group at
  a time; the reference refills in 128-document slices) before every placement;
- exact resume, stricter than the reference (which skips ahead): `state_dict()` names the last row group
  taken into the buffer and every buffered-but-unused document by (shard, row group, index). A loader built
  with `state=` refetches those documents and continues with exactly the next batch. The state is small
  JSON (a few KB) because it holds references, not tokens;
- storage errors are retried by `ShardReader` (`retries`, default 8 attempts over ~2 min). A shard whose
  bytes do not decode raises `ShardError` naming it, or with `skip_corrupt=True` is skipped, logged and
  counted in `stats["skipped"]`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import queue
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from trainer.data.shards import DataError, ShardError, ShardReader, list_shards

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- packing buffer
class DocBuffer:
    """Documents waiting to be packed, ordered by (length, arrival) for best-fit in O(log n).

    `pop_fit(space)` = the longest document with length <= space, earliest-arrived among equal lengths;
    `pop_shortest()` = the shortest, earliest-arrived among equal lengths. Both match a linear scan over an
    arrival-ordered list with strict `>`/`<` comparisons, i.e. the reference's choices exactly.
    Items are (seq, payload, ref); `length(payload)` is its packed length."""

    def __init__(self, length: Callable = len):
        self._keys: list[tuple[int, int]] = []
        self._items: dict[int, tuple] = {}
        self._seq = 0
        self._length = length

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, payload, ref) -> None:
        self.put_back((self._seq, payload, ref))
        self._seq += 1

    def put_back(self, item: tuple) -> None:
        seq, payload, ref = item
        self._items[seq] = (payload, ref)
        bisect.insort(self._keys, (self._length(payload), seq))

    def _pop(self, j: int) -> tuple:
        _, seq = self._keys.pop(j)
        payload, ref = self._items.pop(seq)
        return seq, payload, ref

    def pop_fit(self, space: int) -> tuple | None:
        i = bisect.bisect_right(self._keys, (space, math.inf)) - 1
        if i < 0:
            return None
        return self._pop(bisect.bisect_left(self._keys, (self._keys[i][0], -1)))

    def pop_shortest(self) -> tuple:
        return self._pop(0)

    def refs(self) -> list:
        """Refs of the buffered items in arrival order."""
        return [self._items[s][1] for s in sorted(self._items)]


# --------------------------------------------------------------------------- reading ahead (producer thread)
_END = object()


class _Reader:
    """One rank's row-group stream: fetches ahead on I/O threads and tokenizes on a producer thread, handing
    `((epoch, shard, rg), arrays)` to the loader through a bounded queue. It holds no reference to the loader,
    so a loader dropped without `close()` is collected, and its finalizer stops this thread."""

    def __init__(self, shards: ShardReader, *, rank: int, world_size: int, epochs: int | None, prefetch: int,
                 io_threads: int, encode: Callable, tokenizer_threads: int, skip_corrupt: bool, where: str):
        self.shards, self.names = shards, [os.path.basename(u) for u in shards.urls]
        self.rank, self.world_size, self.epochs, self.prefetch = rank, world_size, epochs, prefetch
        self.encode, self.tokenizer_threads, self.skip_corrupt, self.where = encode, tokenizer_threads, skip_corrupt, where
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="shard-io")
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.skipped: list[list] = []
        self.thread: threading.Thread | None = None

    def start(self, after, pending=(), restart_epoch=None) -> None:
        self.thread = threading.Thread(target=self._produce, args=(after, list(pending), restart_epoch), daemon=True,
                                       name=f"loader-{self.where}")
        self.thread.start()

    def shutdown(self) -> None:
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        self.io.shutdown(wait=False, cancel_futures=True)

    def positions(self, after) -> Iterator[tuple[int, int, int]]:
        """(epoch, shard, row group) this rank reads next, strictly after `after`: row groups r, r+W, ..."""
        W, r = self.world_size, self.rank
        epoch, s0, rg0 = after if after else (1, 0, None)
        while self.epochs is None or epoch <= self.epochs:
            full_pass, found = s0 == 0 and rg0 is None, False
            for s in range(s0, len(self.names)):
                try:
                    n = self.shards.num_row_groups(s)
                except ShardError as e:
                    if not self.skip_corrupt:
                        raise
                    self.skip(e, s, -1)
                    continue
                first = r if rg0 is None or s != s0 else rg0 + W
                for rg in range(first, n, W):
                    found = True
                    yield epoch, s, rg
            if full_pass and not found:
                raise DataError(f"rank {r} of {W} gets no row groups from {self.where}: "
                                f"use more/smaller row groups or fewer ranks")
            epoch, s0, rg0 = epoch + 1, 0, None

    def skip(self, error: Exception, s: int, rg: int) -> None:
        """Log and count an undecodable shard (rg = -1) or row group, once per location."""
        entry = [self.names[s], rg]
        if entry not in self.skipped:
            log.warning("skipping %s%s: %s", self.names[s], f" row group {rg}" if rg >= 0 else "", error)
            self.skipped.append(entry)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, after, pending, restart_epoch) -> None:
        try:  # after a re-shard (trainer/data/reshard.py): the pooled row groups first, then the rule from restart_epoch
            rule = self.positions((restart_epoch, 0, None) if restart_epoch else after)
            positions = itertools.chain(pending, rule)
            pending: deque = deque()
            while not self.stop.is_set():
                while len(pending) < self.prefetch:
                    pos = next(positions, None)
                    if pos is None:
                        break
                    pending.append((pos, self.io.submit(self.shards.read_row_group, pos[1], pos[2])))
                if not pending:
                    self._put(_END)
                    return
                pos, fut = pending.popleft()
                try:
                    arrays = self.encode(fut.result(), num_threads=self.tokenizer_threads)
                except ShardError as e:
                    if not self.skip_corrupt:
                        raise
                    self.skip(e, pos[1], pos[2])
                    arrays = None
                if not self._put((pos, arrays)):
                    return
        except BaseException as e:  # handed to the consumer, raised there with its own message
            self._put(e)


# --------------------------------------------------------------------------- the loader

class PretrainLoader:
    """Yields `(inputs, targets)` LongTensors of shape (batch_size, seq_len); see the module docstring."""

    progress = None  # the `Loader` protocol (trainer/worker.py): pretraining's schedule goes by step, not data

    def __init__(self, url: str, tokenizer, *, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 split: str = "train", device="cpu", state: dict | None = None, storage_options: dict | None = None,
                 buffer_size: int = 1000, tokenizer_threads: int = 4, prefetch: int = 4, io_threads: int = 2,
                 epochs: int | None = None, retries: int = 8, retry_backoff: float = 1.0,
                 on_retry: Callable[[str, BaseException, int], None] | None = None, skip_corrupt: bool = False):
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("world_size", world_size, 1),
                                 ("buffer_size", buffer_size, 1), ("prefetch", prefetch, 1), ("io_threads", io_threads, 1)):
            if not isinstance(value, int) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if epochs is not None and epochs < 1:
            raise DataError(f"epochs must be >= 1 or None (forever), got {epochs}")
        shards = list_shards(url, storage_options)
        if split == "val":
            shards = shards[-1:]
        elif len(shards) < 2:
            raise DataError(f"{url} has {len(shards)} shard; need >= 2 (the last one is the validation split)")
        else:
            shards = shards[:-1]
        self.url, self.tokenizer, self.split = url, tokenizer, split
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.buffer_size, self.epochs = buffer_size, epochs
        self.bos = tokenizer.bos_id
        encode = getattr(tokenizer, "encode_batch_arrays", None) or (
            lambda texts, num_threads: tokenizer.encode_batch(texts, num_threads=num_threads))
        self._reader = _Reader(ShardReader(shards, storage_options, retries, retry_backoff, on_retry), rank=rank,
                               world_size=world_size, epochs=epochs, prefetch=prefetch, io_threads=io_threads,
                               encode=encode, tokenizer_threads=tokenizer_threads, skip_corrupt=skip_corrupt,
                               where=f"the {split} split of {url} (rank {rank})")
        self._finalizer = weakref.finalize(self, self._reader.shutdown)  # a dropped loader stops its threads
        self._names = self._reader.names
        self._buffer = DocBuffer(length=lambda a: len(a) + 1)  # +1: the BOS written in front
        self._after: tuple[int, int, int] | None = None  # (epoch, shard, row group) last taken into the buffer
        self._exhausted = False
        self._started = False
        self._pending: list[tuple[int, int, int]] = []  # re-shard pool still to take (trainer/data/reshard.py)
        self._restart_epoch: int | None = None
        self.audit: list | None = None  # set to [] to record (shard, row group, index) of every packed document
        self.batches = 0
        self.stats = {"docs": 0, "tokens": 0, "cropped_tokens": 0, "row_groups": 0, "skipped": self._reader.skipped}
        import torch

        self._torch = torch
        self.device = torch.device(device)
        if state is not None:
            self._restore(state)

    # ----------------------------------------------------------- state
    @property
    def epoch(self) -> int:
        return self._after[0] if self._after else 1

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last yielded batch."""
        runs: list[list] = []
        for s, rg, j in self._buffer.refs():
            if runs and runs[-1][0] == self._names[s] and runs[-1][1] == rg:
                runs[-1][2].append(j)
            else:
                runs.append([self._names[s], rg, [j]])
        after = None if self._after is None else [self._after[0], self._names[self._after[1]], self._after[2]]
        state = {"kind": "pretrain", "version": 1, "split": self.split, "rank": self.rank,
                 "world_size": self.world_size, "after": after, "buffer": runs, "batches": self.batches,
                 "skipped": list(self.stats["skipped"])}
        if self._restart_epoch is not None:  # resumed on another world size and not yet back on the rule
            state.update(pending=[[e, self._names[s], rg] for e, s, rg in self._pending], restart_epoch=self._restart_epoch)
        return state

    def _restore(self, state: dict) -> None:
        from trainer.data import reshard

        if state.get("kind") == reshard.LOADER_RESHARD:  # written by another world size: take this rank's share
            state = reshard.partition_loader_states(state["states"], self.rank, self.world_size, names=self._names,
                                                    row_groups=self._reader.shards.num_row_groups, epochs=self.epochs)
        if state.get("kind") != "pretrain" or state.get("version") != 1:
            raise DataError(f"not a pretraining loader state (kind={state.get('kind')!r}, version={state.get('version')!r})")
        for key in ("split", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(f"loader state is for {key}={state[key]!r}, this loader has {getattr(self, key)!r}")
        index = {n: i for i, n in enumerate(self._names)}

        def shard(name: str) -> int:
            if name not in index:
                raise DataError(f"loader state refers to shard {name}, which is not in the {self.split} split of {self.url}")
            return index[name]

        if state["after"] is not None:
            epoch, name, rg = state["after"]
            self._after = (epoch, shard(name), rg)
        self._pending = [(e, shard(name), rg) for e, name, rg in state.get("pending", [])]
        self._restart_epoch = state.get("restart_epoch")
        wanted = [(shard(name), rg, docs) for name, rg, docs in state["buffer"]]
        groups = list(dict.fromkeys((s, rg) for s, rg, _ in wanted))
        reader = self._reader
        texts = dict(zip(groups, reader.io.map(lambda g: reader.shards.read_row_group(*g), groups)))
        for s, rg, docs in wanted:
            arrays = reader.encode([texts[(s, rg)][j] for j in docs], num_threads=reader.tokenizer_threads)
            for j, a in zip(docs, arrays):
                self._buffer.add(a, (s, rg, j))
        self.batches = state["batches"]
        self._reader.skipped[:] = state.get("skipped", [])

    def _take_row_group(self) -> None:
        if not self._started:
            self._reader.start(self._after, self._pending, self._restart_epoch)
            self._started = True
        item = self._reader.queue.get()
        if item is _END:
            self._exhausted = True
            return
        if isinstance(item, BaseException):
            self._reader.queue.put(item)  # keep failing on every call, not just the first
            raise item
        (epoch, s, rg), arrays = item
        self._after = (epoch, s, rg)
        if self._pending:
            self._pending.pop(0)  # taken in order from the front of the pool
        elif self._restart_epoch is not None and epoch >= self._restart_epoch:
            self._restart_epoch = None  # back on the ordinary rule: `after` says it all again
        for j, a in enumerate(arrays or ()):
            self._buffer.add(a, (s, rg, j))
        self.stats["row_groups"] += 1

    # ----------------------------------------------------------- packing (caller's thread)
    def __iter__(self) -> "PretrainLoader":
        return self

    def __next__(self):
        import numpy as np

        cap = self.T + 1
        rows = np.empty((self.B, cap), dtype=np.int64)
        taken: list[tuple] = []
        cropped = 0
        try:
            for r in range(self.B):
                pos = 0
                while pos < cap:
                    while len(self._buffer) < self.buffer_size and not self._exhausted:
                        self._take_row_group()
                    if not len(self._buffer):
                        raise StopIteration  # finite epochs: the partial batch is dropped
                    space = cap - pos
                    item = self._buffer.pop_fit(space) or self._buffer.pop_shortest()
                    taken.append(item)
                    doc = item[1]
                    n = min(len(doc) + 1, space)
                    rows[r, pos] = self.bos
                    rows[r, pos + 1:pos + n] = doc[:n - 1]
                    cropped += len(doc) + 1 - n
                    pos += n
        except BaseException:
            for item in taken:  # leave the buffer as it was, so state_dict() still skips nothing
                self._buffer.put_back(item)
            raise
        self.batches += 1
        if self.audit is not None:
            self.audit.extend((self._names[s], rg, j) for _, _, (s, rg, j) in taken)
        self.stats["docs"] += len(taken)
        self.stats["cropped_tokens"] += cropped
        self.stats["tokens"] += self.B * self.T
        return self._to_device(rows)

    def _to_device(self, rows):
        torch = self._torch
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(rows[:, 1:].copy())
        if self.device.type == "cuda":  # pinned staging, asynchronous copy (the step overlaps it)
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        if self.device.type != "cpu":
            return x.to(self.device), y.to(self.device)
        return x, y

    def close(self) -> None:
        """Stop reading ahead (also done when the loader is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> "PretrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

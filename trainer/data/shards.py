"""Shards: the on-disk layout of pretraining text, and the code that lists, reads and writes it.

Layout (the reference's, ClimbMix as repackaged by nanochat's dev/repackage_data_reference.py; docs/recipe.md
§data): `<url>/shard_00000.parquet …`, one `text` column, row groups of 1024 documents, a shard closed at the
first row-group boundary past ~250M characters, zstd level 3, no dictionary, no statistics. Sorted by name,
the last shard is the validation split, the rest train.

- `list_shards(url)`: the shard URLs under a directory, sorted;
- `ShardReader`: reads the `text` column of one row group with one ranged GET (footers cached). Storage
  errors are retried with exponential backoff (`retries` attempts, enough to ride out an object-store
  restart) on top of what s3fs/botocore retry; bytes that do not decode raise `ShardError` naming the shard
  (decoding is never retried: bad bytes stay bad). Shards are untrusted: the footer's length and each row
  group's uncompressed size (from the footer) are bounded before anything is decoded, and documents are cut
  at MAX_DOC_CHARS (docs/security.md);
- `ShardWriter` / `write_shards`: documents -> shards in the layout above, each file written whole
  (`.tmp`, then renamed); always >= 2 shards, so the last one can be the validation split.

The loader that packs these texts into batches is trainer/data/pretrain.py; corpora (files, Hugging Face datasets,
Python's own docs) are trainer/data/corpus.py.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import threading
import time
from typing import Callable, Iterable

from trainer.progress import progress_bar
from trainer.storage import filesystem

log = logging.getLogger(__name__)

ROW_GROUP_DOCS = 1024  # documents per parquet row group (nanochat repackage_data_reference.py)
SHARD_CHARS = 250_000_000  # a shard is closed at the first row-group boundary past this many characters
SHARD_NAME = "shard_{:05d}.parquet"
TEXT_COLUMN = "text"
FOOTER_GUESS = 1 << 16  # bytes read from a shard's end to find its footer in one request (pyarrow does the same)
# Bounds on untrusted shards (a 10 KB zstd file can decode to 300 MB). A reference row group is 1,024 documents
# of a few KB (~5 MB); 256 MiB of uncompressed text per row group, read from the footer before decoding, is
# 50x that. A document is cut at MAX_DOC_CHARS (4M characters, ~1M tokens: 500 rows of a 2,048 context; the
# packer crops long documents to rows anyway), so no single document makes the tokenizer work unbounded.
MAX_ROW_GROUP_BYTES = 256 << 20
MAX_DOC_CHARS = 1 << 22
MAX_FOOTER_BYTES = 16 << 20  # the parquet footer (schema + row group metadata): a few KB for our layout


class DataError(ValueError):
    """Bad data location or loader configuration (one line, names the URL or field)."""


class ShardError(DataError):
    """A shard that cannot be decoded: truncated, corrupt or missing the text column."""


class StorageError(OSError):
    """Storage kept failing after every retry."""


def list_shards(url: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the `*.parquet` shards directly under `url`, sorted by name."""
    fs, root = filesystem(url, storage_options)
    fs.invalidate_cache(root)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        raise DataError(f"no data at {url} (build shards with `llmctl data prepare` or `llmctl data sample`)") from None
    shards = sorted(os.path.basename(p) for p in names if p.endswith(".parquet"))
    if not shards:
        raise DataError(f"no .parquet shards under {url} (build some with `llmctl data prepare` or `llmctl data sample`)")
    return [f"{url.rstrip('/')}/{name}" for name in shards]


def _permanent(e: BaseException) -> bool:
    """Errors that another attempt cannot fix: missing object, no access, a bad request (s3fs maps S3's 4xx
    answers such as InvalidRange to EINVAL), programming errors. Everything else (connection refused or
    reset, timeouts, 5xx = EIO) is worth retrying."""
    import errno

    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                      ValueError, TypeError, AttributeError, KeyError)):
        return True
    return type(e) is OSError and e.errno == errno.EINVAL


class _Missing(Exception):
    """Raised by `_Sparse` when pyarrow asks for bytes not fetched yet: (start, end)."""


class _Sparse:
    """A read-only, seekable file of `size` bytes of which only some ranges are in memory. pyarrow decodes
    from it; a read outside the ranges raises `_Missing` so the caller can fetch that range and retry. This
    keeps network I/O (retried) apart from decoding (never retried: bad bytes stay bad)."""

    def __init__(self, size: int, chunks: dict[int, bytes]):
        self._size, self.chunks, self._pos, self.closed = size, chunks, 0, False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = (offset, self._pos + offset, self._size + offset)[whence]
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        for start, data in self.chunks.items():
            if start <= self._pos and end <= start + len(data):
                out = data[self._pos - start:end - start]
                self._pos = end
                return out
        raise _Missing(self._pos, end)

    def close(self) -> None:
        self.closed = True


class ShardReader:
    """Reads row groups of a fixed list of shards: footers cached, ranged fetches retried."""

    def __init__(self, urls: list[str], storage_options, retries: int, backoff: float,
                 on_retry: Callable[[str, BaseException, int], None] | None):
        self.urls = urls
        self.fs, _ = filesystem(urls[0], storage_options)
        self.paths = [self.fs._strip_protocol(u) for u in urls]
        self.retries, self.backoff, self.on_retry = max(1, retries), backoff, on_retry
        self._footers: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def _retry(self, fn: Callable, what: str):
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except Exception as e:  # network and server errors: s3fs/botocore already retried what they know
                if _permanent(e):
                    raise
                if attempt == self.retries:
                    raise StorageError(f"{what}: {type(e).__name__}: {e} (gave up after {attempt} attempts)") from e
                log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e,
                            attempt, self.retries - 1, delay)
                if self.on_retry is not None:
                    self.on_retry(what, e, attempt)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)

    def _decode(self, i: int, size: int, chunks: dict[int, bytes], fn: Callable):
        """Run `fn(sparse_file)`, fetching whatever ranges pyarrow asks for; decode errors name the shard."""
        for _ in range(16):
            try:
                return fn(_Sparse(size, chunks))
            except _Missing as m:
                start, end = m.args
                chunks[start] = self._retry(lambda: self.fs.cat_file(self.paths[i], start=start, end=end), f"read {self.urls[i]}")
            except (DataError, StorageError):
                raise
            except Exception as e:  # pyarrow: ArrowInvalid, OSError("... decompression failed"), ...
                raise ShardError(f"corrupt or truncated shard {self.urls[i]}: {e}") from e
        raise ShardError(f"shard {self.urls[i]}: reader kept asking for more byte ranges")

    def footer(self, i: int):
        """(size, footer chunk, parquet metadata, index of the text column) of shard i."""
        with self._lock:
            if i in self._footers:
                return self._footers[i]
        import pyarrow.parquet as pq

        url = self.urls[i]
        size = self._retry(lambda: self.fs.size(self.paths[i]), f"stat {url}")
        if size < 12:
            raise ShardError(f"corrupt or truncated shard {url}: only {size} bytes")
        start = max(0, size - FOOTER_GUESS)
        chunks = {start: self._retry(lambda: self.fs.cat_file(self.paths[i], start=start, end=size), f"read {url}")}
        footer_len = int.from_bytes(chunks[start][-8:-4], "little")  # parquet: <footer> <u32 length> PAR1
        if footer_len > MAX_FOOTER_BYTES:
            raise ShardError(f"corrupt or truncated shard {url}: a {footer_len:,}-byte footer; at most "
                             f"{MAX_FOOTER_BYTES:,}")
        md = self._decode(i, size, chunks, lambda f: pq.ParquetFile(f).metadata)
        names = md.schema.names
        if TEXT_COLUMN not in names:
            raise ShardError(f"shard {url} has no {TEXT_COLUMN!r} column (columns: {names})")
        entry = (size, dict(chunks), md, names.index(TEXT_COLUMN))
        with self._lock:
            self._footers[i] = entry
            while len(self._footers) > 8:
                self._footers.pop(next(iter(self._footers)))
        return entry

    def num_row_groups(self, i: int) -> int:
        return self.footer(i)[2].num_row_groups

    def read_row_group(self, i: int, rg: int) -> list[str]:
        """Texts of row group `rg` of shard `i` (None becomes "")."""
        import pyarrow.parquet as pq

        size, footer, md, col = self.footer(i)
        if rg >= md.num_row_groups:
            raise ShardError(f"shard {self.urls[i]} has {md.num_row_groups} row groups, no row group {rg}")
        cc = md.row_group(rg).column(col)
        # The footer says how big the text is once decompressed: refuse a bomb before allocating for it.
        if cc.total_uncompressed_size > MAX_ROW_GROUP_BYTES or md.row_group(rg).total_byte_size > MAX_ROW_GROUP_BYTES:
            raise ShardError(f"shard {self.urls[i]} row group {rg}: {cc.total_uncompressed_size:,} bytes uncompressed; "
                             f"a row group holds at most {MAX_ROW_GROUP_BYTES:,}")
        start = cc.dictionary_page_offset if cc.has_dictionary_page and cc.dictionary_page_offset else cc.data_page_offset
        end = start + cc.total_compressed_size
        if not 0 <= start < end <= size:
            raise ShardError(f"corrupt shard {self.urls[i]}: row group {rg} points at bytes {start}..{end} of {size}")
        chunks = {**footer, start: self._retry(lambda: self.fs.cat_file(self.paths[i], start=start, end=end),
                                               f"read {self.urls[i]} row group {rg}")}
        texts = self._decode(i, size, chunks, lambda f: pq.ParquetFile(f, metadata=md)
                             .read_row_group(rg, columns=[TEXT_COLUMN]).column(0).to_pylist())
        return [t[:MAX_DOC_CHARS] if t is not None else "" for t in texts]



# --------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes documents as `shard_NNNNN.parquet` files in the reference layout.

    A shard is closed at the first multiple of `row_group_size` documents past `shard_chars` characters. If
    everything fits in one shard, `close()` writes the last tenth of the documents (at least one) as a
    second shard, so there is always a validation split. Each file is written whole (`.tmp`, then renamed)."""

    def __init__(self, out_url: str, *, shard_chars: int = SHARD_CHARS, row_group_size: int = ROW_GROUP_DOCS,
                 storage_options: dict | None = None):
        if shard_chars < 1 or row_group_size < 1:
            raise DataError(f"shard_chars and row_group_size must be >= 1, got {shard_chars}, {row_group_size}")
        self.out_url = out_url.rstrip("/")
        self.fs, self.root = filesystem(out_url, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        self.shard_chars, self.row_group_size = shard_chars, row_group_size
        self._docs: list[str] = []
        self._chars = 0
        self.written: list[str] = []
        self.docs = 0
        self.chars = 0

    def add(self, text: str) -> None:
        self._docs.append(text)
        self._chars += len(text)
        self.docs += 1
        self.chars += len(text)
        if self._chars >= self.shard_chars and len(self._docs) % self.row_group_size == 0:
            self._flush(self._docs)
            self._docs, self._chars = [], 0

    def _flush(self, docs: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table({TEXT_COLUMN: pa.array(docs, type=pa.string())}), buf,
                       row_group_size=self.row_group_size, use_dictionary=False, compression="zstd",
                       compression_level=3, write_statistics=False)
        name = SHARD_NAME.format(len(self.written))
        tmp, final = f"{self.root}/{name}.tmp", f"{self.root}/{name}"
        self.fs.pipe_file(tmp, buf.getvalue())
        self.fs.mv(tmp, final)
        self.written.append(f"{self.out_url}/{name}")

    def close(self) -> list[str]:
        docs, self._docs = self._docs, []
        if not self.written:
            if len(docs) < 2:
                raise DataError(f"need >= 2 documents to make a train and a val shard, got {len(docs)}")
            k = max(1, len(docs) // 10)
            self._flush(docs[:-k])
            docs = docs[-k:]
        if docs:
            self._flush(docs)
        return list(self.written)


def write_shards(texts: Iterable[str], out_url: str, *, shard_chars: int = SHARD_CHARS,
                 row_group_size: int = ROW_GROUP_DOCS, storage_options: dict | None = None,
                 max_docs: int | None = None, show_progress: bool = False, total: int | None = None) -> list[str]:
    """Write `texts` as shards under `out_url`; returns the shard URLs. Nothing is created when the source
    fails before its first document."""
    it = iter(texts)
    first = next(it, None)
    if first is None:
        raise DataError("the source has no documents")
    writer = ShardWriter(out_url, shard_chars=shard_chars, row_group_size=row_group_size,
                         storage_options=storage_options)
    with progress_bar(show_progress, "writing shards", total) as advance:
        for i, text in enumerate(itertools.chain([first], it)):
            if max_docs is not None and i >= max_docs:
                break
            writer.add(text)
            advance(1)
        return writer.close()

"""Writing pretraining corpora in the reference shard layout (see trainer/data.py for the layout and reader).

- `ShardWriter` / `write_shards`: documents -> `shard_NNNNN.parquet` (a `text` column, 1024-doc row groups, zstd
  level 3, no dictionary, no statistics; a shard closed at the first row-group boundary past ~250M characters),
  each file written whole; always >= 2 shards, so the last one can be the validation split.
- `iter_source_texts`: documents from jsonl/json/parquet/txt files (local or fsspec URLs) or a Hugging Face
  dataset, streamed through `datasets` (`llmctl data prepare`).
- `build_sample_corpus`: a real-text corpus made offline from the documentation installed with Python
  (`llmctl data sample`, the embedded default and tests).
"""

from __future__ import annotations

import ast
import io
import itertools
import logging
import math
import os
import random
import re
import sys
import sysconfig
from typing import Callable, Iterable, Iterator

from trainer.data import ROW_GROUP_DOCS, SHARD_CHARS, SHARD_NAME, TEXT_COLUMN, DataError, filesystem

log = logging.getLogger(__name__)


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
    with _progress(show_progress, "writing shards", total) as advance:
        for i, text in enumerate(itertools.chain([first], it)):
            if max_docs is not None and i >= max_docs:
                break
            writer.add(text)
            advance(1)
        return writer.close()


def iter_source_texts(source: str, *, text_column: str = TEXT_COLUMN, split: str = "train",
                      config: str | None = None, storage_options: dict | None = None) -> Iterator[str]:
    """Texts from files (jsonl/json/parquet/txt; a file or a directory, local or at an fsspec URL) or from a
    Hugging Face dataset name, streamed through `datasets` (nothing cached to disk). A .txt file is one
    document."""
    import datasets

    builders = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet", ".txt": "text"}
    if "://" in source or os.path.exists(source):
        fs, root = filesystem(source, storage_options)
        if fs.isfile(root):
            files = [root]
        elif fs.isdir(root):
            files = sorted(p for p in fs.find(root) if os.path.splitext(p)[1] in builders)
        else:
            raise DataError(f"{source}: no such file or directory")
        kinds = {builders.get(os.path.splitext(f)[1]) for f in files}
        if not files or None in kinds:
            raise DataError(f"{source}: expected .jsonl/.json/.parquet/.txt files")
        if len(kinds) != 1:
            raise DataError(f"{source}: mixed file types {sorted(kinds)}; prepare one kind at a time")
        kind = kinds.pop()
        remote = "://" in source and not source.startswith("file://")
        ds = datasets.load_dataset(kind, data_files=[fs.unstrip_protocol(f) if remote else f for f in files],
                                   split="train", streaming=True,
                                   storage_options=fs.storage_options if remote else None,
                                   **({"sample_by": "document"} if kind == "text" else {}))
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not os.path.splitext(source)[1]:  # a Hub dataset, owner/name
        try:
            ds = datasets.load_dataset(source, config, split=split, streaming=True)
        except (FileNotFoundError, ConnectionError, ValueError) as e:
            raise DataError(f"{source}: not a local path, and the Hugging Face Hub did not serve it: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    else:
        raise DataError(f"{source}: no such file or directory")
    for row in ds:
        if text_column not in row:
            raise DataError(f"{source}: rows have no {text_column!r} column (columns: {sorted(row)}); use --text-column")
        if row[text_column]:
            yield row[text_column]


# --------------------------------------------------------------------------- the offline sample corpus
def iter_python_docs(include_site_packages: bool = True) -> Iterator[str]:
    """Real English technical text that every Python install carries: the standard library's docstrings
    (one document per module, class with its methods, or function), pydoc's topic pages, then the docstrings
    of installed packages. Deterministic for a given installation."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]]
    if include_site_packages:
        roots += sorted({paths["purelib"], paths["platlib"]} - {paths["stdlib"]})
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo"}
    for n, root in enumerate(roots):
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in skip and not x.endswith((".dist-info", ".egg-info")))
            for f in sorted(files):
                if f.endswith(".py"):
                    yield from _docs_of(os.path.join(d, f), os.path.relpath(os.path.join(d, f), root))
        if n == 0:
            try:
                from pydoc_data.topics import topics
            except ImportError:
                topics = {}
            for name in sorted(topics):
                yield f"{name}\n\n{topics[name].strip()}"


def _docs_of(path: str, rel: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return
    module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
    if doc := ast.get_docstring(tree):
        yield f"Module {module}\n\n{doc}"
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node)):
            yield f"{module}.{node.name}({_args(node)})\n\n{doc}"
        elif isinstance(node, ast.ClassDef):
            parts = [f"class {module}.{node.name}\n\n{ast.get_docstring(node) or ''}".rstrip()]
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and (doc := ast.get_docstring(sub)):
                    parts.append(f"{node.name}.{sub.name}({_args(sub)}):\n{doc}")
            if len(parts) > 1 or ast.get_docstring(node):
                yield "\n\n".join(parts)


def _args(fn) -> str:
    return ", ".join(a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs)


def build_sample_corpus(out_url: str, *, mb: float = 8.0, shards: int = 4, row_group_size: int = ROW_GROUP_DOCS,
                        seed: int = 42, storage_options: dict | None = None, show_progress: bool = False) -> list[str]:
    """Write ~`mb` MB (1e6 characters per MB) of Python documentation text as >= 2 shards under `out_url`,
    shuffled (so train and val come from the same mix); returns the shard URLs."""
    if mb <= 0 or shards < 2:
        raise DataError(f"need mb > 0 and shards >= 2, got mb={mb}, shards={shards}")
    budget = int(mb * 1e6)
    docs, chars = [], 0
    with _progress(show_progress, "collecting Python docs", budget) as advance:
        for doc in iter_python_docs():
            docs.append(doc)
            chars += len(doc)
            advance(len(doc))
            if chars >= budget:
                break
    if chars < budget:
        log.warning("only %.1f MB of documentation text found (asked for %.1f MB)", chars / 1e6, mb)
    random.Random(seed).shuffle(docs)
    return write_shards(docs, out_url, shard_chars=max(1, math.ceil(chars / shards)), row_group_size=row_group_size,
                        storage_options=storage_options, show_progress=show_progress, total=len(docs))


class _progress:
    """A rich progress bar on stderr when asked (and a no-op otherwise); `advance(n)` inside the block."""

    def __init__(self, show: bool, what: str, total: int | None):
        self.show, self.what, self.total, self._p = show, what, total, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import Progress

        self._p = Progress(console=Console(file=sys.stderr), transient=False)
        self._p.start()
        task = self._p.add_task(self.what, total=self.total)
        return lambda n: self._p.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()

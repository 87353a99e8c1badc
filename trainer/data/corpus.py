"""Pretraining corpora: where documents come from before trainer/data/shards.py writes them as shards.

- `iter_source_texts`: documents from jsonl/json/parquet/txt files (local or fsspec URLs) or a Hugging Face
  dataset, streamed through `datasets` (`llmctl data prepare`).
- `build_sample_corpus`: a real-text corpus made offline from the documentation installed with Python
  (`llmctl data sample`, the embedded default and tests).
"""

from __future__ import annotations

import ast
import logging
import math
import os
import random
import re
import sysconfig
from typing import Iterator

from trainer.progress import progress_bar
from trainer.data.shards import ROW_GROUP_DOCS, TEXT_COLUMN, DataError, write_shards
from trainer.storage import filesystem

log = logging.getLogger(__name__)


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
    with progress_bar(show_progress, "collecting Python docs", budget) as advance:
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

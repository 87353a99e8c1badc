"""trainer/data/shards.py: the shard reader's bounds (hostile input: parquet bombs).

Run: .venv/bin/pytest tests/data/test_shards.py
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _bomb_shard(path: Path, doc_chars: int, n_docs: int = 1) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": ["a" * doc_chars] * n_docs}), path / "shard_00000.parquet",
                   compression="zstd", use_dictionary=False)
    return f"file://{path}/shard_00000.parquet"


def test_hostile_parquet_row_group_size_is_read_from_metadata_before_decoding(tmp_path, monkeypatch):
    from trainer.data import shards

    url = _bomb_shard(tmp_path / "d", 4 << 20)  # 4 MB of 'a': a few hundred compressed bytes
    assert (tmp_path / "d" / "shard_00000.parquet").stat().st_size < 64 << 10
    monkeypatch.setattr(shards, "MAX_ROW_GROUP_BYTES", 1 << 20, raising=False)
    reader = shards.ShardReader([url], {}, retries=1, backoff=0, on_retry=None)
    reader.footer(0)  # the footer is metadata only; decoding the row group is what must not happen
    decoded = []
    monkeypatch.setattr(reader, "_decode", lambda *a, **k: decoded.append(1) or [""])
    with pytest.raises(shards.ShardError, match="uncompressed"):
        reader.read_row_group(0, 0)
    assert not decoded


def test_hostile_documents_are_capped(tmp_path, monkeypatch):
    from trainer.data import shards

    url = _bomb_shard(tmp_path / "d", 5000, n_docs=3)
    monkeypatch.setattr(shards, "MAX_DOC_CHARS", 1000, raising=False)
    texts = shards.ShardReader([url], {}, retries=1, backoff=0, on_retry=None).read_row_group(0, 0)
    assert [len(t) for t in texts] == [1000] * 3


def test_hostile_default_bounds_fit_the_reference_layout():
    from trainer.data import shards

    # a reference row group: 1024 documents; ClimbMix documents average a few KB
    assert shards.MAX_ROW_GROUP_BYTES >= 64 * 1024 * 1024 and shards.MAX_DOC_CHARS >= 1 << 20

"""Corpus writing: the reference shard layout, the val-shard guarantee, and the offline sample corpus.

Run: .venv/bin/pytest tests/data/test_corpus.py -v
"""

from __future__ import annotations

import itertools

from trainer.data.corpus import build_sample_corpus, iter_python_docs, write_shards


def test_shard_layout_is_the_reference(tmp_path):
    import pyarrow.parquet as pq

    urls = build_sample_corpus(str(tmp_path / "s"), mb=0.3, shards=3, row_group_size=32)
    assert len(urls) >= 2 and all(u.endswith(".parquet") for u in urls)
    md = pq.ParquetFile(urls[0]).metadata
    assert md.schema.names == ["text"]
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    assert set(sizes[:-1]) == {32} and sizes[-1] <= 32 and len(pq.read_table(urls[0])) % 32 == 0
    col = md.row_group(0).column(0)
    assert col.compression == "ZSTD" and not col.has_dictionary_page and col.statistics is None
    # everything in one shard's worth: the tail still becomes a val shard
    one = write_shards([f"doc {i}" for i in range(30)], str(tmp_path / "one"), row_group_size=8)
    assert len(one) == 2 and len(pq.read_table(one[1])) == 3


def test_python_docs_are_real_text_and_deterministic():
    first = list(itertools.islice(iter_python_docs(include_site_packages=False), 50))
    assert first == list(itertools.islice(iter_python_docs(include_site_packages=False), 50))
    assert any(d.startswith("Module ") for d in first) and sum(map(len, first)) > 5_000

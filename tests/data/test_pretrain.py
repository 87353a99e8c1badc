"""Pretraining data: shards written by `llmctl data prepare` to a real S3 endpoint (moto on loopback, through
s3fs) and read back by the BOS best-fit loader on 2 simulated ranks.

Checks: every row starts with BOS and holds whole-document prefixes; no document is read twice across ranks
in an epoch; the packing equals a direct transcription of the reference algorithm; stop/save/restart gives the
uninterrupted stream exactly; a truncated shard fails naming it (or is skipped and counted); the endpoint
stopped and started again mid-stream is ridden out; the shard layout is the reference's.

Run: .venv/bin/pytest tests/data/test_pretrain.py -v
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import main as llmctl
from tests.conftest import S3Server
from trainer.data.corpus import iter_python_docs
from trainer.data.pretrain import DocBuffer, PretrainLoader
from trainer.data.shards import DataError, ShardError, list_shards, write_shards
from trainer.data.tokenizer import Tokenizer

B, T = 4, 96


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """~700 real documents of varied length, each tagged with its index so a packed row can be traced back."""
    texts = itertools.islice(iter_python_docs(include_site_packages=False), 700)
    return [f"[{i:04d}] {t[:1500]}" for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def tok(docs) -> Tokenizer:
    return Tokenizer.train(docs, 512)


@pytest.fixture(scope="module")
def s3_data(docs, s3_server, tmp_path_factory):
    """Shards written by the CLI to S3 (endpoint from the environment, as in a pod); returns (url, docs by shard)."""
    src = tmp_path_factory.mktemp("src") / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    url = s3_server.bucket("data") + "/data/pydocs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
        assert llmctl(["data", "prepare", "--source", str(src), "--out", url, "--shard-chars", "60000",
                       "--row-group-size", "16"]) == 0
    return url


def _segments(row: np.ndarray, bos: int) -> list[list[int]]:
    cuts = list(np.flatnonzero(row == bos)) + [len(row)]
    return [row[a + 1:b].tolist() for a, b in zip(cuts, cuts[1:])]


def _doc_ids(loader, batches, tok, docs, encoded) -> list[int]:
    """Check every row of every batch and return the document index of each packed segment, in order."""
    ids = []
    for x, y in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == __import__("torch").int64
        assert (x[:, 1:] == y[:, :-1]).all()
        rows = np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)
        assert (rows[:, 0] == tok.bos_id).all()  # every row starts at a document boundary
        for row in rows:
            for seg in _segments(row, tok.bos_id):
                m = re.match(r"\[(\d{4})\]", tok.decode(seg))
                if m is None:  # a crop shorter than the tag; its text is still a prefix of some document
                    continue
                i = int(m.group(1))
                assert seg == encoded[i][:len(seg)], f"segment is not a prefix of document {i}"
                ids.append(i)
    return ids


def test_two_ranks_read_disjoint_documents_from_s3(s3_data, s3_server, tok, docs):
    shards = list_shards(s3_data, s3_server.storage_options)
    assert len(shards) >= 3 and shards[-1].endswith(f"shard_{len(shards) - 1:05d}.parquet")
    encoded = tok.encode_batch(docs)
    seen = []
    for rank in (0, 1):
        with PretrainLoader(s3_data, tok, batch_size=B, seq_len=T, rank=rank, world_size=2, epochs=1,
                            storage_options=s3_server.storage_options, buffer_size=32) as loader:
            ids = _doc_ids(loader, loader, tok, docs, encoded)
            assert loader.stats["cropped_tokens"] > 0  # long documents were cropped, not carried over
        seen.append(ids)
    both = seen[0] + seen[1]
    assert len(both) == len(set(both)), "a document was packed twice within one epoch"
    val = PretrainLoader(s3_data, tok, batch_size=B, seq_len=T, split="val", epochs=1,
                         storage_options=s3_server.storage_options)
    val_ids = _doc_ids(val, val, tok, docs, encoded)
    assert val_ids and not set(val_ids) & set(both)  # the last shard is val only
    n_train = len(docs) - len(set(val_ids)) - 60  # val had crops too short to tag, and the epoch's tail is dropped
    assert len(both) >= n_train * 0.8


def _reference_pack(stream: list[list[list[int]]], bos: int, buffer_size: int, rows: int) -> list[list[int]]:
    """The reference's BOS best-fit packing written as plainly as possible: a list buffer refilled (one row
    group at a time) to >= buffer_size before each placement, linear scans, crop the shortest when none fits."""
    groups, buf, out = iter(stream), [], []
    for _ in range(rows):
        row = []
        while len(row) < T + 1:
            while len(buf) < buffer_size:
                buf.extend([bos, *d] for d in next(groups))
            space = T + 1 - len(row)
            best = -1
            for i, d in enumerate(buf):
                if len(d) <= space and (best < 0 or len(d) > len(buf[best])):
                    best = i
            if best < 0:
                best = min(range(len(buf)), key=lambda i: len(buf[i]))
            row += buf.pop(best)[:space]
        out.append(row)
    return out


def test_packing_equals_the_reference_algorithm(tmp_path, tok, docs):
    url = str(tmp_path / "d")
    write_shards(docs, url, shard_chars=80_000, row_group_size=16)
    import pyarrow.parquet as pq

    stream = []  # row groups in the order one rank of one reads them, tokenized
    for shard in list_shards(url)[:-1]:
        pf = pq.ParquetFile(shard)
        stream += [tok.encode_batch(pf.read_row_group(g).column("text").to_pylist()) for g in range(pf.num_row_groups)]
    stream = stream * 3  # epochs
    loader = PretrainLoader(url, tok, batch_size=B, seq_len=T, buffer_size=40)
    got = [np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1).tolist() for x, y in itertools.islice(loader, 60)]
    want = _reference_pack(stream, tok.bos_id, 40, 60 * B)
    assert [r for batch in got for r in batch] == want
    loader.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 30)), min_size=1, max_size=80))
def test_doc_buffer_matches_linear_scans(ops):
    buf, ref, seq = DocBuffer(), [], 0
    for is_add, n in ops:
        if is_add or not ref:
            buf.add([0] * n, seq)
            ref.append((n, seq))
            seq += 1
            continue
        fit = [i for i, (length, _) in enumerate(ref) if length <= n]
        want = max(fit, key=lambda i: (ref[i][0], -i)) if fit else min(range(len(ref)), key=lambda i: (ref[i][0], i))
        got = buf.pop_fit(n) or buf.pop_shortest()
        assert got[2] == ref.pop(want)[1]
        assert buf.refs() == [s for _, s in ref]


def _stream(loader, n):
    return [(x.clone(), y.clone()) for x, y in itertools.islice(loader, n)]


def test_stop_save_restart_continues_exactly(s3_data, s3_server, tok):
    opts = dict(batch_size=B, seq_len=T, rank=1, world_size=2, storage_options=s3_server.storage_options,
                buffer_size=24)
    with PretrainLoader(s3_data, tok, **opts) as full:
        want = _stream(full, 70)  # crosses into epoch 2
        assert full.epoch == 2
    for k in (1, 23, 50):
        with PretrainLoader(s3_data, tok, **opts) as first:
            got = _stream(first, k)
            state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable, as a checkpoint stores it
        assert len(json.dumps(state)) < 4000 and state["batches"] == k
        with PretrainLoader(s3_data, tok, **opts, state=state) as second:
            got += _stream(second, 70 - k)
        assert all(torch_equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
    with pytest.raises(DataError, match="world_size=2"):
        PretrainLoader(s3_data, tok, **{**opts, "world_size": 4, "rank": 1}, state=state)


def torch_equal(a, b) -> bool:
    return bool((a[0] == b[0]).all() and (a[1] == b[1]).all())


def test_truncated_shard_is_named_or_skipped(s3_data, s3_server, tok):
    fs = s3_server.fs()
    src = s3_data.removeprefix("s3://")
    dst = s3_server.bucket("bad")
    for path in fs.ls(src):
        fs.copy(path, f"{dst.removeprefix('s3://')}/{path.rsplit('/', 1)[1]}")
    victim = f"{dst.removeprefix('s3://')}/shard_00001.parquet"
    fs.pipe(victim, fs.cat(victim)[:5000])
    with PretrainLoader(dst, tok, batch_size=B, seq_len=T, storage_options=s3_server.storage_options,
                        epochs=1) as loader:
        with pytest.raises(ShardError, match=r"corrupt or truncated shard s3://.*/shard_00001\.parquet"):
            for _ in loader:
                pass
    with PretrainLoader(dst, tok, batch_size=B, seq_len=T, storage_options=s3_server.storage_options,
                        epochs=1, skip_corrupt=True) as loader:
        assert sum(1 for _ in loader) > 5
        assert loader.stats["skipped"] == [["shard_00001.parquet", -1]]


def test_endpoint_stopped_and_restarted_mid_stream(s3_data, s3_server, tok):
    server = S3Server().start()  # our own endpoint: stopping it must not disturb other tests
    try:
        url = server.bucket("outage")
        src, dst = s3_server.fs(), server.fs()
        for path in src.ls(s3_data.removeprefix("s3://")):
            dst.pipe(f"{url.removeprefix('s3://')}/{path.rsplit('/', 1)[1]}", src.cat(path))
        opts = dict(batch_size=B, seq_len=T, storage_options=server.storage_options, buffer_size=8, prefetch=1,
                    io_threads=1, retry_backoff=0.0)
        with PretrainLoader(url, tok, **opts) as loader:
            want = _stream(loader, 40)
        outages = []

        def restart(what, error, attempt):  # called by the loader between attempts: bring the endpoint back
            outages.append((what, type(error).__name__))
            server.start()

        with PretrainLoader(url, tok, **opts, on_retry=restart) as loader:
            got = _stream(loader, 5)
            server.stop()
            got += _stream(loader, 35)
        assert outages and all(torch_equal(a, b) for a, b in zip(got, want)) and len(got) == 40
    finally:
        server.stop()


def test_bad_locations_and_settings_fail_with_one_clear_line(tmp_path, tok):
    with pytest.raises(DataError, match="no data at"):
        PretrainLoader(str(tmp_path / "none"), tok, batch_size=1, seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet shards"):
        list_shards(str(tmp_path / "empty"))
    write_shards(["a b c", "d e f"], str(tmp_path / "two"), row_group_size=1)
    with pytest.raises(DataError, match="rank must be in"):
        PretrainLoader(str(tmp_path / "two"), tok, batch_size=1, seq_len=8, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size must be"):
        PretrainLoader(str(tmp_path / "two"), tok, batch_size=0, seq_len=8)
    loader = PretrainLoader(str(tmp_path / "two"), tok, batch_size=1, seq_len=8, rank=1, world_size=2)
    with pytest.raises(DataError, match="rank 1 of 2 gets no row groups"):
        next(loader)


def test_a_dropped_loader_stops_reading_ahead(tmp_path, tok, docs):
    import gc
    import threading

    url = str(tmp_path / "d")
    write_shards(docs[:200], url, shard_chars=20_000, row_group_size=8)
    loader = PretrainLoader(url, tok, batch_size=2, seq_len=32, buffer_size=4, prefetch=1)  # epochs=None: endless
    next(loader)
    mine = [t for t in threading.enumerate() if url in t.name]
    assert len(mine) == 1 and mine[0].is_alive()
    del loader  # an eval's val loader, say, that nobody closes
    gc.collect()
    mine[0].join(timeout=30)
    assert not mine[0].is_alive()

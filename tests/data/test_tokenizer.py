"""Tokenizer: vocabulary layout, split pattern, lossless round trips (property tests), storage as text/JSON on
local disk and on a real S3 endpoint (moto on loopback), and that no pickle is involved.

Run: .venv/bin/pytest tests/data/test_tokenizer.py -v
"""

from __future__ import annotations

import base64
import itertools
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.corpus import iter_python_docs
from trainer.data.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, TokenizerError, iter_shard_texts
from tests.hostile import run_limited
from pathlib import Path
import hashlib

VOCAB = 512


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(itertools.islice(iter_python_docs(include_site_packages=False), 600))


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return Tokenizer.train(corpus, VOCAB)


def test_vocabulary_layout(tok):
    assert tok.vocab_size == VOCAB
    n = VOCAB - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, VOCAB))  # appended at the end
    assert tok.bos_id == tok.encode_special("<|bos|>") == n
    lengths = tok.token_bytes()
    assert len(lengths) == VOCAB and lengths[n:] == [0] * 9 and lengths[:256] == [1] * 256
    assert all(len(tok.decode_bytes([i])) == lengths[i] for i in range(n))
    with pytest.raises(KeyError, match="not a special token"):
        tok.encode_special("<|endoftext|>")


def test_split_pattern_digits_and_contractions(tok):
    import regex  # tiktoken's own dependency

    assert regex.findall(SPLIT_PATTERN, "We'LL pay 1234567 dollars!!\n\n  ok") == [
        "We", "'LL", " pay", " ", "12", "34", "56", "7", " dollars", "!!\n\n", " ", " ok"]
    pieces = [tok.decode([i]) for i in tok.encode("year 1234567")]
    assert all(len(p) <= 2 for p in pieces if p.isdigit()) and "".join(pieces) == "year 1234567"


def test_too_small_vocab_is_refused():
    with pytest.raises(TokenizerError, match="vocab_size must be >= 265"):
        Tokenizer.train(["abc"], 264)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_unicode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(i < tok.bos_id for i in ids)  # ordinary text never yields a special id


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_arbitrary_bytes_are_representable(tok, data):
    # byte-level BPE: every byte value is a token, so any byte string has an exact encoding
    ids = [tok.mergeable_ranks[bytes([b])] for b in data]
    assert tok.decode_bytes(ids) == data
    text = data.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids_and_literal_text_is_not_special(tok):
    for s in SPECIAL_TOKENS:
        assert tok.enc.encode(s, allowed_special="all") == [tok.encode_special(s)]
        ids = tok.encode(s)  # typed by a user: ordinary text, several ids, round-trips
        assert len(ids) > 1 and tok.encode_special(s) not in ids and tok.decode(ids) == s
    assert tok.decode([tok.bos_id]) == "<|bos|>"


def test_batch_paths_agree(tok, corpus):
    texts = corpus[:50] + ["", "x", "🎉 12345 <|bos|>"]
    singles = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=2) == singles
    assert [a.tolist() for a in tok.encode_batch_arrays(texts, num_threads=2)] == singles
    assert [a.tolist() for a in tok.encode_batch_arrays(texts, num_threads=1)] == singles
    assert tok.encode_batch(texts[:3], prepend_bos=True) == [[tok.bos_id, *s] for s in singles[:3]]
    assert tok.encode("hi", prepend_bos=True)[0] == tok.bos_id


def _same(a: Tokenizer, b: Tokenizer, texts) -> None:
    assert a.mergeable_ranks == b.mergeable_ranks
    assert (a.pattern, a.special_tokens, a.vocab_size, a.bos_id) == (b.pattern, b.special_tokens, b.vocab_size, b.bos_id)
    assert a.token_bytes() == b.token_bytes()
    assert a.encode_batch(texts) == b.encode_batch(texts)


def test_save_load_local_text_files(tok, corpus, tmp_path):
    tok.save(str(tmp_path / "tok"))
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["special_tokens"]["<|bos|>"] == tok.bos_id and meta["vocab_size"] == VOCAB
    lines = (tmp_path / "tok" / "tokenizer.tiktoken").read_text().splitlines()
    assert len(lines) == VOCAB - 9 and base64.b64decode(lines[0].split()[0]) == b"\x00"
    assert json.loads((tmp_path / "tok" / "token_bytes.json").read_text()) == tok.token_bytes()
    _same(tok, Tokenizer.load(f"file://{tmp_path}/tok"), corpus[:100])


def test_save_load_s3_without_pickle(tok, corpus, s3_server, monkeypatch):
    url = s3_server.bucket("tok") + "/tokenizers/bpe-512"
    tok.save(url, storage_options=s3_server.storage_options)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a tokenizer")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = Tokenizer.load(url, storage_options=s3_server.storage_options)
    _same(tok, loaded, corpus[:100])
    # through the environment, as in a pod
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    _same(tok, Tokenizer.load(url), corpus[:10])


def test_incomplete_or_tampered_directories_fail_clearly(tok, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer at .*missing"):
        Tokenizer.load(str(tmp_path / "nothing"))
    tok.save(str(tmp_path / "t"))
    ranks = tmp_path / "t" / "tokenizer.tiktoken"
    ranks.write_text(ranks.read_text().replace(" 300\n", " 301\n"))
    with pytest.raises(TokenizerError, match="checksum"):
        Tokenizer.load(str(tmp_path / "t"))
    tok.save(str(tmp_path / "t"))
    (tmp_path / "t" / "token_bytes.json").unlink()
    with pytest.raises(TokenizerError, match="incomplete: token_bytes.json missing"):
        Tokenizer.load(str(tmp_path / "t"))


def test_train_from_shards_reads_train_split_capped(tmp_path, corpus):
    from trainer.data.shards import write_shards

    write_shards([f"doc{i} " + t for i, t in enumerate(corpus[:200])], str(tmp_path / "d"), shard_chars=20_000,
                 row_group_size=16)
    texts = list(iter_shard_texts(str(tmp_path / "d"), doc_cap=50, max_chars=3_000))
    assert all(len(t) <= 50 for t in texts) and 3_000 <= sum(map(len, texts)) < 3_050
    val = list(iter_shard_texts(str(tmp_path / "d"), split="val"))
    assert val and not set(val) & set(iter_shard_texts(str(tmp_path / "d"), doc_cap=None))
    t = Tokenizer.train_from_shards(str(tmp_path / "d"), 300)
    assert t.vocab_size == 300 and t.bytes_per_token(val) > 1.0


# ---------------------------------------------------------------- text for people: no raw special tokens
PIECES = ("It holds ", "12+3", "15", " items.", "x", " ünï ")
MARKERS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|user_start|>",
           "<|user_end|>", "<|assistant_start|>")


def test_decode_text_renders_tool_calls_and_stops_at_the_end_token(tok):
    sp = tok.special_tokens
    ids = (tok.encode("It holds ") + [sp["<|python_start|>"]] + tok.encode("12+3") + [sp["<|python_end|>"],
           sp["<|output_start|>"]] + tok.encode("15") + [sp["<|output_end|>"]] + tok.encode(" items")
           + [sp["<|python_start|>"]] + tok.encode("1+1") + [sp["<|python_end|>"], sp["<|user_start|>"]]
           + tok.encode(" ok") + [sp["<|assistant_end|>"]] + tok.encode("never shown"))
    assert tok.decode_text(ids) == "It holds <<12+3=15>> items<<1+1>> ok"
    assert tok.decode_text(tok.encode("a") + [tok.bos_id] + tok.encode("b")) == "a"
    assert tok.decode_text([sp["<|output_start|>"]] + tok.encode("7") + [sp["<|output_end|>"]]) == "<<=7>>"
    assert "<|" in tok.decode(ids)  # what decode_text exists to avoid


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.sampled_from(MARKERS)), max_size=14))
def test_decode_text_never_shows_special_tokens_and_streams_consistently(tok, parts):
    from trainer.serve.engine import stream_text

    ids = [i for p in parts for i in ([tok.encode_special(p)] if p in MARKERS else tok.encode(p))]
    text = tok.decode_text(ids)
    assert "<|" not in text
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == text  # streaming never takes back what it showed


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def _tamper(tmp_path, tok, *, ranks: bytes | None = None, meta_edit=None) -> str:
    from trainer.data.tokenizer import BYTES_FILE, META_FILE, RANKS_FILE

    url = str(tmp_path / "tok")
    tok.save(url)
    d = Path(url)
    if ranks is not None:
        (d / RANKS_FILE).write_bytes(ranks)
    meta = json.loads((d / META_FILE).read_text())
    meta["sha256"][RANKS_FILE] = hashlib.sha256((d / RANKS_FILE).read_bytes()).hexdigest()
    meta["sha256"][BYTES_FILE] = hashlib.sha256((d / BYTES_FILE).read_bytes()).hexdigest()
    if meta_edit:
        meta_edit(meta)
    (d / META_FILE).write_text(json.dumps(meta))
    return url


def test_hostile_tokenizer_rank_bomb_is_a_tokenizer_error(tmp_path, tok):
    from trainer.data.tokenizer import RANKS_FILE

    url = _tamper(tmp_path, tok)
    ranks = (Path(url) / RANKS_FILE).read_bytes().splitlines()
    ranks[-1] = ranks[-1].split()[0] + b" 4000000000"
    url = _tamper(tmp_path, tok, ranks=b"\n".join(ranks) + b"\n",  # and a tokenizer.json that agrees
                  meta_edit=lambda m: m.update(vocab_size=4_000_000_001 + len(m["special_tokens"])))
    r = run_limited(f"""
        from trainer.data.tokenizer import Tokenizer, TokenizerError
        try:
            Tokenizer.load({url!r})
        except TokenizerError as e:
            print("TokenizerError:", e)
    """)
    assert r.returncode == 0 and "TokenizerError" in r.stdout and "rank" in r.stdout, (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("case", ["malformed", "bad-base64", "no-sha256", "not-json", "pattern"])
def test_hostile_bad_tokenizer_files_are_tokenizer_errors(tmp_path, tok, case):
    from trainer.data.tokenizer import META_FILE, Tokenizer, TokenizerError

    if case == "malformed":
        url = _tamper(tmp_path, tok, ranks=b"AAA= 0\nthis line has three words\n")
    elif case == "bad-base64":
        url = _tamper(tmp_path, tok, ranks=b"%%%% 0\n")
    elif case == "no-sha256":
        url = _tamper(tmp_path, tok, meta_edit=lambda m: m.pop("sha256"))
    elif case == "pattern":
        url = _tamper(tmp_path, tok, meta_edit=lambda m: m.update(pattern="(a+)+$"))
    else:
        url = _tamper(tmp_path, tok)
        (Path(url) / META_FILE).write_text("{not json")
    with pytest.raises(TokenizerError):
        Tokenizer.load(url)

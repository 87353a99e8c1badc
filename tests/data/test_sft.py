"""Chat rendering and SFT data: the reference's loss-mask rules, MMLU/GSM8K/SmolTalk rows read from
local jsonl/parquet files (fsspec, pyarrow; no `datasets`), and the SFT packing (best-fit, pad instead of crop, one pass,
disjoint ranks, exact resume).

Run: .venv/bin/pytest tests/data/test_sft.py -v
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from trainer.data.sft import (REFERENCE_REPEATS, SFTLoader, build_sample_conversations, gsm8k_conversation, load_conversations, mmlu_conversation, render_mc)
from trainer.data.corpus import iter_python_docs
from trainer.data.shards import DataError
from trainer.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(itertools.islice(iter_python_docs(include_site_packages=False), 400), 512)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    build_sample_conversations(str(out), n=400)
    return out


def test_render_conversation_masks_follow_the_reference(tok):
    sp = tok.special_tokens
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Computing "},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": " gives 5."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome"},
    ]}
    e = tok.encode
    want = [  # (ids, mask) in order: BOS 0, user 0, assistant_start 0, text/python 1, tool output 0, end 1
        ([tok.bos_id], 0),
        ([sp["<|user_start|>"], *e("Be brief.\n\nAdd 2 and 3."), sp["<|user_end|>"]], 0),
        ([sp["<|assistant_start|>"]], 0),
        (e("Computing "), 1),
        ([sp["<|python_start|>"], *e("2+3"), sp["<|python_end|>"]], 1),
        ([sp["<|output_start|>"], *e("5"), sp["<|output_end|>"]], 0),
        (e(" gives 5."), 1),
        ([sp["<|assistant_end|>"]], 1),
        ([sp["<|user_start|>"], *e("Thanks"), sp["<|user_end|>"]], 0),
        ([sp["<|assistant_start|>"]], 0),
        (e("Welcome") + [sp["<|assistant_end|>"]], 1),
    ]
    ids, mask = tok.render_conversation(conv)
    assert ids == [i for part, _ in want for i in part]
    assert mask == [m for part, m in want for _ in part]
    assert conv["messages"][0]["role"] == "system"  # the input is not mutated
    short_ids, short_mask = tok.render_conversation(conv, max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7]
    prompt = tok.render_for_completion(conv)
    assert prompt == ids[:len(ids) - len(e("Welcome")) - 2] + [sp["<|assistant_start|>"]]


def test_render_rejects_malformed_conversations(tok):
    with pytest.raises(ValueError, match="message 1 is from 'user', expected 'assistant'"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    with pytest.raises(ValueError, match="unknown part type 'image'"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": [{"type": "image", "text": ""}]}]})
    with pytest.raises(ValueError, match="ends with an assistant message"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "a"}]})


def test_mmlu_and_gsm8k_rows_render_as_the_reference():
    row = {"question": "2+2?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "math"}
    assert render_mc("2+2?", "ABCD", row["choices"]) == (
        "Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n- 5=C\n- 22=D\n\nRespond only with the letter of the correct answer.")
    assert mmlu_conversation(row)["messages"][1] == {"role": "assistant", "content": "B"}
    conv = gsm8k_conversation({"question": "q", "answer": "Half is 48/2 = <<48/2=24>>24.\n#### 24"})
    assert conv["messages"][1]["content"] == [
        {"type": "text", "text": "Half is 48/2 = "}, {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"}, {"type": "text", "text": "24.\n#### 24"}]


def test_load_conversations_from_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(5)))
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "choices": [["a", "b", "c", "d"]] * 2, "answer": [0, 3],
                             "subject": ["x", "y"]}), tmp_path / "mc.parquet")
    (tmp_path / "math.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}) + "\n")
    convs = load_conversations(str(tmp_path))
    assert len(convs) == 8 and convs == load_conversations(str(tmp_path))  # deterministic shuffle
    assert convs != load_conversations(str(tmp_path), seed=None)
    mixed = load_conversations(str(tmp_path), repeats=REFERENCE_REPEATS)
    assert len(mixed) == 5 + 2 * 3 + 1 * 4
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: unknown conversation row \(columns \['prompt'\]\)"):
        load_conversations(str(tmp_path))


def test_sft_loader_packs_whole_conversations_and_pads(tok, sft_dir):
    T, B = 128, 4
    convs = load_conversations(str(sft_dir))
    rendered = [tok.render_conversation(c, max_tokens=T + 1) for c in convs]
    loader = SFTLoader(str(sft_dir), tok, batch_size=B, seq_len=T, rank=0, world_size=2)
    assert loader.conversations == convs
    share = Counter(tuple(rendered[i][0]) for i in range(0, len(convs), 2))  # rank 0 of 2: indices 0, 2, 4, ...
    masks = {tuple(ids): mask for ids, mask in rendered}
    padded, progress = 0, []
    for x, y in loader:
        assert x.shape == y.shape == (B, T) and (x[:, 0] == tok.bos_id).all()
        progress.append(loader.progress)
        for r in range(B):
            row, pos = x[r].tolist(), 0
            while pos < T:  # the row (T+1 tokens, x holds the first T) is whole conversations, then BOS padding
                fits = [ids for ids in share if share[ids] and row[pos:pos + len(ids)] == list(ids[:T - pos])
                        and (pos + len(ids) >= T or row[pos + len(ids)] == tok.bos_id)]
                if not fits:
                    assert set(row[pos:]) == {tok.bos_id} and set(y[r, pos - 1:].tolist()) == {-1}
                    padded += 1
                    break
                ids = max(fits, key=len)
                assert len(ids) <= T + 1 - pos  # never cropped: it fits the row whole
                targets = y[r, pos:pos + len(ids) - 1].tolist()  # y[t] predicts row[t+1]
                want = [t if m else -1 for t, m in zip(ids[1:], masks[ids][1:])]
                assert targets == want[:len(targets)]
                share[ids] -= 1
                pos += len(ids)
    assert not +share  # one pass over this rank's share, every conversation exactly once
    assert padded > 0 and loader.last and progress[-1] == 1.0 and progress == sorted(progress)
    with pytest.raises(StopIteration):
        next(loader)


def test_sft_resume_is_exact_and_epochs_go_on_when_asked(tok, sft_dir):
    convs = load_conversations(str(sft_dir))
    kw = dict(batch_size=2, seq_len=96, world_size=2)
    full = [(x.clone(), y.clone()) for x, y in SFTLoader(convs, tok, rank=1, **kw)]
    first = SFTLoader(convs, tok, rank=1, **kw)
    got = [(x.clone(), y.clone()) for x, y in itertools.islice(first, 7)]
    state = json.loads(json.dumps(first.state_dict()))
    assert len(json.dumps(state)) < 3000
    got += [(x.clone(), y.clone()) for x, y in SFTLoader(convs, tok, rank=1, state=state, **kw)]
    assert len(got) == len(full) and all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(got, full))
    with pytest.raises(DataError, match="rank=1"):
        SFTLoader(convs, tok, rank=0, state=state, **kw)
    forever = SFTLoader(convs, tok, rank=0, epochs=None, **kw)
    for _ in itertools.islice(forever, len(full) + 5):
        pass
    assert forever.epoch == 2 and not forever.last


def test_sample_conversations_are_offline_and_complete(sft_dir, tok):
    files = sorted(p.name for p in (sft_dir / "train").iterdir())
    assert files == ["gsm8k.jsonl", "mmlu.jsonl", "smoltalk.jsonl"] and (sft_dir / "val" / "smoltalk.jsonl").exists()
    val = load_conversations(str(sft_dir), split="val")
    train = load_conversations(str(sft_dir))
    assert len(train) + len(val) == 400 and len(val) == 40
    first = train[0]["messages"]
    assert first[0]["role"] in ("user", "system") and first[-1]["role"] == "assistant"
    assert any(isinstance(c["messages"][1]["content"], list) for c in train)  # GSM8K-style tool calls present
    ids, mask = tok.render_conversation(train[0])
    assert sum(mask) > 0


def test_deps_sft_files_load_without_hugging_face_datasets(tmp_path):
    """Reading a jsonl/parquet file needs no `datasets` import (2 s): fsspec and pyarrow read them."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]}) + "\n")
    (tmp_path / "list.json").write_text(json.dumps([{"question": "1+1?", "answer": "#### 2"}]))
    code = ("import sys; from trainer.data.sft import load_conversations; "
            f"assert len(load_conversations({str(tmp_path)!r})) == 2; "
            "assert 'datasets' not in sys.modules, 'datasets was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])

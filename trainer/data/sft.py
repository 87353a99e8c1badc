"""SFT data: conversation datasets -> rendered, masked, best-fit packed (B, T) batches.

Rows become conversations (`{"messages": [...]}`) the way the reference's tasks do
(`scripts/chat_sft.py` and `tasks/` of the reference; docs/recipe.md):
- SmolTalk style: a `messages` column, used as is;
- MMLU style (`question`, `choices`, `answer` index): the user turn is `render_mc` ("Multiple Choice question:
  …", one `- {choice}={letter}` line per choice, letter after the choice with no space), the answer a bare letter;
- GSM8K style (`question`, `answer` with `<<expr=result>>` calculator notes and a final `#### n`): each note
  becomes a python tool call (trained on) and its output (not trained on).
Files are read through fsspec (jsonl/json, parquet with pyarrow; local or fsspec URLs); a mixture is shuffled
with a fixed seed (`random.Random(42)`, as the reference's TaskMixture).

`SFTLoader` packs like the reference's SFT loop: a buffer of 100 rendered conversations, each row of T+1 tokens
filled with the largest conversation that fits whole; when none fits, the rest of the row is padded with BOS
(never cropped: a conversation is rendered with at most T+1 tokens, so it always fits an empty row). Targets
are -1 wherever the mask is 0 (BOS, user turns, tool output) and over padding. Ranks take conversations
rank, rank+W, …; by default one pass, after which iteration stops (`last` turns True with the final batch;
`progress` in [0, 1] drives the LR schedule). `state_dict()` is small JSON (indices, not tokens) for exact resume;
a state written at another world size is re-cut by trainer/data/reshard.py (`partition_sft_states`), each
conversation still packed exactly once.
"""

from __future__ import annotations

import json
import os
import random
import re
from trainer.data.pretrain import DocBuffer
from trainer.progress import progress_bar
from trainer.data.shards import DataError
from trainer.storage import filesystem

LETTERS = "ABCD"
REFERENCE_REPEATS = {"smoltalk": 1, "mmlu": 3, "gsm8k": 4}  # nanochat chat_sft.py mixture (LOG 2026-02-16)
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------- rows -> conversations
def render_mc(question: str, letters: str, choices: list[str]) -> str:
    """The reference's multiple-choice prompt (tasks/common.py): the letter after its choice binds better in
    small models, and no space before it so the prompt's letter is the same token as the bare-letter answer."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def mmlu_conversation(row: dict) -> dict:
    choices = list(row["choices"])
    letters = LETTERS[:len(choices)]
    if not 2 <= len(choices) <= len(LETTERS) or not 0 <= int(row["answer"]) < len(choices):
        raise ValueError(f"MC row needs 2-4 choices and an answer index into them, got {row}")
    return {"messages": [{"role": "user", "content": render_mc(row["question"], letters, choices)},
                         {"role": "assistant", "content": letters[int(row["answer"])]}]}


def gsm8k_conversation(row: dict) -> dict:
    """`<<48/2=24>>` becomes a python call `48/2` and its output `24` (reference tasks/gsm8k.py)."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", row["answer"]):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": parts}]}


def row_kind(row: dict) -> str:
    if "messages" in row:
        return "smoltalk"
    if {"question", "choices", "answer"} <= row.keys():
        return "mmlu"
    if {"question", "answer"} <= row.keys() and isinstance(row["answer"], str):
        return "gsm8k"
    raise ValueError(f"unknown conversation row (columns {sorted(row)}): expected 'messages' (SmolTalk), "
                     "'question'+'choices'+'answer' (MMLU) or 'question'+'answer' text (GSM8K)")


def to_conversation(row: dict) -> dict:
    kind = row_kind(row)
    if kind == "smoltalk":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    return mmlu_conversation(row) if kind == "mmlu" else gsm8k_conversation(row)


def load_conversations(source: str | list, split: str = "train", *, storage_options: dict | None = None,
                       repeats: dict[str, int] | None = None, seed: int | None = 42) -> list[dict]:
    """Conversations from `source`: a list of rows, a jsonl/json/parquet file, or a directory of them
    (`<dir>/<split>/` when it exists). Each file is read (`_read_rows`) and converted by its row kind;
    `repeats` (e.g. `REFERENCE_REPEATS`) repeats kinds as epochs of a mixture; the result is shuffled."""
    tables = [("rows", list(source))] if isinstance(source, (list, tuple)) else [
        (url, _read_rows(url, storage_options)) for url in _conversation_files(source, split, storage_options)]
    convs = []
    for where, rows in tables:
        try:
            convs += [to_conversation(r) for r in rows for _ in range((repeats or {}).get(row_kind(r), 1))]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: {e}") from None
    if seed is not None:
        random.Random(seed).shuffle(convs)
    return convs


def _conversation_files(source: str, split: str, storage_options) -> list[str]:
    fs, root = filesystem(source, storage_options)
    if fs.isdir(f"{root}/{split}"):
        root = f"{root}/{split}"
    if fs.isfile(root):
        files = [root]
    elif fs.isdir(root):
        files = sorted(p for p in fs.ls(root, detail=False) if os.path.splitext(p)[1] in BUILDERS)
    else:
        raise DataError(f"no conversation data at {source}")
    if not files:
        raise DataError(f"no .jsonl/.json/.parquet files under {source} (split {split!r})")
    return [fs.unstrip_protocol(f) if "://" in source else f for f in files]


def _read_rows(url: str, storage_options) -> list[dict]:
    """The rows of one plain file, read through fsspec (JSON Lines, a JSON array, or parquet with pyarrow): no
    Hugging Face `datasets` (2 s to import) for what a file reader does."""
    fs, path = filesystem(url, storage_options)
    if BUILDERS[os.path.splitext(path)[1]] == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            return pq.read_table(f).to_pylist()
    text = fs.cat_file(path).decode("utf-8")
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise DataError(f"{url}: not valid JSON ({e})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"{url}:{n}: not a JSON line ({e})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{url}: expected one JSON object per row")
    return rows


# --------------------------------------------------------------------------- the SFT loader
class SFTLoader:
    """Yields `(inputs, targets)` LongTensors (batch_size, seq_len); targets -1 where not trained on."""

    def __init__(self, url_or_rows, tokenizer, *, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 device="cpu", state: dict | None = None, buffer_size: int = 100, epochs: int | None = 1,
                 split: str = "train", storage_options: dict | None = None, repeats: dict[str, int] | None = None):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size),
                            ("buffer_size", buffer_size)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if epochs is not None and epochs < 1:
            raise DataError(f"epochs must be >= 1 or None (forever), got {epochs}")
        if isinstance(url_or_rows, (list, tuple)):  # rows in the caller's order (a mixture built already)
            self.conversations = load_conversations(url_or_rows, repeats=repeats, seed=None)
        else:
            self.conversations = load_conversations(url_or_rows, split, storage_options=storage_options, repeats=repeats)
        n = len(self.conversations)
        if n <= rank:
            raise DataError(f"{n} conversations cannot feed rank {rank} of {world_size}")
        self.tokenizer, self.B, self.T = tokenizer, batch_size, seq_len
        self.rank, self.world_size, self.buffer_size, self.epochs = rank, world_size, buffer_size, epochs
        self.share = len(range(rank, n, world_size))  # conversations this rank sees per epoch
        self._buffer = DocBuffer(length=lambda item: len(item[0]))
        self._cursor, self._epoch = rank, 1  # next conversation index to render, and its epoch
        self._pending: list[tuple[int, int]] = []  # (epoch, index) first: a re-shard's pool (trainer/data/reshard.py)
        self.consumed = 0  # conversations packed by this rank
        self.batches = 0
        self.last = False  # True once the yielded batch was the final one
        self.audit: list | None = None  # set to [] to record the index of every packed conversation
        import torch

        self._torch = torch
        self.device = torch.device(device)
        if state is not None:
            self._restore(state)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def progress(self) -> float:
        """Fraction of the planned passes consumed by this rank, in [0, 1] (0 when epochs=None)."""
        return 0.0 if self.epochs is None else min(1.0, self.consumed / (self.share * self.epochs))

    def _exhausted(self) -> bool:
        return not self._pending and self.epochs is not None and self._epoch > self.epochs

    def _render(self, i: int):
        try:
            return self.tokenizer.render_conversation(self.conversations[i], max_tokens=self.T + 1)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"conversation {i}: {e}") from None

    def _refill(self) -> None:
        n = len(self.conversations)
        while len(self._buffer) < self.buffer_size and not self._exhausted():
            if self._pending:
                _, i = self._pending.pop(0)
                self._buffer.add(self._render(i), i)
                continue
            self._buffer.add(self._render(self._cursor), self._cursor)
            self._cursor += self.world_size
            if self._cursor >= n:
                self._cursor, self._epoch = self._cursor % n, self._epoch + 1

    def close(self) -> None:
        """Nothing to stop: the conversations are in memory (the `Loader` protocol, trainer/worker.py)."""

    def state_dict(self) -> dict:
        state = {"kind": "sft", "version": 1, "rank": self.rank, "world_size": self.world_size,
                 "conversations": len(self.conversations), "cursor": self._cursor, "epoch": self._epoch,
                 "buffer": self._buffer.refs(), "consumed": self.consumed, "batches": self.batches, "last": self.last}
        if self._pending:  # resumed on another world size and not through the pool yet
            state["pending"] = [list(x) for x in self._pending]
        return state

    def _restore(self, state: dict) -> None:
        from trainer.data import reshard

        if state.get("kind") == reshard.LOADER_RESHARD:  # written by another world size: take this rank's share
            state = reshard.partition_sft_states(state["states"], self.rank, self.world_size,
                                                 conversations=len(self.conversations), epochs=self.epochs)
        if state.get("kind") != "sft" or state.get("version") != 1:
            raise DataError(f"not an SFT loader state (kind={state.get('kind')!r}, version={state.get('version')!r})")
        for key, have in (("rank", self.rank), ("world_size", self.world_size), ("conversations", len(self.conversations))):
            if state[key] != have:
                raise DataError(f"SFT loader state is for {key}={state[key]!r}, this loader has {have!r}")
        for i in state["buffer"]:
            self._buffer.add(self._render(i), i)
        self._cursor, self._epoch = state["cursor"], state["epoch"]
        self._pending = [(e, i) for e, i in state.get("pending", [])]
        if not all(isinstance(i, int) and 0 <= i < len(self.conversations) for _, i in self._pending):
            raise DataError(f"SFT loader state: a pending conversation index is outside 0.."
                            f"{len(self.conversations) - 1}")
        self.consumed, self.batches, self.last = state["consumed"], state["batches"], state["last"]

    def __iter__(self) -> "SFTLoader":
        return self

    def __next__(self):
        import numpy as np

        cap = self.T + 1
        bos = self.tokenizer.bos_id
        rows = np.full((self.B, cap), bos, dtype=np.int64)
        mask = np.zeros((self.B, cap), dtype=np.int8)
        taken: list[tuple] = []
        try:
            for r in range(self.B):
                pos = 0
                while pos < cap:
                    self._refill()
                    item = self._buffer.pop_fit(cap - pos)
                    if item is None:
                        break  # nothing fits (or nothing left): the rest of the row stays BOS padding, mask 0
                    taken.append(item)
                    ids, m = item[1]
                    rows[r, pos:pos + len(ids)] = ids
                    mask[r, pos:pos + len(ids)] = m
                    pos += len(ids)
        except BaseException:
            for item in taken:
                self._buffer.put_back(item)
            raise
        if not taken:
            self.last = True
            raise StopIteration
        self.consumed += len(taken)
        self.batches += 1
        if self.audit is not None:
            self.audit.extend(ref for _, _, ref in taken)
        self.last = self._exhausted() and not len(self._buffer)
        torch = self._torch
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(np.where(mask[:, 1:] == 1, rows[:, 1:], -1))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return (x, y) if self.device.type == "cpu" else (x.to(self.device), y.to(self.device))


# --------------------------------------------------------------------------- the offline sample dataset
def _api_facts() -> list[tuple[str, str, str]]:
    """(qualified name, module, first sentence of its docstring) for the standard library's public API."""
    import ast
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    facts = []
    for f in sorted(os.listdir(root)):
        if not f.endswith(".py") or f.startswith("_"):
            continue
        try:
            with open(os.path.join(root, f), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        module = f[:-3]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node) or ""
                first = re.split(r"(?<=[.!?])\s", " ".join(doc.split()), maxsplit=1)[0].strip()
                if 20 <= len(first) <= 300 and first.endswith("."):
                    facts.append((f"{module}.{node.name}", module, first))
    return facts


def _sample_rows(facts, rng: random.Random, n: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {"smoltalk": [], "mmlu": [], "gsm8k": []}
    asks = ("What does {} do?", "Explain {} in one sentence.", "What is {} for?", "Briefly, what is {}?")
    n_mc = n_math = max(1, round(n * 0.15)) if n >= 3 else 0
    kinds = ["smoltalk"] * (n - n_mc - n_math) + ["mmlu"] * n_mc + ["gsm8k"] * n_math
    rng.shuffle(kinds)
    for kind in kinds:
        name, module, sentence = facts[rng.randrange(len(facts))]
        if kind == "smoltalk":
            msgs = [{"role": "user", "content": rng.choice(asks).format(name)},
                    {"role": "assistant", "content": f"`{name}`: {sentence}"}]
            if rng.random() < 0.3:
                msgs += [{"role": "user", "content": "Which module is it in?"},
                         {"role": "assistant", "content": f"It is in the `{module}` module."}]
            if rng.random() < 0.1:
                msgs.insert(0, {"role": "system", "content": "You are a concise assistant for the Python standard library."})
            rows["smoltalk"].append({"messages": msgs})
        elif kind == "mmlu":
            others = rng.sample([f for f in facts if f[0] != name], 3)
            choices = [name] + [o[0] for o in others]
            rng.shuffle(choices)
            rows["mmlu"].append({"question": f"Which one is documented as: \"{sentence}\"", "subject": "python",
                                 "choices": choices, "answer": choices.index(name)})
        else:
            a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 50)
            total, left = a + b, a + b - c
            rows["gsm8k"].append({
                "question": f"A {module} work queue holds {a} items. {b} more arrive, then {c} are processed. "
                            "How many items are left in the queue?",
                "answer": f"After the arrivals it holds {a} + {b} = <<{a}+{b}={total}>>{total} items. "
                          f"After processing, {total} - {c} = <<{total}-{c}={left}>>{left} are left.\n#### {left}"})
    return rows


def build_sample_conversations(out_url: str, n: int = 2000, *, val_fraction: float = 0.1, seed: int = 42,
                               storage_options: dict | None = None, show_progress: bool = False) -> dict[str, list[str]]:
    """Write ~n conversations built offline from the standard library's docstrings as
    `<out_url>/{train,val}/{smoltalk,mmlu,gsm8k}.jsonl` (70/15/15 %); returns the file URLs per split."""
    if n < 2 or not 0 < val_fraction < 1:
        raise DataError(f"need n >= 2 and 0 < val_fraction < 1, got n={n}, val_fraction={val_fraction}")
    facts = _api_facts()
    rng = random.Random(seed)
    fs, root = filesystem(out_url, storage_options)
    out: dict[str, list[str]] = {}
    n_val = max(1, int(n * val_fraction))
    with progress_bar(show_progress, "writing conversations", n) as advance:
        for split, count in (("train", n - n_val), ("val", n_val)):
            fs.makedirs(f"{root}/{split}", exist_ok=True)
            out[split] = []
            for kind, rows in _sample_rows(facts, rng, count).items():
                if rows:
                    path = f"{root}/{split}/{kind}.jsonl"
                    fs.pipe_file(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
                    out[split].append(f"{out_url.rstrip('/')}/{split}/{kind}.jsonl")
                advance(len(rows))
    return out


"""BPE tokenizer: trained with rustbpe, served by tiktoken, stored as text/JSON at any fsspec URL.

The recipe is nanochat's (`nanochat/tokenizer.py`; docs/recipe.md, tokenizer):
- byte-level BPE with the GPT-4 split pattern, except digit runs split in chunks of 1-2 (`\\p{N}{1,2}`,
  GPT-4 uses 1-3; nanochat LOG 2026-01-13: d12 val_bpb 0.965 for {1,2} vs 0.972 for {1,3});
- vocab 32,768 = 256 byte tokens + merges + the nine special tokens appended at the end of the id space;
- pretraining uses only BOS, prepended to every document; the other eight delimit chat turns and tool calls.

Storage: a directory URL holding three text files; `tokenizer.json` is written last and names
the SHA-256 of the other two, so a half-written directory fails to load instead of loading wrong:
    tokenizer.tiktoken   one `base64(token_bytes) rank` line per mergeable token (tiktoken's own format)
    token_bytes.json     raw UTF-8 byte length of every id, 0 for specials (the bpb denominator)
    tokenizer.json       format, split pattern, special tokens -> ids, vocab size, checksums
Nothing is pickled (the reference pickles the tiktoken Encoding; we never unpickle from storage).

Chat rendering (`render_conversation`) returns token ids and a 0/1 loss mask with the reference's rules:
BOS and user turns 0; `<|assistant_start|>` 0; assistant text, python tool calls and `<|assistant_end|>` 1;
tool outputs (`<|output_start|> … <|output_end|>`) 0; a leading system message is merged into the first
user message with a blank line.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import tiktoken

SPECIAL_TOKENS = (
    "<|bos|>",  # starts every document (pretraining) and every conversation (SFT)
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, fed back (never trained on)
)

# GPT-4 (cl100k) split pattern with digit runs in 1-2 chunks; source: nanochat/tokenizer.py SPLIT_PATTERN.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

DEFAULT_VOCAB_SIZE = 32768  # 2**15, nanochat since 2026-01-07 (was 65,536)
FORMAT = "llmctl-tokenizer/1"
RANKS_FILE, BYTES_FILE, META_FILE = "tokenizer.tiktoken", "token_bytes.json", "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, incomplete or inconsistent (names the URL)."""


# Bounds on a stored tokenizer (its files are untrusted). A 2^20-id vocabulary (RunSpec's MAX_VOCAB_SIZE)
# writes ~30 MB of `base64 rank` lines; tokens are byte strings of at most a few hundred bytes.
MAX_MERGEABLE = 1 << 20
MAX_TOKEN_BYTES = 4096
MAX_FILE_BYTES = 128 << 20
MAX_META_BYTES = 1 << 20


def _read_bounded(fs, path: str, limit: int) -> bytes:
    """The bytes at `path`, refusing (before reading) a file larger than `limit`."""
    size = fs.size(path)
    if size is not None and size > limit:
        raise TokenizerError(f"{path} is {size:,} bytes; a tokenizer file is at most {limit:,}")
    return fs.cat_file(path)


def _parse_ranks(blob: bytes, where: str) -> dict[bytes, int]:
    """`base64 rank` lines -> {token bytes: rank}, with ranks exactly 0..n-1 and tokens distinct."""
    ranks: dict[bytes, int] = {}
    n, lines = 0, []
    try:
        lines = blob.decode("ascii").splitlines()
        if len(lines) > MAX_MERGEABLE:
            raise TokenizerError(f"{where}: {len(lines):,} tokens; at most {MAX_MERGEABLE:,}")
        for n, line in enumerate(lines, 1):
            tok, rank = line.split(" ")
            if not rank.isdigit() or len(tok) > 2 * MAX_TOKEN_BYTES:
                raise ValueError(f"rank {rank[:20]!r}")
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except TokenizerError:
        raise
    except (ValueError, UnicodeDecodeError) as e:  # binascii.Error is a ValueError
        raise TokenizerError(f"{where}: malformed line {n} ({e}); expected `base64 rank`") from None
    if len(ranks) != len(lines) or set(ranks.values()) != set(range(len(ranks))):
        top = max(ranks.values(), default=0)
        raise TokenizerError(f"{where}: ranks must be 0..{len(lines) - 1}, each once (largest rank given: {top:,})")
    return ranks


class Tokenizer:
    """A tiktoken `Encoding` plus the special-token conventions of the recipe."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "llmctl-bpe"):
        if len(mergeable_ranks) < 256:
            raise TokenizerError(f"a byte-level BPE needs >= 256 mergeable tokens, got {len(mergeable_ranks)}")
        offset = len(mergeable_ranks)
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = {tok: offset + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|bos|>"]
        self._special_ids = frozenset(self.special_tokens.values())
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    # ---------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
              show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE of `vocab_size` ids in total (the nine specials included) with rustbpe.

        A corpus too small to supply enough merges gives a smaller vocabulary (check `vocab_size`).
        `show_progress`: a spinner on a terminal's stderr once the text is read, while rustbpe merges (it
        reports no count to draw a bar from)."""
        import rustbpe

        from trainer.progress import spinner

        n_mergeable = vocab_size - len(SPECIAL_TOKENS)
        if n_mergeable < 256:
            raise TokenizerError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + 9 specials), "
                                 f"got {vocab_size}")
        merging = spinner(show_progress, f"BPE: merging up to {n_mergeable:,} tokens")

        def feed():
            yield from texts
            merging.start()  # rustbpe asked past the last text: counting is done, the merges follow

        trainer = rustbpe.Tokenizer()
        try:
            trainer.train_from_iterator(feed(), n_mergeable, pattern=SPLIT_PATTERN)
        finally:
            merging.stop()
        ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    @classmethod
    def train_from_shards(cls, data_url: str, vocab_size: int = DEFAULT_VOCAB_SIZE, *, max_chars: int = 2_000_000_000,
                          doc_cap: int = 10_000, storage_options: dict | None = None,
                          show_progress: bool = False) -> "Tokenizer":
        """Train on the train shards under `data_url` (all but the last): each document capped at `doc_cap`
        characters, stopping after `max_chars` (nanochat tok_train.py: 10,000 and 2e9)."""
        return cls.train(iter_shard_texts(data_url, max_chars=max_chars, doc_cap=doc_cap,
                                          storage_options=storage_options, show_progress=show_progress), vocab_size,
                         show_progress=show_progress)

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Compression: UTF-8 bytes per token over `texts` (higher is better)."""
        texts = list(texts)
        n_tokens = sum(len(ids) for ids in self.encode_batch(texts))
        return sum(len(t.encode("utf-8")) for t in texts) / max(1, n_tokens)

    # ---------------------------------------------------------------- storage
    def save(self, url: str, storage_options: dict | None = None) -> None:
        """Write the three files under directory `url` (file://, s3://, memory://, plain path)."""
        from trainer.storage import filesystem

        fs, root = filesystem(url, storage_options)
        ranks = "".join(f"{base64.b64encode(tok).decode()} {rank}\n"
                        for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])).encode()
        lengths = json.dumps(self.token_bytes()).encode()
        meta = {
            "format": FORMAT, "name": self.name, "pattern": self.pattern, "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size, "bos_id": self.bos_id,
            "sha256": {RANKS_FILE: hashlib.sha256(ranks).hexdigest(), BYTES_FILE: hashlib.sha256(lengths).hexdigest()},
        }
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{RANKS_FILE}", ranks)
        fs.pipe_file(f"{root}/{BYTES_FILE}", lengths)
        fs.pipe_file(f"{root}/{META_FILE}", json.dumps(meta, indent=1).encode())  # last: marks the set whole

    @classmethod
    def load(cls, url: str, storage_options: dict | None = None) -> "Tokenizer":
        """Read a tokenizer written by `save`; checks format, checksums and that the ids line up."""
        from trainer.storage import filesystem

        fs, root = filesystem(url, storage_options)
        # The files are untrusted (shared storage): sizes are checked before reading, every line is parsed
        # strictly, and the ranks must be exactly 0..n-1, so a line declaring rank 4e9 cannot make a reader
        # allocate a 4e9-entry table. Anything malformed is a TokenizerError naming the file.
        try:
            blob = _read_bounded(fs, f"{root}/{META_FILE}", MAX_META_BYTES)
            meta = json.loads(blob)
        except FileNotFoundError:
            raise TokenizerError(f"no tokenizer at {url}: {META_FILE} missing "
                                 "(train one with `llmctl tokenizer train`)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{url}/{META_FILE} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise TokenizerError(f"{url}/{META_FILE}: format {got!r:.60}, expected {FORMAT!r}")
        sums = meta.get("sha256")
        if not isinstance(sums, dict) or not all(isinstance(sums.get(f), str) for f in (RANKS_FILE, BYTES_FILE)):
            raise TokenizerError(f"{url}/{META_FILE}: no sha256 of {RANKS_FILE} and {BYTES_FILE}")
        if meta.get("pattern") != SPLIT_PATTERN:  # a stored regex runs on every text: only the recipe's own
            raise TokenizerError(f"{url}/{META_FILE}: split pattern is not the recipe's (SPLIT_PATTERN)")
        blobs = {}
        for fname in (RANKS_FILE, BYTES_FILE):
            try:
                blobs[fname] = _read_bounded(fs, f"{root}/{fname}", MAX_FILE_BYTES)
            except FileNotFoundError:
                raise TokenizerError(f"tokenizer at {url} is incomplete: {fname} missing") from None
            if hashlib.sha256(blobs[fname]).hexdigest() != sums[fname]:
                raise TokenizerError(f"{url}/{fname} does not match the checksum in {META_FILE}")
        ranks = _parse_ranks(blobs[RANKS_FILE], f"{url}/{RANKS_FILE}")
        name = meta.get("name", "llmctl-bpe")
        tok = cls(ranks, meta["pattern"], name if isinstance(name, str) else "llmctl-bpe")
        if tok.special_tokens != meta.get("special_tokens") or tok.vocab_size != meta.get("vocab_size"):
            raise TokenizerError(f"{url}: special tokens/vocab size in {META_FILE} disagree with {RANKS_FILE}")
        try:
            lengths = json.loads(blobs[BYTES_FILE])
        except (ValueError, UnicodeDecodeError):
            lengths = None
        if lengths != tok.token_bytes():
            raise TokenizerError(f"{url}/{BYTES_FILE} disagrees with the mergeable ranks")
        return tok

    # ---------------------------------------------------------------- encode / decode
    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token; they are {list(SPECIAL_TOKENS)}") from None

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings inside text are encoded as ordinary text."""
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id, *ids] if prepend_bos else ids

    def encode_batch(self, texts: list[str], prepend_bos: bool = False, num_threads: int = 4) -> list[list[int]]:
        out = self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if prepend_bos:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def encode_batch_arrays(self, texts: list[str], num_threads: int = 4) -> list:
        """Like `encode_batch` but each result is a numpy uint32 array built in Rust: no Python int per token.
        The data loader's path; ids equal `encode_batch`'s."""
        encode = self._encode_array
        if num_threads <= 1 or len(texts) < 2:
            return [encode(t) for t in texts]
        if self._pool is None or self._pool_size != num_threads:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="tokenize")
            self._pool_size = num_threads
        chunk = max(1, len(texts) // (4 * num_threads))
        parts = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
        return [a for part in self._pool.map(lambda p: [encode(t) for t in p], parts) for a in part]

    def _encode_array(self, text: str):
        try:
            return self.enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: tiktoken's own fallback, via the list path
            import numpy as np

            return np.asarray(self.enc.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 on their own (a split character) become U+FFFD."""
        return self.enc.decode(list(ids))

    def decode_text(self, ids: Iterable[int], *, partial: bool = False) -> str:
        """Text of `ids` as a person reads it: never a raw special token. A reply ends at its first
        `<|assistant_end|>` or `<|bos|>`; a python tool call (`<|python_start|>expr<|python_end|>`, with the
        tool's output `<|output_start|>value<|output_end|>` after it when there is one) is written back in
        the calculator notation of the GSM8K answers it was made from, `<<expr=value>>`; any other special
        token is dropped. `partial`: more tokens may follow (streaming), so a call that may still get its
        output is left open; the text only ever grows as tokens arrive."""
        sp = self.special_tokens
        starts = {sp["<|python_start|>"]: "python", sp["<|output_start|>"]: "output"}
        ends = {sp["<|python_end|>"], sp["<|output_end|>"]}
        segments: list[list] = [["text", [], False]]  # [kind, ids, closed]
        for t in ids:
            if t in (sp["<|assistant_end|>"], self.bos_id):
                break
            if t in starts:
                segments.append([starts[t], [], False])
            elif t in ends:
                segments[-1][2] = True
                segments.append(["text", [], False])
            elif t not in self._special_ids:
                segments[-1][1].append(t)
        segments = [seg for seg in segments if seg[0] != "text" or seg[1]]  # ends of calls leave empty ones
        out: list[str] = []
        for i, (kind, seg, closed) in enumerate(segments):
            text = self.decode(seg)
            nxt = segments[i + 1][0] if i + 1 < len(segments) else None
            if kind == "python":
                close = nxt != "output" and (nxt is not None or not partial)
                out.append(f"<<{text}" + (">>" if close else ""))
            elif kind == "output":
                prev = segments[i - 1][0] if i else None
                close = closed or nxt is not None or not partial
                out.append(("=" if prev == "python" else "<<=") + text + (">>" if close else ""))
            else:
                out.append(text)
        return "".join(out)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self) -> list[int]:
        """Raw byte length of every id (0 for the specials): the denominator of bits-per-byte."""
        lengths = [0] * self.vocab_size
        for tok, rank in self.mergeable_ranks.items():
            lengths[rank] = len(tok)
        return lengths

    def __getstate__(self):  # in-memory hand-off (e.g. Ray) only; storage never holds a pickle
        return {k: v for k, v in self.__dict__.items() if k != "_pool"} | {"_pool": None, "_pool_size": 0}

    # ---------------------------------------------------------------- chat
    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 = the assistant is trained on this token) of one conversation.

        `conversation["messages"]` alternates user/assistant (an optional system message first). Assistant
        content is a string or a list of parts {"type": "text"|"python"|"python_output", "text": ...}.
        The result is cropped to `max_tokens`."""
        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = copy.deepcopy(messages[1])
            merged["content"] = messages[0]["content"] + "\n\n" + merged["content"]
            messages = [merged, *messages[2:]]
        if not messages:
            raise ValueError("conversation has no messages")
        sp = self.special_tokens
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], m: int) -> None:
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        add([self.bos_id], 0)
        for i, msg in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if msg["role"] != want:
                raise ValueError(f"message {i} is from {msg['role']!r}, expected {want!r} (turns alternate, user first)")
            content = msg["content"]
            if want == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string")
                add([sp["<|user_start|>"], *self.encode(content), sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind, text = part["type"], self.encode(part["text"])
                    if kind == "text":
                        add(text, 1)
                    elif kind == "python":
                        add([sp["<|python_start|>"], *text, sp["<|python_end|>"]], 1)
                    elif kind == "python_output":
                        add([sp["<|output_start|>"], *text, sp["<|output_end|>"]], 0)
                    else:
                        raise ValueError(f"message {i}: unknown part type {kind!r}")
            else:
                raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
            add([sp["<|assistant_end|>"]], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids for generation: the conversation without its last (assistant) message, then
        `<|assistant_start|>`. Used by RL and generative evals."""
        messages = list(conversation["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]}, max_tokens=1 << 62)
        return [*ids, self.special_tokens["<|assistant_start|>"]]


def iter_shard_texts(data_url: str, *, split: str = "train", max_chars: int | None = None, doc_cap: int | None = None,
                     storage_options: dict | None = None, show_progress: bool = False) -> Iterable[str]:
    """Documents of the train (all shards but the last) or val (the last) split, in order, each cropped to
    `doc_cap` characters, until `max_chars` characters were yielded."""
    from trainer.progress import progress_bar
    from trainer.data.shards import ShardReader, list_shards

    urls = list_shards(data_url, storage_options)
    urls = urls[-1:] if split == "val" else urls[:-1] or urls
    shards = ShardReader(urls, storage_options, retries=8, backoff=1.0, on_retry=None)
    total = 0
    with progress_bar(show_progress, f"reading {split} text (chars)", None) as advance:
        for i in range(len(urls)):
            for rg in range(shards.num_row_groups(i)):
                for text in shards.read_row_group(i, rg):
                    text = text[:doc_cap] if doc_cap else text
                    yield text
                    total += len(text)
                    advance(len(text))
                    if max_chars is not None and total >= max_chars:
                        return


"""`llmctl tokenizer train`: train the BPE tokenizer on a shard directory and store it as text/JSON.

    llmctl tokenizer train --data s3://bucket/llmctl/data/climbmix --vocab 32768 --out s3://bucket/llmctl/tokenizers/bpe-32768

Reads the train shards (all but the last), each document capped at --doc-cap characters, until --max-chars
(nanochat tok_train.py: 10,000 and 2e9), trains with rustbpe, reports compression on the val shard, and
writes tokenizer.tiktoken + token_bytes.json + tokenizer.json under --out. tiktoken/rustbpe load inside the command.
"""

from __future__ import annotations

import time

from cli.errors import CLIError, UsageError


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train the BPE tokenizer",
                       description="Train and store the byte-level BPE tokenizer (rustbpe, served by tiktoken).")
    p.set_defaults(func=lambda args: p.print_help() or 0)
    tsub = p.add_subparsers(title="tokenizer commands", metavar="COMMAND")
    pt = tsub.add_parser("train", help="train on shards and save (text/JSON, no pickle)",
                         description=__doc__.split("\n\n")[2].replace("\n", " "),
                         epilog="Example: " + __doc__.split("\n\n")[1].strip())
    pt.add_argument("--data", required=True, help="shard directory URL (the output of `llmctl data prepare/sample`)")
    pt.add_argument("--vocab", type=int, default=32768, help="vocabulary size incl. the 9 special tokens (default 32768)")
    pt.add_argument("--out", required=True, help="directory URL to write the tokenizer to")
    pt.add_argument("--max-chars", type=float, default=2e9, help="characters of training text (default 2e9)")
    pt.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document (default 10000)")
    pt.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    if args.vocab < 265:
        raise UsageError(f"--vocab must be >= 265 (256 byte tokens + 9 special tokens), got {args.vocab}")
    if not 1 <= args.max_chars < float("inf") or args.doc_cap < 1 or args.vocab > 1 << 20:
        raise UsageError("--max-chars and --doc-cap must be finite and >= 1, --vocab at most 1,048,576")
    from trainer.data.shards import DataError, StorageError
    from trainer.data.tokenizer import Tokenizer, iter_shard_texts

    t0 = time.perf_counter()
    try:
        tok = Tokenizer.train_from_shards(args.data, args.vocab, max_chars=int(args.max_chars), doc_cap=args.doc_cap,
                                          show_progress=True)
        seconds = time.perf_counter() - t0
        val = list(iter_shard_texts(args.data, split="val", max_chars=2_000_000))
    except DataError as e:
        raise UsageError(str(e)) from None
    except StorageError as e:
        raise CLIError(str(e)) from None
    if tok.vocab_size < args.vocab:
        print(f"note: the corpus supplied only {tok.vocab_size} ids (asked for {args.vocab})")
    tok.save(args.out)
    print(f"trained {tok.vocab_size} ids in {seconds:.1f}s; val compression {tok.bytes_per_token(val):.2f} bytes/token")
    print(f"saved to {args.out}")
    return 0

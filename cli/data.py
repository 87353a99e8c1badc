"""`llmctl data`: build pretraining shards (and a small SFT set) in the reference layout at any fsspec URL.

    llmctl data prepare --source ./corpus.jsonl --out s3://bucket/llmctl/data/mine
    llmctl data prepare --source HuggingFaceFW/fineweb-edu --config sample-10BT --max-docs 1000000 --out ...
    llmctl data sample --out file://~/.cache/llmctl/data/pydocs --mb 8
    llmctl data sample --sft --out file://~/.cache/llmctl/sft/pydocs

Shards: `shard_NNNNN.parquet`, a `text` column, 1024-document row groups, the last shard is validation.
S3 endpoints and keys come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
Heavy imports (pyarrow, datasets) happen inside the commands.
"""

from __future__ import annotations

import argparse

from cli.errors import CLIError, UsageError


def register(sub) -> None:
    p = sub.add_parser("data", help="build pretraining shards or a sample corpus",
                       description="Build pretraining data in the reference shard layout (parquet, `text` column, "
                       "1024-doc row groups, last shard = validation) at a local path or an fsspec URL.",
                       epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: p.print_help() or 0)
    dsub = p.add_subparsers(title="data commands", metavar="COMMAND")

    pp = dsub.add_parser("prepare", help="turn files or a Hugging Face dataset into shards",
                         description="Stream documents from local/fsspec files (.jsonl, .json, .parquet, .txt; a file "
                         "or a directory) or a Hugging Face dataset name, and write shards.",
                         epilog="Example: llmctl data prepare --source ./docs.jsonl --out file:///data/mine")
    pp.add_argument("--source", required=True, help="file, directory, fsspec URL, or Hugging Face dataset name")
    pp.add_argument("--out", required=True, help="output directory URL (s3://bucket/prefix, file://..., a path)")
    pp.add_argument("--config", help="Hugging Face dataset config name (e.g. sample-10BT)")
    pp.add_argument("--split", default="train", help="Hugging Face dataset split (default train)")
    pp.add_argument("--text-column", default="text", help="column holding the document text (default text)")
    pp.add_argument("--max-docs", type=int, help="stop after this many documents (default: all)")
    _add_layout_args(pp, shard_chars_default=250_000_000)
    pp.set_defaults(func=cmd_prepare)

    ps = dsub.add_parser("sample", help="build a small real-text corpus offline (Python's own docs)",
                         description="Build a corpus from the documentation installed with Python (stdlib docstrings, "
                         "pydoc topics, then installed packages' docstrings): no network needed. With --sft, "
                         "write a small conversation set ({train,val}/{smoltalk,mmlu,gsm8k}.jsonl) instead.",
                         epilog="Example: llmctl data sample --out file://~/.cache/llmctl/data/pydocs --mb 8")
    ps.add_argument("--out", required=True, help="output directory URL")
    ps.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of text (default 8)")
    ps.add_argument("--shards", type=int, default=4, help="number of shards, >= 2; the last is val (default 4)")
    ps.add_argument("--row-group-size", type=int, default=1024,
                    help="documents per row group (default 1024; smaller for tiny corpora and many ranks)")
    ps.add_argument("--sft", action="store_true", help="write a conversation dataset instead of shards")
    ps.add_argument("--conversations", type=int, default=2000, help="with --sft: number of conversations")
    ps.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    ps.add_argument("--force", action="store_true", help="write even if the output already holds data")
    ps.set_defaults(func=cmd_sample)


def _add_layout_args(p, shard_chars_default: int) -> None:
    p.add_argument("--shard-chars", type=int, default=shard_chars_default,
                   help="close a shard at the first row-group boundary past this many characters (default 250M)")
    p.add_argument("--row-group-size", type=int, default=1024, help="documents per row group (default 1024)")
    p.add_argument("--force", action="store_true", help="write even if the output already holds shards")


def _check_out(url: str, force: bool, pattern: str = "*.parquet") -> None:
    from trainer.storage import filesystem

    try:
        fs, root = filesystem(url)
        existing = fs.glob(f"{root}/{pattern}") + fs.glob(f"{root}/*/*.jsonl")
    except FileNotFoundError:
        return
    except Exception as e:  # unreachable endpoint, bad credentials, bad URL
        raise CLIError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if existing and not force:
        raise UsageError(f"{url} already holds data ({len(existing)} files); pick another --out or pass --force")


def cmd_prepare(args) -> int:
    if args.shard_chars < 1 or args.row_group_size < 1 or (args.max_docs is not None and args.max_docs < 1):
        raise UsageError("--shard-chars, --row-group-size and --max-docs must be >= 1")
    from trainer.data.corpus import iter_source_texts
    from trainer.data.shards import DataError, write_shards

    _check_out(args.out, args.force)
    try:
        texts = iter_source_texts(args.source, text_column=args.text_column, split=args.split, config=args.config)
        urls = write_shards(texts, args.out, shard_chars=args.shard_chars, row_group_size=args.row_group_size,
                            max_docs=args.max_docs, show_progress=True, total=args.max_docs)
    except DataError as e:
        raise UsageError(str(e)) from None
    _report(urls)
    return 0


def cmd_sample(args) -> int:
    if args.mb <= 0 or args.shards < 2 or args.row_group_size < 1 or args.conversations < 2:
        raise UsageError("need --mb > 0, --shards >= 2, --row-group-size >= 1, --conversations >= 2")
    _check_out(args.out, args.force)
    if args.sft:
        from trainer.data.sft import build_sample_conversations

        files = build_sample_conversations(args.out, n=args.conversations, seed=args.seed, show_progress=True)
        for split, urls in files.items():
            print(f"{split}: {', '.join(urls)}")
        return 0
    from trainer.data.corpus import build_sample_corpus

    _report(build_sample_corpus(args.out, mb=args.mb, shards=args.shards, row_group_size=args.row_group_size,
                                seed=args.seed, show_progress=True))
    return 0


def _report(urls: list[str]) -> None:
    print(f"wrote {len(urls)} shards ({len(urls) - 1} train + 1 val):")
    for u in urls:
        print(f"  {u}")

"""The inputs a local run builds for itself, each once, at its plan's URLs: a sample corpus from the documentation
installed with Python, sample conversations, a BPE tokenizer trained on the corpus, and (with an eval stage) a
smoke CORE bundle from held-out text. Shared by `submit --local` (cli/local.py) and `sweep --local` (cli/sweep.py).
"""

from __future__ import annotations

SAMPLE_MB = 8  # the quick preset's corpus: ~2M tokens at a 4K vocab (cli/local.py PRESETS)
SAMPLE_ROW_GROUP = 64  # docs per row group: small, so every rank gets row groups of the one val shard
SFT_CONVERSATIONS = 3000
SMOKE_CORE_PER_TASK = 40  # examples per task of the smoke bundle from held-out text


def ensure_inputs(p, opts: dict | None = None, *, mb: float = SAMPLE_MB, conversations: int = SFT_CONVERSATIONS,
                  say=print, show_progress: bool = False) -> None:
    """Sample corpus, conversations and tokenizer at the plan's URLs, each built once (idempotent)."""
    from trainer.data.sft import build_sample_conversations
    from trainer.data.corpus import build_sample_corpus
    from trainer.evaluate import build_smoke_bundle_from_val
    from trainer.data.tokenizer import Tokenizer

    data, sft, tok = p.urls["data"], p.urls["sft_data"], p.urls["tokenizer"]
    opts = opts or {}
    if not _exists(data, opts):
        say(f"building the sample corpus at {data} (Python's own documentation, no download)")
        build_sample_corpus(data, mb=mb, row_group_size=SAMPLE_ROW_GROUP, storage_options=opts,
                            show_progress=show_progress)
    if not _exists(sft, opts):
        say(f"building sample conversations at {sft}")
        build_sample_conversations(sft, n=conversations, storage_options=opts, show_progress=show_progress)
    if not _exists(tok, opts):
        say(f"training a {p.spec.vocab_size}-token BPE tokenizer at {tok}")
        Tokenizer.train_from_shards(data, p.spec.vocab_size, storage_options=opts,
                                    show_progress=show_progress).save(tok, storage_options=opts)
    if "eval" in p.spec.stages and not _exists(p.urls["eval_bundle"], opts):
        say(f"building a smoke CORE bundle at {p.urls['eval_bundle']} from held-out text (not a capability score)")
        build_smoke_bundle_from_val(data, p.urls["eval_bundle"], per_task=SMOKE_CORE_PER_TASK, storage_options=opts)


def _exists(url: str, opts: dict) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs.exists(path) and bool(fs.ls(path))

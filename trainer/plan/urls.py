"""Untrusted URLs and names: the rules a storage URL or a stored name must meet before anything opens it.

Stored files are written by whoever can write the bucket, and flags by whoever runs the CLI, so a URL or a name
read from either is checked here, without touching storage:
- `require_shared`: the protocols every pod of a cluster run can reach (no file://, no bare paths);
- `safe_name`: one path component (no separators, no `..`, no control characters);
- `storage_root_of` / `rebase`: a URL read from a stored file is re-derived under the root the run was opened
  from, never followed as written;
- `hf_export_url`: where a run's Hugging Face export lives by default (`llmctl export`, `llmctl serve --engine
  vllm`, lm-eval), one rule for all of them.
Stdlib only: the spec validates its URLs with these (trainer/plan/spec.py); trainer/storage.py opens them.
"""

from __future__ import annotations

import re

DEFAULT_STORAGE = "file://~/.cache/llmctl"  # RunSpec.storage_root's default; runs live under <storage>/runs/<name>
# A run's Hugging Face exports: <run>/export/hf-sft (the chat model) and <run>/export/hf-base (the pretrained one).
# Stage names as the CLI takes them (sft/chat, pretrain/base) -> the export's directory suffix.
HF_EXPORT_STAGES = {"sft": "sft", "chat": "sft", "pretrain": "base", "base": "base"}


# Storage that every pod of a cluster run reaches (fsspec protocols: s3fs, gcsfs, adlfs, huggingface_hub).
# file://, local://, memory:// and bare paths live on one machine: checkpoints would stay on one node.
SHARED_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf")
# A name that becomes one path component (dataset, tokenizer, stage): no separators, no `..`, no control chars.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UnsafeURL(ValueError):
    """A URL or name from a flag or a stored file that would leave the storage it belongs to (says which)."""


def protocol(url: str) -> str | None:
    """`s3://b/x` -> "s3"; a bare path -> None. Case is kept: `FILE://` is not `file://`."""
    head, sep, _ = url.partition("://")
    return head if sep else None


def require_shared(url: str, what: str) -> None:
    """Refuse storage a cluster's pods cannot all reach (a path, file://, local://, memory://, odd case)."""
    if protocol(url) not in SHARED_PROTOCOLS:
        raise UnsafeURL(f"{what}: {url} is not reachable from every node, and pods need shared storage: "
                        f"{', '.join(p + '://' for p in SHARED_PROTOCOLS)} (e.g. s3://bucket/prefix)")


def safe_name(name, what: str) -> str:
    """`name` when it is one plain path component (letters, digits, `.`, `_`, `-`; not `.`/`..`)."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or set(name) == {"."}:
        raise UnsafeURL(f"{what}: {name!r} is not a plain name (letters, digits, '.', '_', '-'; no '/' or '..')")
    return name


def storage_root_of(run: str) -> str:
    """The storage root of a run URL `<root>/runs/<name>`; refuses a run URL not in that layout."""
    parent, _, name = run.rstrip("/").rpartition("/")
    root, _, runs = parent.rpartition("/")
    if runs != "runs" or not root or not name:
        raise UnsafeURL(f"{run} is not a run URL of the form <storage>/runs/<name>")
    return root


def rebase(stored: str, stored_root: str, root: str, subdir: str, what: str) -> str:
    """A URL read from a stored file, re-derived under `root`: it must be `<stored_root>/<subdir>/<one name>`,
    and the answer is `<root>/<subdir>/<name>`, so a planted plan.json cannot point a reader elsewhere."""
    prefix = f"{str(stored_root).rstrip('/')}/{subdir}/"
    if not isinstance(stored, str) or not stored.startswith(prefix):
        raise UnsafeURL(f"{what}: {stored!r} is not under the run's storage ({prefix}...)")
    return f"{root.rstrip('/')}/{subdir}/{safe_name(stored[len(prefix):].rstrip('/'), what)}"


def hf_export_url(run_url: str, stage: str = "sft") -> str:
    """The default place of a run's Hugging Face export (safetensors, config.json, tokenizer.json, modeling
    code): `<run_url>/export/hf-sft` for the chat model, `<run_url>/export/hf-base` for the pretrained one.
    `stage` is sft/chat or pretrain/base; anything else is a ValueError that lists them."""
    if stage not in HF_EXPORT_STAGES:
        raise ValueError(f"stage {stage!r} has no Hugging Face export; one of {', '.join(HF_EXPORT_STAGES)}")
    return f"{run_url.rstrip('/')}/export/hf-{HF_EXPORT_STAGES[stage]}"

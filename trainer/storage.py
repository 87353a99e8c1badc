"""Where runs and data live: URLs, filesystems, storage options and small JSON documents, in one place.

Every module that touches storage goes through here, so a custom S3 endpoint (MinIO, a cloud's S3 API, the
tests' moto server) is configured once and behaves the same for the CLI, the driver and the workers:

- `expand(url)`: `file://~/x` or a bare path -> an absolute `file://` URL; other URLs unchanged;
- `storage_options_from_env()`: s3fs options from the environment (the endpoint; keys are read by botocore);
- `filesystem(url, opts)`: (fsspec filesystem, path); s3:// URLs get the environment's options by default;
- `read_json` / `write_json` / `write_text`: documents read as None when absent, written atomically
  (a `.tmp` then a rename) so a reader never sees half a file;
- `run_url(run, storage)`: a run name or URL -> the run's URL; `read_plan(url)`: its stored plan as a dict;
- `read_small_json(url, max_bytes)`: a document the CLI reads from a run it did not write itself (progress,
  spend): refused above a size bound instead of read whole.
The rules an untrusted URL or stored name must meet before it is opened are in trainer/plan/urls.py.

Torch-free and light: the CLI imports it (fsspec is imported on first use).
"""

from __future__ import annotations

import json
import os

from trainer.plan.urls import DEFAULT_STORAGE


class RunNotFound(LookupError):
    """No run (no plan.json) at the resolved URL."""


def expand(url: str) -> str:
    """`file://~/x` -> `file:///home/me/x`; a bare path -> a `file://` URL; other URLs unchanged."""
    if url.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(url[len("file://"):]))
    if "://" not in url:
        return "file://" + os.path.abspath(os.path.expanduser(url))
    return url


def storage_options_from_env(env: dict | None = None) -> dict:
    """s3fs options from the environment, so a custom endpoint (MinIO, moto, a cloud's S3 API) works in pods
    and tests alike. Keys and region are read by botocore itself (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_REGION); in pods they come from a Secret by reference."""
    env = os.environ if env is None else env
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    return {"endpoint_url": endpoint} if endpoint else {}


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path without protocol) for `url`. Without explicit options, s3:// URLs get
    `storage_options_from_env()`; other protocols get none."""
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    if storage_options is None:
        storage_options = storage_options_from_env() if protocol in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path.rstrip("/") or path


def read_json(url: str, storage_options: dict | None = None) -> dict | None:
    """The JSON document at `url`, or None when there is none."""
    fs, path = filesystem(url, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def write_text(url: str, text: str, storage_options: dict | None = None) -> None:
    """Write `text` at `url` atomically: `<url>.tmp`, then a rename (a reader sees the old file or the new)."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path + ".tmp", "w") as f:
        f.write(text)
    fs.mv(path + ".tmp", path)


def write_json(url: str, doc, storage_options: dict | None = None) -> None:
    """`doc` as indented JSON at `url`, written atomically (`write_text`)."""
    write_text(url, json.dumps(doc, indent=2), storage_options)


def run_url(run: str, storage: str = DEFAULT_STORAGE) -> str:
    """A run name -> `<storage>/runs/<name>`; a URL (`s3://…`, `file://…`) or a path -> itself, expanded."""
    if "://" in run or run.startswith(("/", ".", "~")):
        return expand(run).rstrip("/")
    return f"{expand(storage).rstrip('/')}/runs/{run}"


def read_plan(url: str, storage_options: dict | None = None) -> dict:
    """The run's stored plan as a dict (not re-planned: a run made by an older version still opens)."""
    plan = read_json(f"{url}/plan.json", storage_options)
    if plan is None:
        raise RunNotFound(f"no run at {url} (no plan.json there)")
    return plan


class DocumentTooLarge(ValueError):
    """A stored document over the size its reader accepts."""


def read_small_json(url: str, max_bytes: int, storage_options: dict | None = None):
    """The JSON document at `url` (None when absent), read only when it is at most `max_bytes` long: stored
    files are untrusted, and a reader must not be made to pull gigabytes. Invalid JSON raises ValueError."""
    fs, path = filesystem(url, storage_options)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return None
    if size is not None and size > max_bytes:
        raise DocumentTooLarge(f"{url} is {size:,} bytes, over the {max_bytes:,} this reader accepts")
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except FileNotFoundError:
        return None
    if len(data) > max_bytes:
        raise DocumentTooLarge(f"{url} is over the {max_bytes:,} bytes this reader accepts")
    return json.loads(data)

"""Where runs and data live: URLs, filesystems, storage options and small JSON documents, in one place.

Every module that touches storage goes through here, so a custom S3 endpoint (MinIO, a cloud's S3 API, the
tests' moto server) is configured once and behaves the same for the CLI, the driver and the workers:

- `expand(url)`: `file://~/x` or a bare path -> an absolute `file://` URL; other URLs unchanged;
- `storage_options_from_env()`: s3fs options from the environment (the endpoint; keys are read by botocore);
- `filesystem(url, opts)`: (fsspec filesystem, path); s3:// URLs get the environment's options by default;
- `read_json` / `write_json` / `write_text` / `write_bytes`: documents read as None when absent and
  bounded (MAX_JSON_BYTES), written atomically so a reader never sees half a file: on local files a
  temporary file of a unique name, created without following links, then a rename; a symbolic link where a
  file is expected is refused (`UnsafeFile`), for reads and writes; on object storage one PUT;
- `update_json(url, change)`: read-modify-write of a document several writers share (spend.json,
  workers.json) with no update lost: an fcntl lock beside a local file, a conditional PUT (If-Match /
  If-None-Match) on S3, one writer by design elsewhere;
- `run_url(run, storage)`: a run name or URL -> the run's URL; `read_plan(url)`: its stored plan as a dict;
- `read_small_json(url, max_bytes)`: a document the CLI reads from a run it did not write itself (progress,
  spend): refused above a size bound instead of read whole.
The rules an untrusted URL or stored name must meet before it is opened are in trainer/plan/urls.py.

Torch-free and light: the CLI imports it (fsspec is imported on first use).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import sys
import threading

from trainer.plan.urls import DEFAULT_STORAGE


MAX_JSON_BYTES = 16 * 1024 * 1024  # the default bound of a stored JSON read: run documents are KB to a few MB


class RunNotFound(LookupError):
    """No run (no plan.json) at the resolved URL."""


class DocumentTooLarge(ValueError):
    """A stored document over the size its reader accepts."""


class UnsafeFile(ValueError):
    """A symbolic link (or a FIFO, a device) where a stored file is expected: refused, never followed."""


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


def read_json(url: str, storage_options: dict | None = None, max_bytes: int | None = None):
    """The JSON document at `url`, or None when there is none. Bounded like every stored read
    (`read_small_json`): above `max_bytes` (default MAX_JSON_BYTES) it is refused, not read."""
    return read_small_json(url, MAX_JSON_BYTES if max_bytes is None else max_bytes, storage_options)


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _refuse_link(path: str) -> None:
    """Refuse a symbolic link (or a FIFO, a device, a directory) where a stored file is expected."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFile(f"{path} is a symbolic link where a file is expected: refused (remove it if it is yours)")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path} is not a regular file: refused")


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write `data` at `url` so a reader sees the old file or the new, never half of one.

    Local files: a temporary file of a unique name beside the target, created exclusively without following
    links (O_CREAT | O_EXCL | O_NOFOLLOW), then renamed over the target (a rename replaces a name, it never
    writes through a link); a symbolic link where the file should be is refused (`UnsafeFile`). Object
    storage: one PUT, which S3 and its kin make visible whole."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    if not _is_local(fs):
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _refuse_link(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(url: str, text: str, storage_options: dict | None = None) -> None:
    """Write `text` at `url` atomically (`write_bytes`: a unique temporary file then a rename on local files,
    one PUT on object storage)."""
    write_bytes(url, text.encode(), storage_options)


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


def _loads(data: bytes, url: str):
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{url}: JSON nested too deeply") from None


def _read_local(path: str, max_bytes: int, url: str) -> bytes | None:
    """A local file's bytes (None when absent), opened without following a link and without blocking on a
    FIFO, refused when it is not a regular file or is over `max_bytes`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile(f"{url} is a symbolic link where a file is expected: refused") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{url} is not a regular file: refused")
        if st.st_size > max_bytes:
            raise DocumentTooLarge(f"{url} is {st.st_size:,} bytes, over the {max_bytes:,} this reader accepts")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DocumentTooLarge(f"{url} is over the {max_bytes:,} bytes this reader accepts")
    return data


def read_bytes(url: str, max_bytes: int, storage_options: dict | None = None) -> bytes | None:
    """The file at `url` (None when absent), bounded and never through a link, like `read_small_json`."""
    fs, path = filesystem(url, storage_options)
    if _is_local(fs):
        return _read_local(path, max_bytes, url)
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except FileNotFoundError:
        return None
    if len(data) > max_bytes:
        raise DocumentTooLarge(f"{url} is over the {max_bytes:,} bytes this reader accepts")
    return data


def read_text(url: str, max_bytes: int, storage_options: dict | None = None) -> str | None:
    """The text file at `url` (None when absent), bounded and never through a link, like `read_small_json`;
    invalid UTF-8 is replaced, not an error."""
    data = read_bytes(url, max_bytes, storage_options)
    return None if data is None else data.decode("utf-8", "replace")


def read_small_json(url: str, max_bytes: int, storage_options: dict | None = None):
    """The JSON document at `url` (None when absent), read only when it is at most `max_bytes` long: stored
    files are untrusted, and a reader must not be made to pull gigabytes. Invalid JSON (nesting that would
    exhaust the parser's stack included) raises ValueError; a link where the file should be, `UnsafeFile`."""
    fs, path = filesystem(url, storage_options)
    if not _is_local(fs):  # object storage: its size first, so a large object is refused without a read
        try:
            size = fs.size(path)
        except FileNotFoundError:
            return None
        if size is not None and size > max_bytes:
            raise DocumentTooLarge(f"{url} is {size:,} bytes, over the {max_bytes:,} this reader accepts")
    data = read_bytes(url, max_bytes, storage_options)
    return None if data is None else _loads(data, url)


# ------------------------------------------------------------------ read-modify-write of one shared document

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
CONDITIONAL_TRIES = 50


def update_json(url: str, change, storage_options: dict | None = None, *, max_bytes: int | None = None,
                replace_invalid: bool = False):
    """Read the JSON document at `url`, apply `change(doc or None) -> new doc`, write it back, with no other
    writer's update lost in between; return the new document. A document that cannot be read (invalid, too
    large) raises, or with `replace_invalid` is handed to `change` as None.

    - Local files: an exclusive `fcntl.flock` on `.<name>.lock` beside the file (opened without following
      links) held across the read and the atomic write; a thread lock per path besides, for threads of one
      process.
    - S3 (`s3://`, `s3a://`): a conditional write, with no lock: the PUT carries `If-Match: <ETag read>` (or
      `If-None-Match: *` when there was no document), so a writer that lost the race gets 412 and reads and
      applies its change again. AWS S3 and MinIO honour both headers; a server that answers 501 to them gets
      a plain PUT (the single-writer rule below).
    - Other backends: the single-writer rule: each such document has one writer at a time by design (a run's
      launcher for spend.json; the rank 0 of the worker group that just started for workers.json)."""
    limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
    fs, path = filesystem(url, storage_options)

    def read():
        try:
            return read_small_json(url, limit, storage_options)
        except ValueError:
            if replace_invalid and not isinstance(sys.exc_info()[1], UnsafeFile):
                return None
            raise

    if _is_local(fs):
        with _local_lock(path):
            new = change(read())
            write_json(url, new, storage_options)
        return new
    if fs.protocol and set(fs.protocol) & {"s3", "s3a"}:
        return _update_s3(fs, path, url, change, limit, replace_invalid)
    new = change(read())
    write_json(url, new, storage_options)
    return new


@contextlib.contextmanager
def _local_lock(path: str):
    import fcntl

    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(path, threading.Lock())
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    lock_path = os.path.join(parent, f".{os.path.basename(path)}.lock")
    with tlock:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFile(f"{lock_path} is a symbolic link where a lock file is expected: refused") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _update_s3(fs, path: str, url: str, change, limit: int, replace_invalid: bool):
    import random
    import time

    from botocore.exceptions import ClientError

    bucket, key = path.split("/", 1)
    client = _s3_client(fs)
    for attempt in range(CONDITIONAL_TRIES):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
            head = None
        doc, cond = None, {"IfNoneMatch": "*"}
        if head is not None:
            if head["ContentLength"] > limit:
                if not replace_invalid:
                    raise DocumentTooLarge(f"{url} is {head['ContentLength']:,} bytes, over the {limit:,} "
                                           "this reader accepts")
            else:
                try:
                    body = client.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])["Body"].read(limit + 1)
                except ClientError as e:
                    if _s3_code(e) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                        continue  # changed (or gone) between the HEAD and the GET: read again
                    raise
                try:
                    if len(body) > limit:
                        raise DocumentTooLarge(f"{url} is over the {limit:,} bytes this reader accepts")
                    doc = _loads(body, url)
                except ValueError:
                    if not replace_invalid:
                        raise
            cond = {"IfMatch": head["ETag"]}
        new = change(doc)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=json.dumps(new, indent=2).encode(), **cond)
            fs.invalidate_cache(path)
            return new
        except ClientError as e:
            code = _s3_code(e)
            if code in ("NotImplemented", "501"):  # a server without conditional writes: single-writer rule
                client.put_object(Bucket=bucket, Key=key, Body=json.dumps(new, indent=2).encode())
                fs.invalidate_cache(path)
                return new
            if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise
        time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** attempt)))
    raise TimeoutError(f"{url}: {CONDITIONAL_TRIES} conditional writes lost to other writers")


def _s3_code(e) -> str:
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _s3_client(fs):
    """A plain (synchronous) botocore S3 client with the filesystem's endpoint, keys and client settings."""
    import boto3
    from botocore.config import Config

    kw = dict(fs.client_kwargs or {})
    if fs.endpoint_url:
        kw.setdefault("endpoint_url", fs.endpoint_url)
    if fs.key:
        kw.setdefault("aws_access_key_id", fs.key)
    if fs.secret:
        kw.setdefault("aws_secret_access_key", fs.secret)
    if fs.token:
        kw.setdefault("aws_session_token", fs.token)
    return boto3.session.Session().client("s3", config=Config(**(fs.config_kwargs or {})), **kw)


def ray_storage(url: str, opts: dict):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig from any fsspec URL."""
    fs, path = filesystem(url, opts)
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))

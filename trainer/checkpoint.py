"""Checkpoints: what a run saves so that a dead pod costs minutes, and how it is read back safely.

One checkpoint is one directory, written by every rank into its own local folder and merged into a single
storage directory by Ray Train's `report` (`<run>/<stage>/<stage>_step<NNNNNN>/`):

    model.pt                 rank 0: the model's state dict (tensors only; one copy)
    optim_rank<r>.pt         every rank: its optimizer shard (see trainer/optim.py for the layout)
    loader_rank<r>.json      every rank: its data loader position (exact resume: the next unseen document)
    meta.json                rank 0: step, stage, world size, loop state, and the list of files above

A checkpoint is whole only when meta.json and every file it lists are present; `verify` refuses anything
else, and Ray registers a checkpoint (so `ray.train.get_checkpoint()` returns it) only after every rank's
upload finished. A crash during a save therefore leaves the previous checkpoint as the latest.
Nothing is unpickled: tensors load with `torch.load(weights_only=True)`, the rest is JSON.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from trainer.storage import filesystem

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
FORMAT = "llmctl.checkpoint/v1"
_STEP_DIR = re.compile(r"(?P<stage>[a-z]+)_step(?P<step>\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial, or from an incompatible run."""


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def loader_file(rank: int) -> str:
    return f"loader_rank{rank}.json"


def dir_name(stage: str, step: int) -> str:
    return f"{stage}_step{step:06d}"


@dataclass(frozen=True)
class Meta:
    step: int  # optimizer steps completed; training resumes at this step
    stage: str
    world_size: int
    run: str
    loop_state: dict[str, Any]  # elapsed seconds, tokens, dollars, smoothed loss, best val bpb, ...
    files: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "step": self.step, "stage": self.stage,
                           "world_size": self.world_size, "run": self.run, "loop_state": self.loop_state,
                           "files": list(self.files)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Meta:
        try:  # meta.json sits in shared storage: anything but the shape `to_json` writes is a CheckpointError
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise CheckpointError(f"unknown checkpoint format {d.get('format') if isinstance(d, dict) else d!r:.60}"
                                      f" (expected {FORMAT})")
            meta = cls(step=d["step"], stage=d["stage"], world_size=d["world_size"], run=d["run"],
                       loop_state=d["loop_state"], files=tuple(d["files"]))
        except (ValueError, KeyError, TypeError) as e:  # CheckpointError is a RuntimeError: not caught here
            raise CheckpointError(f"checkpoint meta.json is not valid ({type(e).__name__}: {e})") from None
        if not (isinstance(meta.step, int) and isinstance(meta.world_size, int) and isinstance(meta.loop_state, dict)
                and all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in meta.files)):
            raise CheckpointError("checkpoint meta.json: step, world_size, loop_state or files of the wrong shape "
                                  "(files are plain names inside the checkpoint directory)")
        return meta


def save(path: str, *, model, optimizer, loader_state: dict, rank: int, world_size: int, step: int,
         stage: str, run: str, loop_state: dict) -> None:
    """Write this rank's share of a checkpoint into the local directory `path` (created if needed).

    Data files first and meta.json last, each through a temporary name, so a reader never sees a torn file.
    """
    import torch

    os.makedirs(path, exist_ok=True)

    def put(name: str, write) -> None:
        tmp = os.path.join(path, f".{name}.tmp")
        write(tmp)
        os.replace(tmp, os.path.join(path, name))

    put(optim_file(rank), lambda f: torch.save(optimizer.state_dict(), f))
    put(loader_file(rank), lambda f: _write_text(f, json.dumps(loader_state)))
    if rank == 0:
        put(MODEL_FILE, lambda f: torch.save(_plain_state_dict(model), f))
        files = [MODEL_FILE] + [optim_file(r) for r in range(world_size)] + [loader_file(r) for r in range(world_size)]
        meta = Meta(step=step, stage=stage, world_size=world_size, run=run, loop_state=loop_state,
                    files=tuple(files))
        put(META_FILE, lambda f: _write_text(f, meta.to_json()))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _plain_state_dict(model) -> dict:
    """The uncompiled model's state dict (torch.compile prefixes keys with `_orig_mod.`)."""
    inner = getattr(model, "_orig_mod", model)
    return {k: v.detach() for k, v in inner.state_dict().items()}


def verify(path: str, fs=None) -> Meta:
    """Meta of the checkpoint at `path` if it is whole, else CheckpointError naming what is missing."""
    fs = fs or _local_fs()
    meta_path = posixpath.join(path, META_FILE)
    if not fs.exists(meta_path):
        raise CheckpointError(f"checkpoint {path} is incomplete: no {META_FILE}")
    size = fs.size(meta_path)
    if size is not None and size > MAX_JSON_FILE_BYTES:  # stored and untrusted: refused before it is read
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is {size:,} bytes, over {MAX_JSON_FILE_BYTES:,}")
    meta = Meta.from_json(fs.cat_file(meta_path, start=0, end=MAX_JSON_FILE_BYTES).decode(errors="replace"))
    missing = [f for f in meta.files if not fs.exists(posixpath.join(path, f))]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return meta


MAX_JSON_FILE_BYTES = 64 * 1024 * 1024  # meta.json and each rank's loader state: KB in practice


def _loader_state(path: str, rank: int):
    """A rank's loader state from a local checkpoint directory, bounded and never through a link
    (trainer/storage.py `read_small_json`); anything else is a CheckpointError."""
    from trainer.storage import expand, read_small_json

    try:
        state = read_small_json(expand(os.path.join(path, loader_file(rank))), MAX_JSON_FILE_BYTES)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {loader_file(rank)}: {e}") from None
    if state is None:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {loader_file(rank)}")
    return state


def restore(path: str, *, model, optimizer, rank: int, world_size: int) -> tuple[Meta, dict]:
    """Load model and this rank's optimizer shard from a local checkpoint directory; return meta and the
    rank's loader state."""
    import torch

    meta = verify(path)
    device = next(model.parameters()).device
    state = torch.load(os.path.join(path, MODEL_FILE), map_location=device, weights_only=True)
    getattr(model, "_orig_mod", model).load_state_dict(state, strict=True)
    if meta.world_size != world_size:  # another world size: every rank reads every shard (trainer/reshard.py)
        return meta, _restore_resharded(path, meta, optimizer=optimizer, rank=rank, world_size=world_size, device=device)
    optimizer.load_state_dict(torch.load(os.path.join(path, optim_file(rank)), map_location=device,
                                         weights_only=True))
    return meta, _loader_state(path, rank)


def _restore_resharded(path: str, meta: Meta, *, optimizer, rank: int, world_size: int, device) -> dict:
    import torch

    from trainer import reshard
    from trainer.data.reshard import reshard_request

    old = [torch.load(os.path.join(path, optim_file(r)), map_location=device, weights_only=True)
           for r in range(meta.world_size)]
    try:
        optimizer.load_state_dict(reshard.reshard_optimizer(old, optimizer))
    except (ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} was written by {meta.world_size} ranks and this run has "
                              f"{world_size}; its optimizer state cannot be re-sharded: {e}") from None
    states = []
    for r in range(meta.world_size):
        states.append(_loader_state(path, r))
    return reshard_request(states, rank, world_size)


def load_model_state(url: str, *, storage_options: dict | None = None, device="cpu") -> tuple[dict, Meta]:
    """The model state dict and meta of the checkpoint at `url` (any fsspec URL), verified whole."""
    import torch

    fs, path = filesystem(url, storage_options)
    meta = verify(path, fs)
    try:
        with fs.open(posixpath.join(path, MODEL_FILE), "rb") as f:
            state = torch.load(f, map_location=device, weights_only=True)
    except Exception as e:  # a stored file that is not a weights-only state dict (pickle.UnpicklingError, ...)
        raise CheckpointError(f"checkpoint {url}: torch.load(weights_only=True) refused {MODEL_FILE} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {url}: {MODEL_FILE} holds a {type(state).__name__}, not a state dict")
    return state, meta


def latest(stage_url: str, *, storage_options: dict | None = None, step: int | None = None) -> str | None:
    """URL of the newest whole checkpoint under `<run>/<stage>` (or the one at `step`), or None."""

    fs, root = filesystem(stage_url, storage_options)
    if not fs.exists(root):
        return None
    found = []
    for entry in fs.ls(root, detail=False):
        m = _STEP_DIR.match(posixpath.basename(entry.rstrip("/")))
        if m and (step is None or int(m["step"]) == step):
            found.append((int(m["step"]), entry))
    for _, entry in sorted(found, reverse=True):
        try:
            verify(entry, fs)
        except CheckpointError:
            continue
        return fs.unstrip_protocol(entry)
    return None


def _local_fs():
    return filesystem("file:///")[0]

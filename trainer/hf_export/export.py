"""A run's model as a Hugging Face transformers directory: what `llmctl export RUN --format hf OUT` writes.

OUT (any storage URL) receives:
    model.safetensors          the stage's weights under llmctl's own names, float32
    config.json                LlmctlConfig: the shape, the recipe's constants, auto_map to the remote code
    configuration_llmctl.py    the config class   } copied from trainer/hf_export/remote/, loaded with
    modeling_llmctl.py         the model class    } trust_remote_code=True; they import torch/transformers only
    generation_config.json     bos, eos (`<|assistant_end|>` and `<|bos|>` for a chat model, `<|bos|>` for a
                               base one: the engine's stop tokens), pad; greedy by default
    tokenizer.json, tokenizer_config.json, chat_template.jinja   trainer/hf_export/tokenizer.py
Nothing is half-written: the directory is assembled in a local temporary directory first; a local OUT is then
renamed into place whole, and on object storage config.json (without which nothing loads it) is uploaded last.
An OUT that exists and is not empty is refused unless `force`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainer.hf_export import STAGES

REMOTE = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_llmctl.py", "modeling_llmctl.py")
WEIGHTS, CONFIG = "model.safetensors", "config.json"
AUTO_MAP = {"AutoConfig": "configuration_llmctl.LlmctlConfig",
            "AutoModelForCausalLM": "modeling_llmctl.LlmctlForCausalLM"}


class ExportError(ValueError):
    """An export that cannot start (bad stage, OUT in the way); nothing was written."""


@dataclass(frozen=True)
class Exported:
    out: str
    run: str
    stage: str
    step: int
    files: tuple[str, ...]


def hf_config(arch, tokenizer, *, chat: bool, source: dict | None = None):
    """LlmctlConfig for a model of shape `arch` (trainer.plan.shape.Architecture), with the recipe's constants."""
    from trainer import model as gpt
    from trainer.hf_export.remote.configuration_llmctl import LlmctlConfig
    from trainer.plan.recipe import SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS

    sp = tokenizer.special_tokens
    eos = [sp["<|assistant_end|>"], tokenizer.bos_id] if chat else tokenizer.bos_id
    config = LlmctlConfig(
        vocab_size=arch.vocab_size, padded_vocab_size=arch.padded_vocab_size, hidden_size=arch.n_embd,
        num_hidden_layers=arch.n_layer, num_attention_heads=arch.n_head, num_key_value_heads=arch.n_kv_head,
        head_dim=arch.head_dim, max_position_embeddings=gpt.ROTARY_SPAN * arch.seq_len, seq_len=arch.seq_len,
        windows=list(arch.windows), value_embed_layers=list(arch.value_embed_layers), rope_base=float(gpt.ROPE_BASE),
        qk_scale=gpt.QK_SCALE, final_logit_softcapping=gpt.SOFTCAP, ve_gate_range=gpt.VE_GATE_RANGE,
        ve_gate_channels=VE_GATE_CHANNELS, smear_gate_channels=SMEAR_GATE_CHANNELS, backout_layer=arch.n_layer // 2,
        bos_token_id=tokenizer.bos_id, eos_token_id=eos, pad_token_id=tokenizer.bos_id,
        architectures=["LlmctlForCausalLM"], auto_map=AUTO_MAP, dtype="float32", llmctl=source or {})
    return config


def write_local(model, tokenizer, directory: str, *, chat: bool, source: dict | None = None) -> list[str]:
    """Write the export into the local `directory` (created); the file names, config.json last."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from trainer.hf_export.tokenizer import to_transformers

    model = getattr(model, "_orig_mod", model)
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE / name, os.path.join(directory, name))
    config = hf_config(model.arch, tokenizer, chat=chat, source=source)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(directory)
    to_transformers(tokenizer, chat=chat, model_max_length=config.max_position_embeddings).save_pretrained(directory)
    staging = tempfile.mkdtemp(dir=directory, prefix=".config-")
    config.save_pretrained(staging)  # config.json last: its presence marks the directory whole
    os.replace(os.path.join(staging, CONFIG), os.path.join(directory, CONFIG))
    os.rmdir(staging)
    return sorted(os.listdir(directory))


def check_out(out: str, storage_options: dict | None = None, *, force: bool = False):
    """(filesystem, path) of OUT, refusing one that exists and is not an empty directory unless `force`."""
    from trainer.storage import filesystem

    fs, path = filesystem(out, storage_options)
    if fs.exists(path) and not force:
        if fs.isfile(path):
            raise ExportError(f"{out} is a file; give a directory URL")
        if fs.ls(path):
            raise ExportError(f"{out} exists and is not empty; pass --force to overwrite it")
    return fs, path


def export_model(model, tokenizer, out: str, *, chat: bool, storage_options: dict | None = None,
                 force: bool = False, source: dict | None = None) -> list[str]:
    """Export a loaded `model` (trainer.model.GPT) and its tokenizer to the storage URL `out`; the file names."""
    from trainer.storage import _is_local

    fs, path = check_out(out, storage_options, force=force)
    if _is_local(fs):  # assemble beside OUT, then one rename: OUT is absent or whole, never half-written
        parent = os.path.dirname(path.rstrip("/")) or "."
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.export-")
        try:
            files = write_local(model, tokenizer, staging, chat=chat, source=source)
            os.chmod(staging, 0o755)
            if os.path.lexists(path):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
            os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return files
    with tempfile.TemporaryDirectory(prefix="llmctl-export-") as staging:
        files = write_local(model, tokenizer, staging, chat=chat, source=source)
        if fs.exists(f"{path}/{CONFIG}"):  # overwriting (--force): unmark the old export before replacing it
            fs.rm(f"{path}/{CONFIG}")
        for name in [f for f in files if f != CONFIG] + [CONFIG]:
            fs.put(os.path.join(staging, name), f"{path}/{name}")
    return files


def export_run(run_url: str, out: str, *, stage: str = "sft", step: int | None = None,
               storage_options: dict | None = None, out_storage_options: dict | None = None,
               force: bool = False) -> Exported:
    """Load the run's `stage` (sft or base) through trainer/run_loader.py and export it to `out`.
    Raises ExportError or run_loader.RunLoadError before anything is written."""
    from trainer import run_loader

    if stage not in STAGES:
        raise ExportError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    checked = run_loader.read_checked_plan(run_url, storage_options)
    check_out(out, out_storage_options, force=force)  # before the (slow) load: refuse early
    run = run_loader.load_run(run_url, STAGES[stage], step, storage_options=storage_options, device="cpu",
                              checked=checked)
    source = {"run": checked.name, "stage": run.stage, "step": run.step}
    files = export_model(run.model, run.tokenizer, out, chat=stage == "sft", storage_options=out_storage_options,
                         force=force, source=source)
    return Exported(out=out, run=checked.name, stage=run.stage, step=run.step, files=tuple(files))

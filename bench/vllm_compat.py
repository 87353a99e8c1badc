"""Can vLLM load a Hugging Face export of an llmctl model? The checks vLLM's Transformers modeling backend makes,
run without a GPU (docs/serving.md, "Serving with vLLM").

    python bench/vllm_compat.py EXPORT_DIR        # in an environment with vLLM (the ray-llm image, or pip)

vLLM has no model class of its own for our architecture, so a `trust_remote_code` export runs through
vllm/model_executor/models/transformers/. Each check below is a step that backend takes before it serves a token:
  1. transformers (vLLM's pinned version) loads the export's config and model class;
  2. vLLM's registry resolves the architecture to its Transformers backend (`ModelRegistry.resolve_model_cls`);
  3. the backend builds the base model with `AutoModel.from_config(config, trust_remote_code=True)`, so
     config.json's auto_map needs an `AutoModel` entry;
  4. it marks the base model's forward for torch.compile, which needs `input_ids`, `inputs_embeds` and
     `position_ids` among its arguments;
  5. its weight mapper (`_create_hf_to_vllm_mapper`) must take every safetensors name to a parameter of the
     base model under `model.`, or to the head (`lm_head.weight`);
  6. it calls the base model as `model(input_ids=(1, T), position_ids=(1, T), use_cache=False,
     return_dict=False)[0]` for the hidden states: run here on CPU under vLLM's transformers with sdpa;
  7. its attention fuser finds, in each attention module's forward, one call of a local assigned from
     `ALL_ATTENTION_FUNCTIONS[...]` (transformers' pattern), else it cannot put vLLM's attention there;
  8. sliding windows reach vLLM's attention only through config.json's `layer_types` and `sliding_window`,
     which counts the query itself: our window w (the query and the w tokens before it) must read w + 1;
  9. vLLM builds the head itself with `vocab_size` rows, so the exported lm_head must have that many.
Prints one line per check and exits 1 when one fails. The smear (docs/serving.md) cannot be checked here: nothing
fails, the logits differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def base_model_checks(export: str, cfg: dict, config, model):
    """Steps 4 to 6, on the base model that step 3 showed can be built."""
    import inspect

    import torch
    from safetensors import safe_open
    from transformers import AutoModel
    from vllm.model_executor.models.transformers.base import Base

    base = AutoModel.from_pretrained(export, trust_remote_code=True)
    wanted = {"input_ids", "inputs_embeds", "position_ids"}
    missing = wanted - set(inspect.signature(type(base.get_decoder()).forward).parameters)
    yield ("vLLM's torch.compile decorator accepts the base model's forward", not missing,
           f"missing {sorted(missing)}" if missing else f"{type(base.get_decoder()).__name__}.forward")

    class Mapper:  # the backend's own name mapping, on the base model built above
        _weight_conversions, _maybe_apply_model_mapping = Base._weight_conversions, Base._maybe_apply_model_mapping

    probe = Mapper()
    probe.model, probe.config, probe.quant_config = base, config, None
    Base._create_hf_to_vllm_mapper(probe)
    with safe_open(os.path.join(export, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    targets = {f"model.{k}" for k in base.state_dict()} | {"lm_head.weight"}
    mapped = {n: probe.hf_to_vllm_mapper._map_name(n) for n in names}
    lost = sorted(n for n, m in mapped.items() if m not in targets)
    yield ("vLLM maps every weight name onto the backend's modules", not lost,
           f"unmapped: {', '.join(lost[:4])}" if lost else f"{len(names)} tensors")

    T = min(8, cfg.get("seq_len") or 8)
    ids = torch.arange(T)[None] % config.vocab_size
    with torch.no_grad():
        hidden = base(input_ids=ids, position_ids=torch.arange(T)[None], use_cache=False, return_dict=False)[0]
        logits = model(ids).logits
    ok = tuple(hidden.shape) == (1, T, config.hidden_size) and bool(torch.isfinite(logits).all())
    yield "the base model runs as vLLM calls it", ok, f"hidden states {tuple(hidden.shape)}"


def checks(export: str):
    """(name, ok, detail) for each step."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = json.load(open(os.path.join(export, "config.json")))
    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    yield "transformers loads it", True, f"transformers {transformers.__version__}: {type(model).__name__}"

    from vllm.config import ModelConfig
    from vllm.model_executor.models import ModelRegistry

    mc = ModelConfig(model=export, trust_remote_code=True, dtype="bfloat16", max_model_len=cfg.get("seq_len"))
    _, arch = ModelRegistry.resolve_model_cls(mc.architectures, mc)
    yield "vLLM resolves the architecture", arch.startswith("Transformers"), f"{mc.architectures} -> {arch}"

    try:
        AutoModel.from_config(config, trust_remote_code=True)
        yield "AutoModel.from_config (the backend's base model)", True, "built"
    except ValueError as e:
        yield "AutoModel.from_config (the backend's base model)", False, str(e).splitlines()[0][:160]
    else:
        yield from base_model_checks(export, cfg, config, model)

    from vllm.model_executor.models.transformers.fusers.attention import interface_call

    attention = {type(m) for m in model.modules() if "attention" in type(m).__name__.lower()}
    missing = sorted(c.__name__ for c in attention if interface_call(c.forward) is None)
    yield ("vLLM's attention fuser finds the attention call", bool(attention) and not missing,
           f"not found in {', '.join(missing)}" if missing else f"{len(attention)} attention class(es)")

    windows, seq = cfg.get("windows") or [], cfg.get("seq_len")
    short = sorted({w for w in windows if seq and w < seq})
    types = cfg.get("layer_types")
    want = ["sliding_attention" if seq and w < seq else "full_attention" for w in windows]
    if not short:
        yield "sliding windows reach vLLM", types in (None, want), "no short windows"
    else:
        ok = types == want and len(short) == 1 and cfg.get("sliding_window") == short[0] + 1
        yield ("sliding windows reach vLLM", ok,
               f"windows {short} of {seq}: {want.count('sliding_attention')} sliding_attention layer(s) "
               f"under sliding_window {cfg.get('sliding_window')}" if ok else
               f"windows {short} need layer_types {want} and sliding_window {short[0] + 1} in config.json, "
               f"not {types} and {cfg.get('sliding_window')}")

    rows = model.get_output_embeddings().weight.shape[0]
    yield "lm_head rows = vocab_size", rows == config.vocab_size, f"{rows} rows, vocab_size {config.vocab_size}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="a local directory written by `llmctl export --format hf`")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    failed = 0
    for name, ok, detail in checks(args.export):
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

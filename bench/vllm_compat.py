"""Can vLLM load a Hugging Face export of an llmctl model? The checks vLLM's Transformers modeling backend makes,
run without a GPU (docs/serving.md, "Serving with vLLM").

    python bench/vllm_compat.py EXPORT_DIR        # in an environment with vLLM (the ray-llm image, or pip)

vLLM has no model class of its own for our architecture, so a `trust_remote_code` export runs through
vllm/model_executor/models/transformers/. Each check below is a step that backend takes before it serves a token:
  1. transformers (vLLM's pinned version) loads the export's config and model class;
  2. vLLM's registry resolves the architecture to its Transformers backend (`ModelRegistry.resolve_model_cls`);
  3. the backend builds the base model with `AutoModel.from_config(config, trust_remote_code=True)`, so
     config.json's auto_map needs an `AutoModel` entry;
  4. its attention fuser finds, in each attention module's forward, one call of a local assigned from
     `ALL_ATTENTION_FUNCTIONS[...]` (transformers' pattern), else it cannot put vLLM's attention there;
  5. sliding windows reach vLLM's attention only through config.json's `layer_types` and `sliding_window`;
  6. vLLM builds the head itself with `vocab_size` rows, so the exported lm_head must have that many.
Prints one line per check and exits 1 when one fails. The smear (docs/serving.md) cannot be checked here: nothing
fails, the logits differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


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

    from vllm.model_executor.models.transformers.fusers.attention import interface_call

    attention = {type(m) for m in model.modules() if "attention" in type(m).__name__.lower()}
    missing = sorted(c.__name__ for c in attention if interface_call(c.forward) is None)
    yield ("vLLM's attention fuser finds the attention call", bool(attention) and not missing,
           f"not found in {', '.join(missing)}" if missing else f"{len(attention)} attention class(es)")

    windows, seq = cfg.get("windows") or [], cfg.get("seq_len")
    short = sorted({w for w in windows if seq and w < seq})
    has_types = "layer_types" in cfg and "sliding_window" in cfg
    yield ("sliding windows reach vLLM", not short or has_types,
           "no short windows" if not short else f"windows {short} need layer_types + sliding_window in config.json")

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

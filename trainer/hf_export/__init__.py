"""The way out of llmctl: a run's model as a Hugging Face transformers directory, and lm-eval-harness on it.

- `tokenizer`: our tiktoken-style BPE as a `tokenizers` tokenizer.json, with the chat template (Jinja) that
  renders conversations exactly as `Tokenizer.render_conversation` does;
- `export`: `export_run` (what `llmctl export RUN --format hf OUT` runs) and `export_model` (a loaded model);
- `remote/`: configuration_llmctl.py and modeling_llmctl.py, copied verbatim into every export and loaded
  with `trust_remote_code=True` (transformers' own NanoChat model cannot express the architecture; docs/export.md);
- `harness`: lm-eval-harness on an export (what `llmctl eval RUN --tasks ...` runs).
"""

STAGES = {"sft": "sft", "base": "pretrain"}  # --stage word of export and eval -> the run's stage exported

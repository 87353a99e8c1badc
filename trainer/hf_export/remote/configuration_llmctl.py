"""Configuration of an llmctl GPT exported for Hugging Face transformers (the nanochat architecture).

Shipped verbatim in every `llmctl export --format hf` directory and loaded with `trust_remote_code=True`;
it imports only transformers. Field meanings match llmctl's `Architecture` (trainer/plan/shape.py).
"""

from transformers import PreTrainedConfig


class LlmctlConfig(PreTrainedConfig):
    model_type = "llmctl"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32768  # real vocabulary: logits are cropped to it
    padded_vocab_size: int = 32768  # rows of wte, lm_head and the value embeddings (a multiple of 64)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_key_value_heads: int = 6
    head_dim: int = 128
    max_position_embeddings: int = 20480  # rotary table of the trained model: 10 x its context
    seq_len: int = 2048  # trained context
    windows: list | None = None  # per layer: a query sees itself and the w tokens before it
    value_embed_layers: list | None = None  # layers with a value embedding (ResFormer), by index
    rope_base: float = 100000.0
    qk_scale: float = 1.2  # q and k times 1.2 after their RMSNorm
    final_logit_softcapping: float = 15.0  # logits = 15 tanh(logits / 15)
    ve_gate_range: float = 3.0  # value-embedding gate = 3 sigmoid(ve_gate(x[..., :12]))
    ve_gate_channels: int = 12
    smear_gate_channels: int = 24  # smear gate = smear_lambda sigmoid(smear_gate(x[..., :24]))
    backout_layer: int | None = None  # output of this layer is subtracted (times backout_lambda) before the norm
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.windows is None:
            self.windows = [self.seq_len] * self.num_hidden_layers
        if self.value_embed_layers is None:
            self.value_embed_layers = []
        if self.backout_layer is None:
            self.backout_layer = self.num_hidden_layers // 2
        super().__post_init__(**kwargs)


__all__ = ["LlmctlConfig"]

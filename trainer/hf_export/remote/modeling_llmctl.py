"""An llmctl GPT (the nanochat architecture) as a Hugging Face transformers causal LM.

Shipped verbatim in every `llmctl export --format hf` directory and loaded with `trust_remote_code=True`;
it imports only torch and transformers. Parameter names are llmctl's own (transformer.wte,
transformer.h.N.attn.c_q, ...), so the exported safetensors are the trained state dict unchanged.

The forward pass is llmctl's `GPT.forward` (trainer/model.py) written against transformers' interfaces:
- token embedding -> parameter-free RMSNorm -> smear: each token adds its predecessor's normed embedding,
  gated by smear_lambda * sigmoid(smear_gate(x[..., :24])); a first token (position 0, or after left
  padding) has no predecessor. While decoding with a cache the predecessor is the last token already in
  the cache: `prepare_inputs_for_generation` passes its id (`prev_input_ids`), so beams and padding stay
  right; a caller that steps by hand without it gets the embedding kept on the cache object.
- per layer: x = resid_lambdas[i] x + x0_lambdas[i] x0; x += attn(norm(x), ve); x += mlp(norm(x)).
- attention: c_q/c_k/c_v, value embedding mixed into v through 3 sigmoid(ve_gate(x[..., :12])) per KV
  head, rotary (base 100,000, channel j paired with j + D/2), QK RMSNorm times 1.2, then the attention
  function transformers is set to (eager or sdpa), under a causal mask cut to the layer's window:
  a query sees itself and the w tokens before it (transformers' sliding_window = w + 1).
- MLP relu(x)^2; backout x -= backout_lambda * (output of layer n_layer // 2); final RMSNorm; lm_head
  over the padded vocabulary, cropped to the real one, fp32, softcap 15 tanh(x / 15).
The key/value cache is transformers' DynamicCache (every layer keeps all its keys; the masks do the windowing).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, sliding_window_overlay
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_llmctl import LlmctlConfig


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without parameters over the last dimension (torch's default epsilon for the dtype)."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free; the weight is cast to the activation dtype."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(dtype=x.dtype))


def rotary(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin (B, T, 1, head_dim / 2) of angle position * base^(-2j / head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    return angles.cos().to(dtype)[:, :, None, :], angles.sin().to(dtype)[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D); channel j pairs with j + D/2."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention over (B, H, T, D) with an additive float mask; returns (B, T, H, D) and the weights."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class LlmctlAttention(nn.Module):
    def __init__(self, config: LlmctlConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.num_key_value_groups = self.n_head // self.n_kv_head
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.sliding_window = config.windows[layer_idx] + 1  # transformers counts the query itself
        n = config.hidden_size
        self.c_q = Linear(n, self.n_head * self.head_dim)
        self.c_k = Linear(n, self.n_kv_head * self.head_dim)
        self.c_v = Linear(n, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, n)
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = Linear(config.ve_gate_channels, self.n_kv_head) if has_ve else None

    def forward(self, x, ve, cos_sin, attention_mask, cache=None, **kwargs):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.config.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., :self.config.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * self.config.qk_scale, norm(k) * self.config.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        impl = self.config._attn_implementation
        attend = eager_attention_forward if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]
        y, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                      sliding_window=self.sliding_window, **kwargs)
        return self.c_proj(y.reshape(B, T, -1))


class LlmctlMLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd)
        self.c_proj = Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class LlmctlBlock(nn.Module):
    def __init__(self, config: LlmctlConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = LlmctlAttention(config, layer_idx)
        self.mlp = LlmctlMLP(config.hidden_size)

    def forward(self, x, ve, cos_sin, attention_mask, cache=None, **kwargs):
        x = x + self.attn(norm(x), ve, cos_sin, attention_mask, cache, **kwargs)
        return x + self.mlp(norm(x))


class LlmctlPreTrainedModel(PreTrainedModel):
    config_class = LlmctlConfig
    base_model_prefix = "llmctl"
    _no_split_modules = ["LlmctlBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):  # an export carries every weight; nothing is initialised here
        pass


class LlmctlForCausalLM(LlmctlPreTrainedModel, GenerationMixin):
    def __init__(self, config: LlmctlConfig) -> None:
        super().__init__(config)
        V, n = config.padded_vocab_size, config.hidden_size
        kv_dim = config.num_key_value_heads * config.head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, n),
            "h": nn.ModuleList([LlmctlBlock(config, i) for i in range(config.num_hidden_layers)]),
        })
        self.lm_head = Linear(n, V)
        self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        self.smear_gate = Linear(config.smear_gate_channels, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' own, plus the id of the token before the new ones (the smear reads its embedding)."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if new is not None and 0 < new.shape[1] < input_ids.shape[1]:
            k = input_ids.shape[1] - new.shape[1]
            inputs["prev_input_ids"] = input_ids[:, k - 1:k]
        return inputs

    def _smear(self, x, prev, prev_valid):
        """x + gate * (the previous position's normed embedding), where one exists (prev_valid (B, T, 1))."""
        c = self.config.smear_gate_channels
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :c]))
        before = torch.cat([prev, x[:, :-1]], dim=1)
        return x + gate * before * prev_valid

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, prev_input_ids=None, past_key_values=None,
                **kwargs):
        if input_ids is None:
            raise ValueError("llmctl models take input_ids (value embeddings are looked up by token id)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        wte = self.transformer.wte
        dtype = wte.weight.dtype
        x = norm(wte(input_ids).to(dtype))

        # The smear's predecessor of the first new position: an earlier token's embedding or none.
        if past > 0 and prev_input_ids is not None:
            prev = norm(wte(prev_input_ids).to(dtype))
        elif past > 0 and getattr(cache, "llmctl_prev_embedding", None) is not None:
            prev = cache.llmctl_prev_embedding
        else:
            prev = torch.zeros_like(x[:, :1])
        columns = torch.arange(past, past + T, device=x.device)  # column of each new token in attention_mask
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.to(torch.bool)
            prev_ok = torch.where(columns > 0, valid[:, (columns - 1).clamp(min=0)], False)
        else:
            prev_ok = (columns > 0)[None].expand(B, T)
        if cache is not None:
            cache.llmctl_prev_embedding = x[:, -1:]
        x = self._smear(x, prev, prev_ok[..., None].to(dtype))

        masks = {}
        for w in sorted(set(self.config.windows)):
            masks[w] = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                          cache=cache, position_ids=position_ids,
                                          and_mask_function=sliding_window_overlay(w + 1))
        cos_sin = rotary(position_ids, self.config.head_dim, self.config.rope_base, dtype)

        x0 = x_backout = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, masks[self.config.windows[i]], cache, **kwargs)
            if i == self.config.backout_layer:
                x_backout = x
        x = norm(x - self.backout_lambda.to(dtype) * x_backout)

        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        cap = self.config.final_logit_softcapping
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


__all__ = ["LlmctlPreTrainedModel", "LlmctlForCausalLM"]

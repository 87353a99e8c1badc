"""The GPT: nanochat's architecture, built from a RunPlan's `Architecture`.

Every choice reproduces karpathy/nanochat `nanochat/gpt.py` (commit 92d63d4; docs/recipe.md, model shape),
so its published results carry over to our runs:

- token embedding `wte` -> parameter-free RMSNorm -> smear (the previous token's normed embedding,
  gated by its first 24 channels) -> x0 = x
- per layer: x = resid_lambda[i] * x + x0_lambda[i] * x0, then a pre-norm block
  x += attn(norm(x), ve); x += mlp(norm(x)); the output of layer n_layer // 2 is kept for backout
- attention: separate c_q/c_k/c_v/c_proj without biases, rotary embeddings (base 100,000, half-split
  pairs), then parameter-free QK RMSNorm, then q and k times 1.2; value embeddings (ResFormer) on
  alternating layers, the last included, mixed in through a gate 3 * sigmoid(ve_gate(x[..., :12]))
  per KV head; sliding windows per layer (SSSL tiled, last layer full)
- MLP: c_fc n -> 4n, relu(x)^2, c_proj 4n -> n
- backout x -= 0.2-initialised lambda * x_backout, final RMSNorm, untied lm_head over the padded
  vocabulary, crop to the real vocabulary, fp32 logits, softcap 15 * tanh(logits / 15), cross-entropy
  with targets == -1 ignored.

Precision (nanochat since Mar 4 2026): master weights are fp32 and every `Linear` casts its weight to
the activation dtype inside forward (no autocast). Activations run in `compute_dtype(device)`: bf16 on
CUDA SM >= 80, float32 elsewhere; `wte` and the value embeddings are stored in that dtype.

Construction is on the meta device (`build_model`): `GPT.__init__` only declares shapes, and
`init_weights()` is the one place where real values are written.

Attention kernels: PyTorch SDPA with `is_causal` for layers that see their whole context; for sliding
windows, FlexAttention (compiled) on CUDA and SDPA with an explicit boolean mask on CPU (the
reference's fallback; fine for the small CPU models). A window of w means a query sees itself and the
w tokens before it (FA3's `window_size=(w, 0)`, the reference's semantics).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import fp8

from trainer.plan.recipe import SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS
from trainer.plan.shape import Architecture

ROPE_BASE = 100_000  # rotary base theta (gpt.py, raised from 10K on Mar 9 2026)
ROTARY_SPAN = 10  # cos/sin precomputed for 10 x seq_len positions (gpt.py rotary_seq_len)
QK_SCALE = 1.2  # q and k multiplied by 1.2 after QK norm: logits x1.44 over SDPA's 1/sqrt(d)
SOFTCAP = 15.0  # logit softcap 15 * tanh(x / 15) (gpt.py; 20 tried Mar 2, back to 15 Mar 9)
VE_GATE_RANGE = 3.0  # value-embedding gate is 3 * sigmoid(.), range (0, 3)
BACKOUT_INIT = 0.2  # backout_lambda init (gpt.py, Mar 14 2026)
WTE_STD = 0.8  # wte ~ Normal(0, 0.8) (code value; its docstring says 1.0)
LM_HEAD_STD = 0.001  # lm_head ~ Normal(0, 0.001)
FC_INIT_SCALE = 0.4  # c_fc ~ Uniform(+-0.4 s), s = sqrt(3 / n_embd)
GATE_INIT_MAX = 0.02  # smear_gate and ve_gate ~ Uniform(0, 0.02)
RESID_INIT = (1.15, 0.10)  # resid_lambdas[i] = 1.15 - 0.10 * i / (L - 1)
X0_INIT = (0.20, 0.15)  # x0_lambdas[i] = 0.20 - 0.15 * i / (L - 1)

PARAM_GROUPS = ("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars")  # = ParamCounts


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA with SM >= 80 (Ampere and later), float32 on older CUDA, CPU and everything else."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without learnable parameters, over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free Linear whose fp32 master weight is cast to the activation dtype in forward."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(dtype=x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by the position angles; channel j pairs with j + D/2 (not interleaved)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rotary_tables(n_pos: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (1, n_pos, 1, head_dim / 2): angle t * ROPE_BASE^(-2j / head_dim)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32, device=device), inv_freq)
    return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


# ---------------------------------------------------------------------------------------------
# Attention kernels


def sliding_window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where query i may attend key j: j <= i and i - j <= window."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j <= window)


_flex_attention = None


def flex_available() -> bool:
    """FlexAttention ships with torch >= 2.5; without it CUDA falls back to SDPA with a dense mask."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex():
    """FlexAttention compiled once (uncompiled it falls back to a slow dense path)."""
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex_attention = torch.compile(flex_attention, dynamic=False)
    return _flex_attention


def _flex_block_mask(T: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    return create_block_mask(causal_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Causal attention over (B, H, T, D); `mask` None = whole context, else a bool mask or BlockMask."""
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return _flex()(q, k, v, block_mask=mask, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------
# Modules


class CausalSelfAttention(nn.Module):
    def __init__(self, arch: Architecture, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = arch.n_head, arch.n_kv_head, arch.head_dim
        n = arch.n_embd
        self.c_q = Linear(n, self.n_head * self.head_dim)
        self.c_k = Linear(n, self.n_kv_head * self.head_dim)
        self.c_v = Linear(n, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, n)
        has_ve = layer_idx in arch.value_embed_layers
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_ve else None

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                mask, kv_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # ResFormer value residual, gated per KV head
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is None:
            y = attention(q, k, v, mask)
        else:  # decoding: store these positions' k/v, attend over the cached ones (trainer/serve/engine.py KVCache)
            y = kv_cache.attend(self.layer_idx, q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd)
        self.c_proj = Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, arch: Architecture, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(arch, layer_idx)
        self.mlp = MLP(arch.n_embd)

    def forward(self, x, ve, cos_sin, mask, kv_cache=None):
        x = x + self.attn(norm(x), ve, cos_sin, mask, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """nanochat's GPT. Parameter names follow the reference (transformer.wte, transformer.h.N.attn.c_q, ...).

    Constructed on the current default device; under `torch.device("meta")` nothing is allocated and
    the values are garbage until `to_empty()` + `init_weights()` (see `build_model`).
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        if arch.n_head * arch.head_dim != arch.n_embd or arch.n_head % arch.n_kv_head:
            raise ValueError(f"arch: n_head {arch.n_head} x head_dim {arch.head_dim} must equal n_embd "
                             f"{arch.n_embd} and n_kv_head {arch.n_kv_head} must divide n_head")
        if len(arch.windows) != arch.n_layer:
            raise ValueError(f"arch: {len(arch.windows)} windows for {arch.n_layer} layers")
        self.arch = arch
        V, n, kv_dim = arch.padded_vocab_size, arch.n_embd, arch.n_kv_head * arch.head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, n),
            "h": nn.ModuleList([Block(arch, i) for i in range(arch.n_layer)]),
        })
        self.lm_head = Linear(n, V)
        self.resid_lambdas = nn.Parameter(torch.ones(arch.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(arch.n_layer))
        self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in arch.value_embed_layers})
        cos, sin = rotary_tables(ROTARY_SPAN * arch.seq_len, arch.head_dim, torch.float32)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._masks: dict[tuple, tuple] = {}

    # -- initialisation --------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Write the reference's initial values (`gpt.py init_weights`; docs/recipe.md), then cast embeddings.

        | tensor                              | init                                   |
        | wte                                 | Normal(0, 0.8)                         |
        | lm_head                             | Normal(0, 0.001)                       |
        | c_q, c_k, c_v, every value_embeds   | Uniform(+-s), s = sqrt(3 / n_embd)     |
        | mlp.c_fc                            | Uniform(+-0.4 s)                       |
        | attn.c_proj, mlp.c_proj             | zeros                                  |
        | resid_lambdas[i] / x0_lambdas[i]    | 1.15 -> 1.05 / 0.20 -> 0.05, linear    |
        | smear_lambda / backout_lambda       | 0 / 0.2                                |
        | smear_gate, every ve_gate           | Uniform(0, 0.02)                       |
        """
        a = self.arch
        s = math.sqrt(3.0 / a.n_embd)  # uniform bound with std 1/sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=WTE_STD)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=LM_HEAD_STD)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -FC_INIT_SCALE * s, FC_INIT_SCALE * s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, GATE_INIT_MAX)
        frac = torch.arange(a.n_layer, dtype=torch.float32) / max(a.n_layer - 1, 1)
        self.resid_lambdas.copy_(RESID_INIT[0] - RESID_INIT[1] * frac)
        self.x0_lambdas.copy_(X0_INIT[0] - X0_INIT[1] * frac)
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, BACKOUT_INIT)
        nn.init.uniform_(self.smear_gate.weight, 0.0, GATE_INIT_MAX)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        device = self.transformer.wte.weight.device
        dtype = compute_dtype(device)
        self.cos, self.sin = rotary_tables(ROTARY_SPAN * a.seq_len, a.head_dim, dtype, device)
        # Embeddings are stored in the compute dtype (memory; the optimizer tolerates it).
        self.transformer.wte.to(dtype=dtype)
        for ve in self.value_embeds.values():
            ve.to(dtype=dtype)
        self._masks.clear()

    # -- accounting: one source of truth with trainer/plan/runplan.py, counted from real shapes -----------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by ParamCounts group; every parameter appears in exactly one group."""
        groups = {
            "wte": [self.transformer.wte.weight],
            "value_embeds": [self.value_embeds[str(i)].weight for i in self.arch.value_embed_layers],
            "lm_head": [self.lm_head.weight],
            "transformer_matrices": list(self.transformer.h.parameters()),
            "scalars": [self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda,
                        self.backout_lambda],
        }
        grouped = {id(p) for ps in groups.values() for p in ps}
        assert grouped == {id(p) for p in self.parameters()}, "param_groups must cover every parameter once"
        return groups

    def count_params(self) -> dict[str, int]:
        """ParamCounts fields: the five groups, total, scaling (matrices + lm_head), matmul (every Linear)."""
        counts = {k: sum(p.numel() for p in ps) for k, ps in self.param_groups().items()}
        counts["total"] = sum(counts[k] for k in PARAM_GROUPS)
        counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
        counts["matmul"] = sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))
        return counts

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 x matmul weights + 12 x (q width) x (keys seen) per layer."""
        attn = sum(12 * block.attn.c_q.weight.shape[0] * min(w, self.arch.seq_len)
                   for block, w in zip(self.transformer.h, self.arch.windows))
        return 6 * self.count_params()["matmul"] + attn

    # -- forward -----------------------------------------------------------------------------------

    @torch.compiler.disable
    def _attention_masks(self, T: int, device: torch.device) -> tuple:
        """Per layer: None (whole causal context) or the sliding-window mask for this T, cached."""
        key = (T, device)
        if key not in self._masks:
            flex = device.type == "cuda" and flex_available()
            masks = []
            for w in self.arch.windows:
                if w >= T - 1:
                    masks.append(None)
                elif flex:
                    masks.append(_flex_block_mask(T, w, device))
                else:
                    masks.append(sliding_window_mask(T, w, device))
            self._masks[key] = tuple(masks)
        return self._masks[key]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, kv_cache=None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) int -> loss (scalar for 'mean'/'sum', (B, T) for 'none') or fp32 logits (B, T, vocab).

        With `kv_cache` (trainer/serve/engine.py KVCache), idx holds the next T positions after the cache's: rotary
        angles continue from the cache position, the smear reaches back to the cached previous embedding, and
        each layer attends over its cached keys (its window only).
        """
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction: must be mean, sum or none, got {loss_reduction!r}")
        B, T = idx.shape
        pos = 0 if kv_cache is None else kv_cache.pos
        if pos + T > self.cos.size(1):
            raise ValueError(f"idx: {pos + T} positions exceed the rotary table of {self.cos.size(1)}")
        cos_sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        masks = self._attention_masks(T, idx.device) if kv_cache is None else (None,) * self.arch.n_layer
        dtype = self.cos.dtype  # the compute dtype, fixed by init_weights

        x = norm(self.transformer.wte(idx).to(dtype))
        prev = None if kv_cache is None else kv_cache.prev_embedding
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]  # before smearing: the smear mixes in plain normed embeddings
        if prev is not None:  # smear across the cache boundary: position pos looks back at pos - 1
            gate = self.smear_lambda.to(dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
            x = x + gate * torch.cat([prev, x[:, :-1]], dim=1)
        elif T > 1:  # smear: add the gated previous token's normed embedding
            gate = self.smear_lambda.to(dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_GATE_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0 = x
        backout_layer = self.arch.n_layer // 2
        x_backout = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, masks[i], kv_cache)
            if i == backout_layer:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x - self.backout_lambda.to(dtype) * x_backout)

        logits = self.lm_head(x)[..., : self.arch.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss


class Float8Linear(Linear):
    """Linear with trainer.fp8 matmuls in training mode; same parameter, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8.fp8_matmul(x, self.weight) if self.training else None
        return super().forward(x) if out is None else out


def convertible(m: nn.Module) -> bool:
    """True for the Linear layers the reference runs in fp8 (both sides multiples of 16, the smaller >= 128)."""
    if not isinstance(m, Linear):
        return False
    k, n = m.in_features, m.out_features
    return k % FP8_ALIGN == 0 and n % FP8_ALIGN == 0 and min(k, n) >= FP8_MIN_DIM


def convertible(m: nn.Module) -> bool:
    """True for the Linear layers the reference runs in fp8 (both sides multiples of 16, the smaller >= 128)."""
    if not isinstance(m, Linear):
        return False
    k, n = m.in_features, m.out_features
    return k % fp8.FP8_ALIGN == 0 and n % fp8.FP8_ALIGN == 0 and min(k, n) >= fp8.FP8_MIN_DIM


def convert_to_fp8(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Switch the reference's Linear layers to Float8Linear in place; returns how many were converted.

    Call before compiling. Parameters are kept (only the class changes), so an optimizer built before
    or after sees the same tensors. On a device without fp8 matmuls nothing changes and one line on
    stderr says the run continues in bf16.
    """
    if device is None:
        device = next(model.parameters()).device
    ok, why = fp8.fp8_supported(device)
    if not ok:
        print(f"fp8: {why}; training continues in bf16", file=sys.stderr)
        return 0
    n = 0
    for m in model.modules():
        if convertible(m) and type(m) is Linear:
            m.__class__ = Float8Linear
            n += 1
    return n


def convert_to_bf16(model: nn.Module) -> int:
    """Undo convert_to_fp8 (same parameters); returns how many layers were switched back."""
    n = 0
    for m in model.modules():
        if type(m) is Float8Linear:
            m.__class__ = Linear
            n += 1
    return n


def build_model(arch: Architecture, device: torch.device | str, *, compile: bool | None = None,
                fp8: bool = False) -> GPT:
    """Meta construction -> to_empty(device) -> init_weights() -> (fp8) -> compiled in place on CUDA by default.

    `compile` None = compile on CUDA, eager elsewhere. Compiling in place (`Module.compile`) keeps the
    class and the state_dict keys unchanged. `fp8` switches the large Linear layers to trainer.fp8's
    Float8Linear (same parameters; bf16 with one message where the GPU has no fp8). Seed torch before
    calling for reproducible weights.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = GPT(arch)
    model.to_empty(device=device)
    model.init_weights()
    if fp8:
        convert_to_fp8(model, device)
    if compile if compile is not None else device.type == "cuda":
        model.compile(dynamic=False)
    return model

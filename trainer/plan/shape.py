"""The model a depth makes: widths, heads, windows, value-embedding layers, parameter counts, FLOPs per token.

Pure functions of the depth and the shape knobs (vocab, context, head size, window pattern), as nanochat's
`build_model_meta` and `GPT.estimate_flops` compute them (nanochat/gpt.py; docs/recipe.md, "the model").
Cross-checks (tests/plan/test_shape.py): d24 has 729,810,624 scaling params and 4.775e9 FLOPs per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.plan.recipe import (ASPECT_RATIO, HEAD_DIM, SEQ_LEN, SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS, VOCAB_PAD,
                                 VOCAB_SIZE, WINDOW_PATTERN)


@dataclass(frozen=True)
class Architecture:
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    seq_len: int
    window_pattern: str
    windows: tuple[int, ...]  # per layer: w, a query sees itself and the w tokens before it (FA3 window_size=(w, 0))
    value_embed_layers: tuple[int, ...]


@dataclass(frozen=True)
class ParamCounts:
    wte: int
    value_embeds: int
    lm_head: int
    transformer_matrices: int  # q,k,v,o,fc,proj and the ve gates of every block
    scalars: int  # resid/x0 lambdas, smear gate (24), smear and backout lambdas
    total: int
    scaling: int  # transformer_matrices + lm_head (Kaplan-style; nanochat num_scaling_params)
    matmul: int  # every Linear weight: scaling + smear gate; the 6N of FLOPs/token


def model_dim(depth: int, head_dim: int = HEAD_DIM) -> int:
    """depth x 64, rounded up to a multiple of head_dim (base_train.build_model_meta)."""
    return -(-depth * ASPECT_RATIO // head_dim) * head_dim


def short_window(seq_len: int) -> int:
    """S windows are a quarter of the context rounded up to 128: 512 at T=2048 (gpt.py, since Mar 14 2026)."""
    return min(seq_len, -(-seq_len // 4 // 128) * 128)


def architecture(depth: int, *, vocab_size: int = VOCAB_SIZE, seq_len: int = SEQ_LEN,
                 head_dim: int = HEAD_DIM, window_pattern: str = WINDOW_PATTERN) -> Architecture:
    n_embd = model_dim(depth, head_dim)
    n_head = n_embd // head_dim
    pattern = (window_pattern * depth)[:depth]
    pattern = pattern[:-1] + "L"  # the last layer always sees the full context
    windows = tuple(seq_len if c == "L" else short_window(seq_len) for c in pattern)
    # Value embeddings on alternating layers, the last one included: i % 2 == (L - 1) % 2.
    ve_layers = tuple(i for i in range(depth) if i % 2 == (depth - 1) % 2)
    return Architecture(
        n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, head_dim=head_dim,
        vocab_size=vocab_size, padded_vocab_size=-(-vocab_size // VOCAB_PAD) * VOCAB_PAD,
        seq_len=seq_len, window_pattern=window_pattern, windows=windows, value_embed_layers=ve_layers,
    )


def param_counts(a: Architecture) -> ParamCounts:
    n, V, L = a.n_embd, a.padded_vocab_size, a.n_layer
    kv_dim = a.n_kv_head * a.head_dim
    block = 4 * n * n + 8 * n * n  # q, k, v, o (n x n) + fc (4n x n) + proj (n x 4n)
    ve_gate = VE_GATE_CHANNELS * a.n_kv_head
    matrices = L * block + len(a.value_embed_layers) * ve_gate
    wte, lm_head = V * n, V * n
    value_embeds = len(a.value_embed_layers) * V * kv_dim
    scalars = 2 * L + SMEAR_GATE_CHANNELS + 2
    return ParamCounts(
        wte=wte, value_embeds=value_embeds, lm_head=lm_head, transformer_matrices=matrices,
        scalars=scalars, total=wte + value_embeds + lm_head + matrices + scalars,
        scaling=matrices + lm_head, matmul=matrices + lm_head + SMEAR_GATE_CHANNELS,
    )


def flops_per_token(a: Architecture, p: ParamCounts) -> int:
    """Training FLOPs per token, forward + backward (gpt.py estimate_flops; PaLM's attention term).

    6 x every matmul weight, plus 12 x heads x head_dim x the tokens each layer attends to (its window).
    Embedding lookups and scalars are free; no causal halving of the attention term.
    """
    attention = sum(12 * a.n_head * a.head_dim * min(w, a.seq_len) for w in a.windows)
    return 6 * p.matmul + attention

"""Tests for trainer/model.py: the GPT against the planner's numbers, its forward/backward, attention masks,
rotary embeddings and the reference initialisation. CPU, float32, tiny shapes (seconds).

Run: .venv/bin/pytest tests/test_model.py
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from trainer.model import (
    GPT, SOFTCAP, _flex_block_mask, apply_rotary, attention, build_model, compute_dtype, rotary_tables,
    sliding_window_mask,
)
from trainer.plan import RunSpec, plan

TINY = dict(vocab_size=512, seq_len=64, head_dim=32)


def tiny(depth: int = 2, **kw):
    return plan(RunSpec(depth=depth, **{**TINY, **kw})).arch


def meta_model(spec: RunSpec) -> tuple[GPT, object]:
    p = plan(spec)
    with torch.device("meta"):
        return GPT(p.arch), p


# ---------------------------------------------------------------------------------------------
# One source of truth with the planner


@pytest.mark.parametrize("depth", range(2, 27))
def test_counts_and_flops_equal_the_plan_at_every_depth(depth):
    model, p = meta_model(RunSpec(depth=depth))
    assert model.count_params() == dataclasses.asdict(p.params)
    assert model.flops_per_token() == p.flops_per_token


@pytest.mark.parametrize("kw", [
    dict(head_dim=64, seq_len=512), dict(window_pattern="L"), dict(vocab_size=500, seq_len=4096),
    dict(window_pattern="SL", seq_len=1024, head_dim=64),
])
def test_counts_and_flops_equal_the_plan_for_other_shapes(kw):
    model, p = meta_model(RunSpec(depth=6, **kw))
    assert model.count_params() == dataclasses.asdict(p.params)
    assert model.flops_per_token() == p.flops_per_token


def test_d24_matches_the_published_reference_counts():
    model, _ = meta_model(RunSpec(depth=24))
    c = model.count_params()
    assert (c["scaling"], c["total"]) == (729_810_624, 1_384_122_122)  # d24 by gpt.py's counting (docs/recipe.md)
    assert round(model.flops_per_token() / 1e9, 3) == 4.775


def test_param_groups_cover_every_parameter_once():
    model, _ = meta_model(RunSpec(depth=4, **TINY))
    groups = model.param_groups()
    assert list(groups) == ["wte", "value_embeds", "lm_head", "transformer_matrices", "scalars"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# Forward and backward


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_forward_backward_gives_finite_loss_and_gradients_for_every_parameter(depth):
    torch.manual_seed(depth)
    arch = tiny(depth)
    model = build_model(arch, "cpu")
    idx = torch.randint(0, arch.vocab_size, (2, arch.seq_len + 1))
    loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(arch.vocab_size)) < 0.1  # lm_head std 0.001: near-uniform start
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_every_parameter_is_wired_into_the_loss():
    """Away from the zero/identity init (zero c_proj, smear 0), every parameter gets a non-zero gradient."""
    torch.manual_seed(0)
    arch = tiny(3)
    model = build_model(arch, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, arch.vocab_size, (2, arch.seq_len + 1))
    model(idx[:, :-1], idx[:, 1:]).backward()
    dead = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert dead == []


def test_loss_reduction_none_gives_per_token_losses_and_ignores_minus_one():
    torch.manual_seed(1)
    arch = tiny(2)
    model = build_model(arch, "cpu")
    idx = torch.randint(0, arch.vocab_size, (3, 33))
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[0, :5] = -1
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == y.shape
    assert (per_token[0, :5] == 0).all()
    assert torch.allclose(per_token[y != -1].mean(), model(x, y), atol=1e-6)
    assert torch.allclose(per_token.sum(), model(x, y, loss_reduction="sum"), atol=1e-4)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(x, y, loss_reduction="avg")


def test_logits_are_fp32_softcapped_and_cropped_to_the_real_vocabulary():
    torch.manual_seed(2)
    arch = tiny(2, vocab_size=500)
    assert arch.padded_vocab_size == 512
    model = build_model(arch, "cpu")
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 5.0)  # big logits, to see the cap
        logits = model(torch.randint(0, 500, (2, 16)))
    assert logits.shape == (2, 16, 500) and logits.dtype == torch.float32
    assert logits.abs().max() <= SOFTCAP and logits.abs().max() > 0.9 * SOFTCAP


def test_a_later_token_never_changes_earlier_logits():
    torch.manual_seed(3)
    arch = tiny(3, seq_len=512)  # S layers see 128 tokens here: the sliding-window path runs
    assert min(arch.windows) == 128 < arch.seq_len
    model = build_model(arch, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        idx = torch.randint(0, arch.vocab_size, (1, 200))
        changed = idx.clone()
        changed[0, 150:] = (changed[0, 150:] + 1) % arch.vocab_size
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :150], b[:, :150])
    assert not torch.allclose(a[:, 150:], b[:, 150:])


def test_kv_cache_path_matches_the_full_forward():
    """Prefill then one token at a time through trainer/serve/engine.py's KVCache gives the full forward's logits
    (the decoding tests proper are in tests/serve/test_engine.py)."""
    from trainer.serve.engine import KVCache

    torch.manual_seed(0)
    model = build_model(tiny(2), "cpu")
    idx = torch.randint(0, model.arch.vocab_size, (1, 12))
    full = model(idx)
    cache = KVCache.for_model(model, batch=1, max_len=12)
    steps = [model(idx[:, :8], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(8, 12)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Attention and rotary embeddings


def test_sliding_window_attention_equals_a_per_query_softmax_over_itself_and_w_previous_keys():
    torch.manual_seed(4)
    B, H, T, D, w = 1, 2, 40, 16, 7
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    y = attention(q, k, v, sliding_window_mask(T, w, torch.device("cpu")))
    for i in range(T):
        lo = max(0, i - w)
        scores = (q[:, :, i:i + 1] @ k[:, :, lo:i + 1].mT) / math.sqrt(D)
        ref = F.softmax(scores, dim=-1) @ v[:, :, lo:i + 1]
        assert torch.allclose(y[:, :, i:i + 1], ref, atol=1e-5), i
    assert torch.allclose(attention(q, k, v, None), attention(q, k, v, sliding_window_mask(T, T, q.device)),
                          atol=1e-6)


def test_the_cuda_block_mask_equals_the_dense_mask():
    """CUDA's FlexAttention BlockMask, run here through eager flex_attention, against CPU's dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is slow
        y_flex = flex_attention(q, k, v, block_mask=_flex_block_mask(300, 40, q.device))
    assert torch.allclose(y_flex, attention(q, k, v, sliding_window_mask(300, 40, q.device)), atol=1e-5)


@pytest.mark.slow
def test_compiled_model_and_compiled_flex_attention_equal_eager():
    """The CUDA-default code paths, compiled here by inductor's CPU backend (about 2 minutes on 2 cores)."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    dense = attention(q, k, v, sliding_window_mask(300, 40, q.device))
    assert torch.allclose(attention(q, k, v, _flex_block_mask(300, 40, q.device)), dense, atol=1e-5)
    arch = tiny(2, seq_len=512)
    torch.manual_seed(0)
    eager = build_model(arch, "cpu")
    torch.manual_seed(0)
    compiled = build_model(arch, "cpu", compile=True)
    assert compiled._compiled_call_impl is not None
    idx = torch.randint(0, arch.vocab_size, (2, 257))
    le, lc = eager(idx[:, :-1], idx[:, 1:]), compiled(idx[:, :-1], idx[:, 1:])
    le.backward()
    lc.backward()
    assert torch.allclose(le, lc, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_only_short_layers_get_a_mask_and_the_last_layer_sees_everything():
    arch = tiny(4, seq_len=512)
    assert arch.windows == (128, 128, 128, 512)
    masks = build_model(arch, "cpu")._attention_masks(512, torch.device("cpu"))
    assert [m is None for m in masks] == [False, False, False, True]
    assert masks[0].sum(dim=1).max() == 129  # itself and the 128 before it (FA3 window semantics)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(5)
    cos, sin = rotary_tables(64, 16, torch.float32)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm = apply_rotary(q, cos[:, m:m + 1], sin[:, m:m + 1])
        return (qm * apply_rotary(k, cos[:, n:n + 1], sin[:, n:n + 1])).sum()

    assert torch.allclose(score(10, 3), score(50, 43), atol=1e-4)
    assert not torch.allclose(score(10, 3), score(10, 4), atol=1e-4)
    assert torch.allclose(apply_rotary(q, cos[:, 7:8], sin[:, 7:8]).norm(), q.norm(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Construction and initialisation


def test_build_model_runs_eager_fp32_on_cpu_with_the_reference_init():
    torch.manual_seed(6)
    arch = tiny(4)
    model = build_model(arch, "cpu")
    assert compute_dtype(torch.device("cpu")) == torch.float32
    assert model._compiled_call_impl is None  # eager by default off CUDA
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    s = math.sqrt(3 / arch.n_embd)
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 5e-5
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.c_q.weight.abs().max() <= s and block.attn.c_q.weight.abs().max() > 0.95 * s
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * s
    gates = [model.smear_gate.weight]
    gates += [b.attn.ve_gate.weight for b in model.transformer.h if b.attn.ve_gate is not None]
    assert all(0 <= g.min() and g.max() <= 0.02 for g in gates)
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert (model.smear_lambda.item(), round(model.backout_lambda.item(), 6)) == (0.0, 0.2)
    assert sorted(model.value_embeds) == ["1", "3"]  # alternating, last layer included
    keys = set(model.state_dict())
    assert "transformer.h.3.attn.ve_gate.weight" in keys and "cos" not in keys


def test_construction_on_meta_allocates_nothing_until_built():
    model, _ = meta_model(RunSpec(depth=26))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_bad_architecture_names_the_field():
    arch = dataclasses.replace(tiny(2), n_head=3)
    with pytest.raises(ValueError, match="n_head"):
        GPT(arch)

"""trainer/fp8.py on CPU: torch._scaled_mm runs here (slowly: shapes are kept small), so the numerics are real.

Tolerances: e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4 per value), e5m2 2 bits (<= 2^-3).
A dot product of K such products has a relative error of about 2^-4 / sqrt(K)-ish on random data; we
assert the whole output's relative Frobenius error against fp32 is below 5% forward (e4m3 x e4m3) and
10% for the gradients (e5m2 x e4m3), and that it is well above zero (fp8 really ran).
"""

from __future__ import annotations

import pytest
import torch

from trainer.fp8 import E4M3, E5M2, _Fp8Matmul, fp8_supported, to_fp8
from trainer.model import Float8Linear, Linear, build_model, convert_to_bf16, convert_to_fp8, convertible
from trainer.optim import build_optimizer
from trainer.plan import RunSpec, plan

TINY = dict(depth=2, seq_len=32, vocab_size=512, head_dim=64, device_batch_size=1, total_batch_size=32,
            gpu_type="cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_to_fp8_scales_by_amax_and_saturates():
    t = torch.tensor([0.5, -2.0, 1.0])
    q, inv = to_fp8(t, E4M3)
    assert q.dtype == E4M3
    assert q.float().abs().max().item() == 448.0  # amax maps to the format's max
    assert torch.allclose(q.float() * inv, t, rtol=2**-3)
    zero, inv0 = to_fp8(torch.zeros(4), E5M2)  # c_proj starts at zero: finite scale, zeros out
    assert torch.isfinite(inv0) and zero.float().abs().sum() == 0


def test_fp8_matmul_forward_and_backward_within_tolerance_of_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g, requires_grad=True)
    w = torch.randn(256, 128, generator=g, requires_grad=True)
    dy = torch.randn(64, 256, generator=g)
    y = _Fp8Matmul.apply(x, w)
    y.backward(dy)
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y32 = x32 @ w32.t()
    y32.backward(dy)
    assert y.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert 1e-4 < rel(y, y32) < 0.05
    assert 1e-4 < rel(x.grad, x32.grad) < 0.10
    assert 1e-4 < rel(w.grad, w32.grad) < 0.10


def test_fp8_matmul_equals_dequantized_matmul():
    """_scaled_mm is exactly (x_q / s_x) @ (w_q / s_w)^T up to fp32 summation order."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    xq, xi = to_fp8(x, E4M3)
    wq, wi = to_fp8(w, E4M3)
    ref = (xq.float() * xi) @ (wq.float() * wi).t()
    assert torch.allclose(_Fp8Matmul.apply(x, w), ref, rtol=1e-5, atol=1e-5)


def test_fp8_conversion_covers_the_references_layers_and_keeps_the_gates():
    p = plan(RunSpec(**TINY))
    model = build_model(p.arch, "cpu")
    n = convert_to_fp8(model)
    converted = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    kept = {name for name, m in model.named_modules() if type(m) is Linear}
    assert n == len(converted) == 6 * p.arch.n_layer + 1  # q, k, v, proj, fc, mlp proj per layer + lm_head
    assert "lm_head" in converted and "transformer.h.0.mlp.c_fc" in converted
    assert kept == {"smear_gate"} | {f"transformer.h.{i}.attn.ve_gate" for i in p.arch.value_embed_layers}
    assert not any(convertible(model.get_submodule(k)) for k in kept)
    assert convert_to_bf16(model) == n and not any(isinstance(m, Float8Linear) for m in model.modules())


def test_fp8_layers_run_bf16_outside_training_and_for_odd_token_counts():
    lin = Linear(128, 128)
    torch.nn.init.normal_(lin.weight)
    ref = Linear(128, 128)
    ref.load_state_dict(lin.state_dict())
    lin.__class__ = Float8Linear
    x = torch.randn(3, 5, 128)  # 15 tokens: not a multiple of 16
    assert torch.equal(lin(x), ref(x))
    x16 = torch.randn(2, 8, 128)
    lin.eval()
    assert torch.equal(lin(x16), ref(x16))
    lin.train()
    assert not torch.equal(lin(x16), ref(x16))  # fp8 for real in training mode


def test_fp8_training_loss_tracks_bf16():
    # the planner's LRs for its own (auto) batch: TINY's 32-token batch would scale them to almost nothing
    p = plan(RunSpec(**{k: v for k, v in TINY.items() if k not in ("device_batch_size", "total_batch_size")}))
    data = torch.randint(0, 512, (1, 33), generator=torch.Generator().manual_seed(3))
    curves = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = build_model(p.arch, "cpu", fp8=fp8)
        opt = build_optimizer(model, p.optim)
        losses = []
        for _ in range(4):
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[fp8] = losses
    base, fp8 = curves[False], curves[True]
    assert base[-1] < base[0] - 0.1  # it learns
    assert fp8[-1] < fp8[0] - 0.1
    assert fp8[0] == pytest.approx(base[0], abs=0.02)  # the first forward: c_proj is zero, fp8 barely shows
    assert all(abs(a - b) < 0.05 for a, b in zip(base, fp8)), (base, fp8)
    assert fp8 != base  # and fp8 did run


def test_fp8_and_bf16_checkpoints_are_interchangeable():
    p = plan(RunSpec(**TINY))
    torch.manual_seed(0)
    bf16 = build_model(p.arch, "cpu")
    fp8 = build_model(p.arch, "cpu", fp8=True)
    sd_b, sd_f = bf16.state_dict(), fp8.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in sd_b.items()} == {k: (v.shape, v.dtype) for k, v in sd_f.items()}
    fp8.load_state_dict(sd_b, strict=True)
    bf16.load_state_dict(fp8.state_dict(), strict=True)
    assert all(torch.equal(sd_b[k], v) for k, v in fp8.state_dict().items())
    assert fp8.count_params() == bf16.count_params() and fp8.flops_per_token() == bf16.flops_per_token()


def test_fp8_supported_on_cpu_and_one_line_fallback_elsewhere(capsys):
    assert fp8_supported("cpu") == (True, "")
    p = plan(RunSpec(**TINY))
    model = build_model(p.arch, "cpu")
    assert convert_to_fp8(model, device="meta") == 0  # a device without fp8 matmuls (CUDA < 8.9 alike)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fp8: no fp8 matmuls on device type 'meta'; training continues in bf16"]
    assert not any(isinstance(m, Float8Linear) for m in model.modules())

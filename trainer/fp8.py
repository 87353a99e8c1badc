"""fp8 training: tensorwise dynamically scaled matmuls for the model's large Linear layers.

The recipe of karpathy/nanochat `nanochat/fp8.py` (its speed records since Feb 2026), built on
`torch._scaled_mm` (which also runs on CPU, so the numerics are tested there):

- Which layers: every Linear whose input and output widths are multiples of 16 and whose smaller width
  is at least 128 (`FP8_MIN_DIM`): c_q/c_k/c_v/c_proj, c_fc/mlp.c_proj and lm_head. The gates
  (ve_gate reads 12 channels, smear_gate 24) stay in the compute dtype.
- Scaling, per tensor, recomputed every call ("dynamic"): scale = fp8_max / amax(|t|), computed in
  float64, values multiplied by it, clamped to +-fp8_max (saturate, never inf) and cast.
- Formats: inputs and weights in e4m3 (more mantissa), gradients in e5m2 (more range). The forward
  matmul uses fast accumulation; the two backward matmuls do not (the reference's choice).
- Three matmuls per layer and step: out = x W^T (e4m3 x e4m3), grad_x = g W (e5m2 x e4m3), grad_W =
  g^T x (e5m2 x e4m3), each written in the activation dtype; autograd casts grad_W to the fp32 master.
- torch.compile sees the matmul function as one opaque node (`allow_in_graph`), as in the reference.
- Only the fp8 copies of x and W are kept for backward: half the bytes of the bf16 input.

trainer.model's `Float8Linear` (its Linear with `fp8_matmul`) keeps the one `weight` parameter, so state dicts,
parameter counts, FLOPs and optimizer groups are the same with or without fp8: checkpoints move freely
between fp8 and bf16 runs. Outside training mode (evaluation, sampling) and for shapes `_scaled_mm`
cannot take (a token count not a multiple of 16, e.g. one-token decoding) it runs the bf16 Linear, as
the reference swaps back to bf16 for eval. fp8 matmuls need compute capability 8.9 (Ada, Hopper) on
CUDA; trainer.model's `convert_to_fp8` leaves the model in bf16 elsewhere and says so once.
This module knows nothing of the model (trainer.model imports it, never the reverse).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn  # forward: inputs and weights (max 448)
E5M2 = torch.float8_e5m2  # backward: gradients (max 57344)
FP8_MIN_DIM = 128  # layers with a side below this stay bf16 (nanochat fp8.py: gates, tiny matmuls)
FP8_ALIGN = 16  # _scaled_mm needs every matrix dimension divisible by 16
AMAX_EPS = 1e-12  # an all-zero tensor (c_proj at init) gets a finite scale and stays zero
MIN_CAPABILITY = (8, 9)  # CUDA fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards


@torch.no_grad()
def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t * scale saturated and cast to `dtype`, 1 / scale as an fp32 scalar): tensorwise dynamic scaling."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().double().clamp_min(AMAX_EPS)
    scale = (fmax / amax).float()
    q = (t.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same (r, c) matrix laid out column-major, as _scaled_mm wants its second operand."""
    return t.t().contiguous().t()


@torch.compiler.allow_in_graph  # one opaque node for torch.compile, as the reference does: no tracing inside
class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W^T with x (M, K) and W (N, K) in fp8; backward in fp8 too (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xq, x_inv = to_fp8(x.contiguous(), E4M3)
        wq, w_inv = to_fp8(weight, E4M3)
        ctx.save_for_backward(xq, x_inv, wq, w_inv)
        return torch._scaled_mm(xq, wq.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        gq, g_inv = to_fp8(grad.contiguous(), E5M2)
        grad_x = torch._scaled_mm(gq, _col_major(wq), scale_a=g_inv, scale_b=w_inv, out_dtype=grad.dtype,
                                  use_fast_accum=False)
        grad_w = torch._scaled_mm(gq.t().contiguous(), _col_major(xq), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=grad.dtype, use_fast_accum=False)
        return grad_x, grad_w  # in the gradient's dtype; autograd casts it to the fp32 master weight's


def fp8_supported(device: torch.device | str) -> tuple[bool, str]:
    """(whether fp8 matmuls run here, why not when they do not)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap >= MIN_CAPABILITY:
            return True, ""
        return False, (f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; "
                       f"fp8 matmuls need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada/Hopper) or later")
    return False, f"no fp8 matmuls on device type {device.type!r}"


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight^T over the last dim in fp8 (training), or None where _scaled_mm cannot take the shape (then
    the caller runs its bf16 matmul): a token count not a multiple of 16, e.g. one-token decoding."""
    N, K = weight.shape
    M = x.numel() // K if K else 0
    if M == 0 or M % FP8_ALIGN:
        return None
    return _Fp8Matmul.apply(x.reshape(M, K), weight).view(*x.shape[:-1], N)

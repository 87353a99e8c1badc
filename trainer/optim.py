"""Muon for the transformer matrices, AdamW for everything else; one optimizer, sharded across ranks.

Reproduces karpathy/nanochat `nanochat/optim.py` MuonAdamW (commit 92d63d4; docs/recipe.md).

AdamW (embeddings, lm_head, scalars): decoupled decay p *= 1 - lr * wd first, moments by lerp, bias
corrected step, math in fp32 even for bf16 parameters, state in the parameter's dtype. Groups, with
the reference's betas/eps/decay (LRs come from the plan, already batch- and width-scaled):

| group        | params                                  | betas        | eps   | weight decay |
| lm_head      | lm_head                                 | (0.8, 0.96)  | 1e-10 | 0.01         |
| wte          | wte                                     | (0.8, 0.995) | 1e-10 | 0.001        |
| value_embeds | every value embedding                   | (0.8, 0.995) | 1e-10 | 0.01         |
| resid        | resid_lambdas                           | (0.8, 0.95)  | 1e-10 | 0.05         |
| x0           | x0_lambdas                              | (0.96, 0.95) | 1e-10 | 0            |
| smear        | smear_gate, smear_lambda, backout_lambda| (0.8, 0.95)  | 1e-10 | 0            |

Muon (every parameter inside transformer.h, one group per distinct shape, the K same-shape matrices
stacked into (K, m, n)), per step:
1. Nesterov momentum: buf <- mu buf + (1 - mu) g; u = (1 - mu) g + mu buf.
2. bf16 for the orthogonalisation when the compute dtype is bf16 (and, ours, with the CPU kernels on a CPU
   that multiplies bf16 natively: default_ortho_dtype).
3. MuonEq row equilibration: each row rescaled to ||X||_F / sqrt(m).
4. X / (1.01 ||X||_F + 1e-6), then 5 Polar Express iterations (Amsel et al., arXiv 2505.16932).
5. Muon+ renorm: Frobenius norm snapped to sqrt(min(m, n)).
6. NorMuon variance reduction (arXiv 2510.05491): factored second moment (per row if m >= n, else
   per column), EMA beta2 = 0.9, update scaled by rsqrt(v) then back to its Frobenius norm.
7. Cautious weight decay (arXiv 2411.16085): p -= lr u + lr wd p [u p >= 0],
   with lr x sqrt(max(1, m / n)) (c_fc, 4n x n, gets x2).
The training loop sets group["lr"] = group["initial_lr"] * lrm every step, and group["momentum"] and
group["weight_decay"] of the Muon groups from its schedules.

Kernels (`kernels`): "reference" runs the reference's op-for-op update functions (adamw_update,
muon_update), compiled on CUDA as the reference does, eager elsewhere. "cpu", the default on CPU, keeps the
math and cuts what eager CPU execution pays beyond it: torch's fused AdamW kernel (one pass instead of ~8),
Polar Express with its scalings folded into the GEMMs, bf16 Polar Express where the CPU has native bf16
GEMMs (AMX), and each matrix updated on its own (muon_update_per_matrix), so that its update is bit for bit
the same whichever ranks own it. The two kernels differ by float32 rounding only, but Polar Express amplifies
rounding in the momentum's near-null directions (its slope at a small singular value is the product of its
five `a` coefficients, ~990), so they agree to ~1e-6 of an update on well-conditioned gradients and not
bit for bit in general (tests/test_optim.py); speed in docs/benchmarks.md.

Distributed without DDP (ZeRO-2 style, the reference's three phases): (1) launch every gradient
reduction asynchronously, (2) per group, in order: wait for its reduction, update this rank's shard,
launch an asynchronous all-gather of the updated values, (3) wait for the gathers and copy back. Every
collective's input/output tensors and Work handle stay referenced until its wait returns (upstream
nanochat PR #843: a torn all-gather when the allocator reuses a buffer still in flight). Gradients are
averaged (ReduceOp.AVG); the loop divides each micro-batch loss by grad_accum itself. With the cpu kernels,
W=2 ranks end bit for bit equal to 1 rank with 2x accumulation, either Polar Express dtype (halving is exact,
AdamW is elementwise, each Muon matrix is updated alone); the reference kernels stack a group's GEMMs as the
reference does, so there the world size can change a matrix's rounding.

Sharding layout (world size W, rank r); state_dict() is per rank and records it under "sharding":
- Group order is fixed by build_optimizer: lm_head, wte, value_embeds, resid, x0, smear, then one Muon
  group per distinct matrix shape, in sorted shape order; params within a group in model order.
- AdamW parameter with numel < 1024 (the scalars, smear gate): gradient all-reduced, state replicated on
  every rank (step, exp_avg, exp_avg_sq of the full shape).
- AdamW parameter with numel >= 1024 (wte, value embeddings, lm_head; dim 0 = padded vocab R): gradient
  reduce-scattered along dim 0; rank r holds exp_avg and exp_avg_sq for rows [r R/W, (r + 1) R/W) and
  the (replicated) step. Requires W | R.
- Muon group of K matrices of shape (m, n): chunk = ceil(K / W); rank r owns matrices
  r chunk .. min(K, (r + 1) chunk) - 1 of the group (possibly none). Each owned matrix's state holds
  momentum_buffer (m, n) and second_momentum_buffer (m, 1) if m >= n else (1, n); matrices a rank does
  not own have no state there. (In memory these are views into one stacked tensor per group.)
Re-sharding W -> W' therefore needs no other information: concatenate the AdamW row shards in rank
order, take replicated entries from any rank, collect each Muon matrix's entry from the rank that owns
it, then cut again by the rules above for W'. load_state_dict() refuses a shard saved for another
(world_size, rank).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from trainer.model import GPT, compute_dtype
from trainer.plan.schedule import Optimization

STATE_FORMAT = "llmctl.optim/v1"
SMALL_NUMEL = 1024  # AdamW params below this are all-reduced and updated whole on every rank
ADAMW_EPS = 1e-10
# name: (betas, weight decay), per the reference's setup_optimizer (table above)
ADAMW_GROUPS = {
    "lm_head": ((0.8, 0.96), 0.01),
    "wte": ((0.8, 0.995), 0.001),
    "value_embeds": ((0.8, 0.995), 0.01),
    "resid": ((0.8, 0.95), 0.05),
    "x0": ((0.96, 0.95), 0.0),  # beta1 0.96 from a ~320-run sweep (Jan 2026); >= 0.98 was catastrophic
    "smear": ((0.8, 0.95), 0.0),
}
MUON_MOMENTUM = 0.95  # group default; the loop overwrites it every step from its schedule
MUON_BETA2 = 0.9  # NorMuon second-moment EMA
MUON_NS_STEPS = 5
# Polar Express coefficients for 5 iterations, safety factor 2e-2, cushion 2 (arXiv 2505.16932)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# reduce_scatter_single/all_gather_single replace the *_tensor names in recent torch (same signature).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ---------------------------------------------------------------------------------------------
# Update kernels (hyperparameters as 0-D CPU tensors so a compiled kernel never recompiles)


def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                 beta1: Tensor, beta2: Tensor, eps: Tensor, wd: Tensor) -> None:
    """One AdamW step in place: decay, moments, bias-corrected update; fp32 math, written back in p's dtype.

    Scalars arrive as float64 0-D tensors and the ops follow torch.optim.AdamW's order, so both round alike.
    """
    p32, m32, v32, g32 = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr * wd)
    m32.lerp_(g32, 1 - beta1)
    v32.mul_(beta2).add_((1 - beta2) * g32 * g32)
    denom = v32.sqrt() / (1 - beta2**step).sqrt() + eps
    p32.sub_((lr / (1 - beta1**step)) * (m32 / denom))
    p.copy_(p32)
    exp_avg.copy_(m32)
    exp_avg_sq.copy_(v32)


def adamw_update_fused(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                       beta1: Tensor, beta2: Tensor, eps: Tensor, wd: Tensor) -> None:
    """adamw_update in one vectorised pass: torch's own fused AdamW kernel (the `fused=True` path of
    torch.optim.AdamW, on CPU since torch 2.4), same math and order, fp32 math for reduced-precision params.
    Eager adamw_update makes ~8 passes and 5 temporaries of the parameter's size instead."""
    torch._fused_adamw_([p], [grad], [exp_avg], [exp_avg_sq], [], [step.float()], lr=lr.item(),
                        beta1=beta1.item(), beta2=beta2.item(), weight_decay=wd.item(), eps=eps.item(),
                        amsgrad=False, maximize=False)


def orthogonalize(X: Tensor, steps: int = MUON_NS_STEPS, *, fused: bool = False) -> Tensor:
    """Polar Express: (K, m, n) -> approximately U V^T of each matrix's SVD (singular values near 1).

    `fused` folds each iteration's scalings and sum into the GEMMs' alpha/beta (baddbmm: out = beta C +
    alpha A B), as torch.optim.Muon does with addmm: the same polynomial with fewer rounding steps and two
    fewer elementwise passes per iteration, which eager CPU execution otherwise pays in full.
    """
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X.mT @ X if tall else X @ X.mT
        if fused:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
        elif tall:
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def muon_update(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_moment: Tensor,
                momentum: Tensor, lr: Tensor, wd: Tensor, beta2: Tensor, ns_steps: int, red_dim: int,
                ortho_dtype: torch.dtype, fused_ns: bool = False) -> None:
    """One Muon step in place on stacked (K, m, n) params; `grads` is consumed (overwritten)."""
    mu = momentum.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - mu)
    g = grads.lerp_(momentum_buffer, mu)  # Nesterov: (1 - mu) g + mu buf
    X = g.to(ortho_dtype)
    # MuonEq: rows to the mean row norm, for a better-conditioned spectrum
    target = X.float().norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.size(-2))
    X = X * (target / X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(X.dtype)
    g = orthogonalize(X, ns_steps, fused=fused_ns).to(params.dtype)
    # Muon+: Frobenius norm of an exactly semi-orthogonal matrix
    frob = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    g = g * (math.sqrt(min(g.size(-2), g.size(-1))) / frob).to(g.dtype)
    # NorMuon: factored second moment, then back to the same total norm
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    second_moment.lerp_(v_mean.to(second_moment.dtype), 1 - beta2.to(second_moment.dtype))
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * size * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # cautious weight decay: decay only where the update and the weight agree in sign
    lr, wd = lr.to(g.dtype), wd.to(g.dtype)
    params.sub_(lr * g + lr * wd * params * ((g * params) >= 0))


def muon_update_per_matrix(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_moment: Tensor,
                           *hyper) -> None:
    """muon_update on each (1, m, n) slice of the stack in turn: the same math, and each matrix's update is
    then the same sequence of ops on the same shapes whether its stack holds 1 matrix or K.

    Why: torch's CPU batched GEMMs (bmm, baddbmm) pick their path by batch size (one GEMM for a batch of 1,
    MKL's batched GEMM or oneDNN otherwise), and those paths round differently (baddbmm's alpha folded
    differently; with AVX2 even plain bmm). A rank updates only the matrices it owns, so with stacked GEMMs
    a matrix's update would depend on the world size: 1 float32 ulp, which AdamW turns into ~0.03 on
    backout_lambda, a scalar whose true gradient is ~0 at initialisation (tests/test_optim.py).
    """
    for j in range(params.size(0)):
        s = slice(j, j + 1)
        muon_update(grads[s], params[s], momentum_buffer[s], second_moment[s], *hyper)


_compiled: dict[str, tuple] = {}
KERNELS = ("reference", "cpu")


def _kernels(device: torch.device, kernels: str) -> tuple:
    """(adamw, muon, fused_ns) for a device and a kernel choice (MuonAdamW's `kernels`).

    reference: the reference's op-for-op form, compiled once per process on CUDA (fullgraph, static
    shapes), eager elsewhere. cpu: eager forms with fewer passes over memory (torch's fused AdamW kernel,
    GEMM-fused Polar Express), same math, one matrix at a time so that the world size cannot change a
    matrix's rounding (muon_update_per_matrix); compiling did not pay on CPU (docs/benchmarks.md).
    """
    if kernels == "cpu":
        return adamw_update_fused, muon_update_per_matrix, True
    if device.type != "cuda":
        return adamw_update, muon_update, False
    if "cuda" not in _compiled:
        _compiled["cuda"] = (torch.compile(adamw_update, dynamic=False, fullgraph=True),
                             torch.compile(muon_update, dynamic=False, fullgraph=True))
    return (*_compiled["cuda"], False)


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 GEMMs run natively here: CUDA with SM >= 80, or a CPU with AMX tiles (Intel Sapphire
    Rapids and later), where oneDNN's bf16 GEMM measured 4.6x its fp32 one (docs/benchmarks.md)."""
    if device.type == "cuda":
        return compute_dtype(device) == torch.bfloat16
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and bool(is_amx and is_amx())


def default_ortho_dtype(device: torch.device, kernels: str) -> torch.dtype:
    """bf16 Polar Express where the compute dtype is bf16 (the reference), and with the cpu kernels on a CPU
    that multiplies bf16 natively; float32 otherwise."""
    if compute_dtype(device) == torch.bfloat16 or (kernels == "cpu" and native_bf16_matmul(device)):
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# The optimizer


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer; see the module docstring for the math and the sharding layout.

    param_groups: dicts with `params`, `kind` ('adamw' | 'muon'), `name`, `lr`, `initial_lr`, and
    AdamW: `betas`, `eps`, `weight_decay`; Muon: `momentum`, `beta2`, `ns_steps`, `weight_decay` (all
    params of a Muon group share one shape). world_size > 1 needs torch.distributed initialised by the
    caller with that world size. `kernels`: "reference" or "cpu" (see _kernels), default "cpu" on CPU and
    "reference" elsewhere; `ortho_dtype` overrides default_ortho_dtype.
    """

    def __init__(self, param_groups: list[dict], *, world_size: int = 1, rank: int = 0,
                 ortho_dtype: torch.dtype | None = None, kernels: str | None = None) -> None:
        if kernels is not None and kernels not in KERNELS:
            raise ValueError(f"kernels: must be one of {', '.join(KERNELS)}, got {kernels!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}) for world_size {world_size}, got {rank}")
        for g in param_groups:
            kind = g.get("kind")
            if kind not in ("adamw", "muon"):
                raise ValueError(f"param group {g.get('name')!r}: kind must be adamw or muon, got {kind!r}")
            if kind == "muon" and len({p.shape for p in g["params"]}) > 1:
                raise ValueError(f"param group {g.get('name')!r}: Muon params must share one shape")
            if kind == "adamw" and world_size > 1:
                for p in g["params"]:
                    if p.numel() >= SMALL_NUMEL and p.shape[0] % world_size:
                        raise ValueError(f"param group {g.get('name')!r}: {p.shape[0]} rows cannot be "
                                         f"sharded over {world_size} ranks (world size must divide it)")
        if world_size > 1:
            if not dist.is_initialized():
                raise RuntimeError("world_size > 1 needs torch.distributed initialised by the caller")
            if (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
                raise ValueError(f"world_size/rank: given {world_size}/{rank}, torch.distributed has "
                                 f"{dist.get_world_size()}/{dist.get_rank()}")
        super().__init__(param_groups, defaults={})
        self.world_size, self.rank = world_size, rank
        device = next(p for g in self.param_groups for p in g["params"]).device
        self.kernels = kernels or ("cpu" if device.type == "cpu" else "reference")
        self.ortho_dtype = ortho_dtype or default_ortho_dtype(device, self.kernels)
        self._adamw, self._muon, self._fused_ns = _kernels(device, self.kernels)
        self._stacks: dict[int, tuple[Tensor, Tensor]] = {}  # Muon group index -> (momentum, second moment)
        self._hp = {k: torch.zeros((), dtype=torch.float64) for k in
                    ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    # -- layout helpers ------------------------------------------------------------------------------

    def _owned(self, group: dict) -> range:
        """Indices of the Muon group's matrices this rank updates."""
        K = len(group["params"])
        chunk = -(-K // self.world_size)
        return range(min(K, self.rank * chunk), min(K, (self.rank + 1) * chunk))

    def _rows(self, p: Tensor) -> slice | None:
        """This rank's dim-0 slice of a sharded AdamW param, or None when it is updated whole."""
        if self.world_size == 1 or p.numel() < SMALL_NUMEL:
            return None
        n = p.shape[0] // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def _muon_state(self, gi: int, group: dict) -> tuple[Tensor, Tensor]:
        """The group's stacked state for its owned matrices; per-matrix state entries are views into it."""
        if gi not in self._stacks:
            owned = [group["params"][i] for i in self._owned(group)]
            if owned and "momentum_buffer" in self.state[owned[0]]:  # restored by load_state_dict
                mom = torch.stack([self.state[p]["momentum_buffer"] for p in owned])
                sec = torch.stack([self.state[p]["second_momentum_buffer"] for p in owned])
            else:
                m, n = group["params"][0].shape
                like = group["params"][0]
                mom = torch.zeros(len(owned), m, n, dtype=like.dtype, device=like.device)
                sec_shape = (len(owned), m, 1) if m >= n else (len(owned), 1, n)
                sec = torch.zeros(sec_shape, dtype=like.dtype, device=like.device)
            for j, p in enumerate(owned):
                self.state[p]["momentum_buffer"] = mom[j]
                self.state[p]["second_momentum_buffer"] = sec[j]
            self._stacks[gi] = (mom, sec)
        return self._stacks[gi]

    # -- the step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("closure: not supported (the loop calls backward itself)")
        distributed = self.world_size > 1
        # Phase 1: launch every reduction.
        reductions = [self._reduce(g) if distributed else None for g in self.param_groups]
        # Phase 2: per group, wait for its reduction, update the local shard, launch its gather.
        gathers: list[tuple] = []
        for gi, (group, red) in enumerate(zip(self.param_groups, reductions)):
            if group["kind"] == "adamw":
                self._step_adamw(group, red, gathers)
            else:
                self._step_muon(gi, group, red, gathers)
        # Phase 3: wait for the gathers; Muon copies the gathered stack back into its params.
        for work, keep, params in gathers:
            work.wait()
            if params is not None:
                torch._foreach_copy_(params, list(keep[0][: len(params)].unbind(0)))
        return None

    def _reduce(self, group: dict) -> list | tuple:
        """Launch this group's gradient reduction; returns what phase 2 needs (tensors kept alive)."""
        for p in group["params"]:
            if p.grad is None:
                raise RuntimeError(f"param group {group['name']!r}: a parameter of shape {tuple(p.shape)} "
                                   f"has no gradient; every rank must reduce every gradient")
        avg = dist.ReduceOp.AVG
        if group["kind"] == "adamw":
            out = []
            for p in group["params"]:
                if self._rows(p) is None:
                    out.append((dist.all_reduce(p.grad, op=avg, async_op=True), p.grad))
                else:
                    shard = torch.empty_like(p.grad[: p.shape[0] // self.world_size])
                    out.append((_reduce_scatter(shard, p.grad, op=avg, async_op=True), shard, p.grad))
            return out
        params = group["params"]
        chunk = -(-len(params) // self.world_size)
        stacked = torch.zeros(chunk * self.world_size, *params[0].shape, dtype=params[0].dtype,
                              device=params[0].device)
        torch._foreach_copy_(list(stacked[: len(params)].unbind(0)), [p.grad for p in params])
        grad_chunk = torch.empty_like(stacked[:chunk])
        return (_reduce_scatter(grad_chunk, stacked, op=avg, async_op=True), grad_chunk, stacked)

    def _step_adamw(self, group: dict, red: list | None, gathers: list) -> None:
        hp = self._hp
        hp["lr"].fill_(group["lr"])
        hp["beta1"].fill_(group["betas"][0])
        hp["beta2"].fill_(group["betas"][1])
        hp["eps"].fill_(group["eps"])
        hp["wd"].fill_(group["weight_decay"])
        for i, p in enumerate(group["params"]):
            rows = self._rows(p)
            if red is None:
                if p.grad is None:
                    continue
                grad = p.grad
            else:
                red[i][0].wait()
                grad = red[i][1]
            target = p if rows is None else p[rows]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(target)
                state["exp_avg_sq"] = torch.zeros_like(target)
            state["step"] += 1
            hp["step"].fill_(state["step"])
            self._adamw(target, grad, state["exp_avg"], state["exp_avg_sq"], hp["step"], hp["lr"],
                        hp["beta1"], hp["beta2"], hp["eps"], hp["wd"])
            if rows is not None:  # in place: this rank's rows of p are the all-gather's input
                gathers.append((_all_gather(p, target, async_op=True), (target, red[i]), None))

    def _step_muon(self, gi: int, group: dict, red: tuple | None, gathers: list) -> None:
        params = group["params"]
        m, n = params[0].shape
        owned = self._owned(group)
        mom, sec = self._muon_state(gi, group)
        if red is None:
            if any(p.grad is None for p in params):
                raise RuntimeError(f"param group {group['name']!r}: Muon needs a gradient for every matrix")
            grads = torch.stack([p.grad for p in params])
        else:
            red[0].wait()
            grads = red[1][: len(owned)]
        hp = self._hp
        hp["momentum"].fill_(group["momentum"])
        hp["beta2"].fill_(group["beta2"])
        hp["lr"].fill_(group["lr"] * math.sqrt(max(1.0, m / n)))  # per-shape LR multiplier
        hp["wd"].fill_(group["weight_decay"])
        stacked = torch.stack([params[i] for i in owned]) if len(owned) else None
        if stacked is not None:
            self._muon(grads, stacked, mom, sec, hp["momentum"], hp["lr"], hp["wd"], hp["beta2"],
                       group["ns_steps"], -1 if m >= n else -2, self.ortho_dtype, self._fused_ns)
        if red is None:
            torch._foreach_copy_(params, list(stacked.unbind(0)))
            return
        updated = torch.zeros_like(red[1])
        if stacked is not None:
            updated[: len(owned)].copy_(stacked)
        out = red[2]  # the reduction's input stack, reused as the gather's output
        gathers.append((_all_gather(out, updated, async_op=True), (out, updated, red), params))

    # -- per-rank checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["sharding"] = {"format": STATE_FORMAT, "world_size": self.world_size, "rank": self.rank}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        sharding = sd.pop("sharding", None)
        want = {"format": STATE_FORMAT, "world_size": self.world_size, "rank": self.rank}
        if sharding != want:
            raise ValueError(f"optimizer state: saved for {sharding}, this optimizer is {want}; "
                             f"re-shard it first (layout in trainer/optim.py)")
        names = [(g["name"], g["kind"], len(g["params"])) for g in self.param_groups]
        saved = [(g.get("name"), g.get("kind"), len(g["params"])) for g in sd["param_groups"]]
        if names != saved:
            raise ValueError(f"optimizer state: groups {saved} do not match this optimizer's {names}")
        super().load_state_dict(sd)
        self._stacks.clear()  # rebuilt from the per-matrix entries on the next step
        for gi, g in enumerate(self.param_groups):
            if g["kind"] == "muon":
                self._muon_state(gi, g)


def build_optimizer(model: GPT, optim: Optimization, *, world_size: int = 1, rank: int = 0,
                    kernels: str | None = None, ortho_dtype: torch.dtype | None = None) -> MuonAdamW:
    """The reference's groups with the plan's (batch- and width-scaled) LRs; see the module docstring.
    `kernels` and `ortho_dtype` as MuonAdamW's (tests force each Polar Express dtype on any CPU)."""
    groups = model.param_groups()
    resid, x0 = model.resid_lambdas, model.x0_lambdas
    smear = [p for p in groups["scalars"] if p is not resid and p is not x0]
    members = {"lm_head": groups["lm_head"], "wte": groups["wte"], "value_embeds": groups["value_embeds"],
               "resid": [resid], "x0": [x0], "smear": smear}
    lrs = {"lm_head": optim.lr_lm_head, "wte": optim.lr_wte, "value_embeds": optim.lr_value_embeds,
           "resid": optim.lr_resid, "x0": optim.lr_x0, "smear": optim.lr_smear}
    param_groups = []
    for name, (betas, wd) in ADAMW_GROUPS.items():
        if members[name]:
            param_groups.append(dict(kind="adamw", name=name, params=members[name], lr=lrs[name],
                                     betas=betas, eps=ADAMW_EPS, weight_decay=wd))
    matrices = groups["transformer_matrices"]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        param_groups.append(dict(kind="muon", name=f"muon_{shape[0]}x{shape[1]}",
                                 params=[p for p in matrices if tuple(p.shape) == shape], lr=optim.lr_matrix,
                                 momentum=MUON_MOMENTUM, beta2=MUON_BETA2, ns_steps=MUON_NS_STEPS,
                                 weight_decay=optim.weight_decay))
    for g in param_groups:
        g["initial_lr"] = g["lr"]
    return MuonAdamW(param_groups, world_size=world_size, rank=rank, kernels=kernels, ortho_dtype=ortho_dtype)

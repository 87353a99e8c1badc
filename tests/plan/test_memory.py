"""trainer/plan/memory.py: the activation estimate against measured saved tensors on CPU, and the planner's use of it.

The measurement: every tensor autograd saves for backward during one forward (saved_tensors_hooks), counted
once per storage, parameters and rotary tables excluded. That is exactly the activation memory a step holds
at the start of backward, without allocator or RSS noise. Tolerance: 10% (docs/benchmarks.md has the table).
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.plan import memory
from trainer.model import build_model
from trainer.plan.catalog import GPUS
from trainer.plan import PlanError, RunSpec, plan
from trainer.plan.shape import architecture, param_counts


def saved_activation_bytes(depth: int, seq: int, batch: int, vocab: int, precision: str) -> tuple[int, object]:
    p = plan(RunSpec(depth=depth, seq_len=seq, vocab_size=vocab, device_batch_size=batch,
                     total_batch_size=batch * seq, gpu_type="cpu", stages=("pretrain",), precision=precision))
    torch.manual_seed(0)
    model = build_model(p.arch, "cpu", fp8=precision == "fp8")
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in fixed:
            seen[st.data_ptr()] = st.nbytes()
        return t

    data = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(data[:, :-1], data[:, 1:])
    return sum(seen.values()), p


CASES = [(2, 128, 2, 512, "bf16"), (4, 128, 2, 512, "bf16"), (6, 128, 1, 1024, "bf16"), (8, 128, 1, 512, "bf16"),
         (2, 64, 1, 512, "fp8")]


@pytest.mark.parametrize("depth,seq,batch,vocab,precision", CASES)
def test_eager_activation_estimate_within_10_percent_of_saved_tensors(one_torch_thread, depth, seq, batch,
                                                                     vocab, precision):
    measured, p = saved_activation_bytes(depth, seq, batch, vocab, precision)
    est = memory.estimate(p.arch, p.params, device_batch_size=batch, precision=precision, compiled=False,
                          act_bytes=4)
    assert est.activations == pytest.approx(measured, rel=0.10), (est.activations, measured)


def test_memory_parts_add_up_and_fp8_needs_less():
    p = plan(RunSpec(depth=20, gpu_type="h200"))
    e = memory.estimate(p.arch, p.params, device_batch_size=32, memory_gib=141)
    f = memory.estimate(p.arch, p.params, device_batch_size=32, precision="fp8", memory_gib=141)
    assert e.peak == e.params + e.grads + e.optimizer + max(e.activations, e.optimizer_step) + e.workspace
    assert f.activations < e.activations and f.params == e.params
    # params: fp32 matrices/lm_head/scalars + bf16 embeddings, per the model's storage
    pc = p.params
    assert e.params == 4 * (pc.transformer_matrices + pc.lm_head + pc.scalars) + 2 * (pc.wte + pc.value_embeds)
    # sharding: 8 ranks hold less optimizer state than 1
    e8 = memory.estimate(p.arch, p.params, device_batch_size=32, world_size=8, memory_gib=141)
    assert e8.optimizer < e.optimizer / 4


def test_planner_picks_the_largest_power_of_two_that_fits():
    # the reference: 32 sequences to d16 on 80 GB, 16 at d24 and d26 (OOM at 32, nanochat issue #443)
    assert plan(RunSpec(depth=12, gpus=8)).device_batch_size == 32
    assert plan(RunSpec(depth=24, gpus=8)).device_batch_size == 16
    assert plan(RunSpec(depth=26, gpus=8)).device_batch_size == 16
    assert plan(RunSpec(depth=26, gpus=8, gpu_type="h200")).device_batch_size == 32
    p = plan(RunSpec(depth=24, gpus=8))
    assert p.memory["fits"] and p.memory["peak"] <= p.memory["capacity"]
    bigger = memory.estimate(p.arch, p.params, device_batch_size=32, world_size=8, memory_gib=80)
    assert not bigger.fits


def test_plan_json_carries_the_memory_prediction():
    d = json.loads(plan(RunSpec(depth=20, gpus=8, precision="fp8")).to_json())
    m = d["memory"]
    assert m["device_batch_size"] == d["device_batch_size"] and m["precision"] == "fp8" and m["world_size"] == 8
    assert 0 < m["peak_gib"] <= m["capacity_gib"] and m["fits"] is True


def test_impossible_fit_is_refused_with_one_line_saying_what_fits():
    with pytest.raises(PlanError) as e:
        plan(RunSpec(depth=48, gpus=8))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("depth: d48 does not fit on h100")
    assert "depth <= 46 on h100" in msg and "d48 on h200" in msg
    plan(RunSpec(depth=46, gpus=8))  # what it says fits, plans
    plan(RunSpec(depth=48, gpus=8, gpu_type="h200"))
    with pytest.raises(PlanError, match=r"^device_batch_size: 32 sequences .* at most 16 fit$"):
        plan(RunSpec(depth=26, gpus=8, device_batch_size=32))


def test_cpu_workers_have_no_memory_limit():
    p = plan(RunSpec(depth=12, gpu_type="cpu"))
    assert p.memory["capacity"] == 0 and p.memory["fits"] and GPUS["cpu"].local


# bench/gpu_check.sh on an H200, 2026-11-30 (docs/benchmarks.md): peak GiB at 32 x 2048, one rank, compiled.
H200_PEAKS = {("bf16", 20): 71.9, ("fp8", 20): 66.5, ("bf16", 12): 27.4}


@pytest.mark.parametrize("precision, depth", sorted(H200_PEAKS))
def test_the_compiled_estimate_is_within_ten_percent_of_the_measured_gpu_peak(precision, depth):
    a = architecture(depth)
    e = memory.estimate(a, param_counts(a), device_batch_size=32, precision=precision)
    assert 0.9 <= e.peak / memory.GIB / H200_PEAKS[(precision, depth)] <= 1.1

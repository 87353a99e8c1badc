"""trainer/plan/runplan.py: the recipe's numbers, cross-checked against nanochat's published values.

Run: .venv/bin/pytest tests/plan/test_runplan.py
"""

import json
import math

import pytest

from trainer.plan.catalog import GPUS
from trainer.plan.catalog import fp8_speedup
from trainer.plan import SCHEMA, PlanError, RunPlan, RunSpec, plan
from trainer.plan.shape import architecture, param_counts
from trainer.plan.batch import auto_batch_size

# Derived from nanochat gpt.py's counting rules (docs/recipe.md): (depth, n_embd, total params, scaling params,
# FLOPs/token)
REFERENCE = [
    (4, 256, 36_700_242, 11_534_384, 8.022e7),
    (8, 512, 125_829_354, 41_943_232, 2.957e8),
    (12, 768, 286_261_730, 110_100_912, 7.597e8),
    (16, 1024, 536_871_738, 234_881_792, 1.586e9),
    (20, 1280, 896_533_746, 435_160_240, 2.886e9),
    (24, 1536, 1_384_122_122, 729_810_624, 4.775e9),
    (26, 1664, 1_681_786_938, 918_423_532, 5.991e9),
    (32, 2048, 2_818_575_450, 1_677_724_672, 1.077e10),
]


@pytest.mark.parametrize("depth,width,total,scaling,fpt", REFERENCE)
def test_shape_params_and_flops_match_the_reference(depth, width, total, scaling, fpt):
    p = plan(RunSpec(depth=depth, gpus=8))
    assert p.arch.n_embd == width and p.arch.n_head == width // 128 and p.arch.head_dim == 128
    assert p.params.total == total
    assert p.params.scaling == scaling
    assert p.flops_per_token == pytest.approx(fpt, rel=5e-4)


def test_d24_and_d26_cross_checks_exact():
    assert plan(RunSpec(depth=24)).params.scaling == 729_810_624
    assert plan(RunSpec(depth=26)).params.scaling == 918_423_532
    assert f"{plan(RunSpec(depth=24)).flops_per_token:.4g}" == "4.775e+09"
    assert f"{plan(RunSpec(depth=26)).flops_per_token:.4g}" == "5.991e+09"


def test_speedrun_d24_ratio8():
    p = plan(RunSpec(depth=24, gpus=8, ratio=8, device_batch_size=16, stages=("pretrain",)))
    pre = p.stage("pretrain")
    assert p.total_batch_size == 2**20
    assert pre.steps == 5_568
    assert pre.warmdown_steps == 3_619  # warmdown starts at step 1,949
    assert p.grad_accum == 4 and p.device_batch_size == 16
    assert p.total_flops == pytest.approx(2.79e19, rel=2e-3)


@pytest.mark.parametrize("depths,batch", [((8,), 2**18), ((10, 12, 14, 16), 2**19),
                                          ((18, 20, 22, 24, 26), 2**20), ((32,), 2**21)])
def test_power_lines_batch_per_depth_band(depths, batch):
    for d in depths:
        assert plan(RunSpec(depth=d, gpus=8)).total_batch_size == batch, d


@pytest.mark.parametrize("depth", range(2, 47, 2))  # d48 does not fit 8 x H100: tests/plan/test_memory.py
def test_every_even_depth_plans_cleanly(depth):
    p = plan(RunSpec(depth=depth, gpus=8))
    a = p.arch
    assert a.n_embd % 128 == 0 and a.n_embd >= depth * 64 and a.n_head * a.head_dim == a.n_embd
    assert a.windows[-1] == 2048 and set(a.windows) <= {512, 2048}
    assert len(a.value_embed_layers) == math.ceil(depth / 2) and a.value_embed_layers[-1] == depth - 1
    assert p.warnings == ()
    pre = p.stage("pretrain")
    assert pre.tokens == pre.steps * p.total_batch_size
    assert p.device_batch_size * a.seq_len * 8 * p.grad_accum == p.total_batch_size
    assert p.estimate.total_dollars > p.estimate.train_dollars > 0


def test_window_pattern_sssl_with_full_last_layer():
    a = architecture(6)
    assert a.windows == (512, 512, 512, 2048, 512, 2048)
    assert a.value_embed_layers == (1, 3, 5)
    assert architecture(5).value_embed_layers == (0, 2, 4)
    assert architecture(4, seq_len=1024).windows == (256, 256, 256, 1024)


def test_odd_depth_is_allowed_with_a_warning():
    p = plan(RunSpec(depth=25))
    assert p.arch.n_embd == 1664 and p.warnings and "odd depth" in p.warnings[0]


def test_learning_rates_and_weight_decay_after_scaling():
    d12 = plan(RunSpec(depth=12)).optim  # reference point: no scaling
    assert (d12.lr_lm_head, d12.lr_wte, d12.lr_value_embeds) == pytest.approx((0.008, 0.3, 0.15))
    assert (d12.lr_resid, d12.lr_x0, d12.lr_smear, d12.lr_matrix) == pytest.approx((0.005, 0.5, 0.2, 0.02))
    assert d12.weight_decay == pytest.approx(0.28)
    d24 = plan(RunSpec(depth=24, ratio=8)).optim  # sqrt(2) batch factor and 1/sqrt(2) width factor cancel
    assert (d24.lr_lm_head, d24.lr_wte, d24.lr_value_embeds) == pytest.approx((0.008, 0.3, 0.15))
    assert (d24.lr_resid, d24.lr_x0, d24.lr_matrix) == pytest.approx((0.00707, 0.707, 0.0283), rel=1e-3)
    assert d24.weight_decay == pytest.approx(0.0597, rel=1e-3)


def test_batch_and_weight_decay_do_not_depend_on_ratio():
    a, b = plan(RunSpec(depth=20, ratio=8)), plan(RunSpec(depth=20, ratio=20))
    assert a.total_batch_size == b.total_batch_size and a.optim == b.optim
    assert b.stage("pretrain").steps > a.stage("pretrain").steps


def test_auto_batch_is_a_power_of_two_in_scaling_ratio():
    ref = param_counts(architecture(12)).scaling
    assert auto_batch_size(ref, ref) == 2**19


def test_time_and_cost_model():
    p = plan(RunSpec(depth=24, gpus=8, ratio=8, stages=("pretrain",)))
    e = p.estimate
    assert e.mfu == pytest.approx(0.50)
    # hours = FLOPs / (gpus x peak x MFU); dollars = hours x gpus x price
    assert e.train_hours == pytest.approx(p.total_flops / (8 * GPUS["h100"].peak_bf16 * 0.5) / 3600)
    assert e.train_dollars == pytest.approx(e.train_hours * 8 * 3.0)
    assert 40 < e.train_dollars < 55  # nanochat: GPT-2 capability for about $48
    assert set(e.overhead_hours) == {"scheduling_and_image_pull", "ray_start", "compile", "evals",
                                     "checkpoint_upload"}
    assert e.total_dollars == pytest.approx(e.train_dollars + e.overhead_dollars)
    priced = plan(RunSpec(depth=24, gpus=8, ratio=8, stages=("pretrain",), price_per_gpu_hour=2.0))
    assert priced.estimate.train_dollars == pytest.approx(e.train_dollars * 2 / 3)
    fp8 = plan(RunSpec(depth=24, gpus=8, ratio=8, stages=("pretrain",), precision="fp8"))
    assert fp8.estimate.train_hours == pytest.approx(e.train_hours / fp8_speedup(24)[0])


def test_sft_stage_is_priced_and_uses_its_own_schedule():
    p = plan(RunSpec(depth=20, gpus=8))
    sft = p.stage("sft")
    assert sft.steps == 400_000_000 // p.total_batch_size and sft.weight_decay == 0.0
    assert sft.lr_frac == 0.8 and sft.warmup_steps == 0 and sft.final_lr_frac == 0.0
    assert p.estimate.train_hours == pytest.approx(p.stage("pretrain").hours + sft.hours)
    assert plan(RunSpec(depth=20, gpus=8, stages=("pretrain",))).estimate.total_dollars < p.estimate.total_dollars


def test_sft_steps_on_cpu_are_priced_at_the_measured_cost_per_token():
    """The demo preset's SFT took 2x its plan: an SFT token now costs 2.8 pretraining tokens on CPU (measured),
    1.0 on GPUs (assumed, and the plan says so)."""
    local = plan(RunSpec(depth=4, gpus=2, gpu_type="cpu", seq_len=256, vocab_size=4096, total_batch_size=8192))
    pre, sft = local.stage("pretrain"), local.stage("sft")
    assert sft.hours / sft.tokens == pytest.approx(2.8 * pre.hours / pre.tokens)
    assert local.estimate.sft_cost_per_token == 2.8 and "measured" in local.estimate.sft_cost_source
    gpu = plan(RunSpec(depth=20, gpus=8))
    assert gpu.stage("sft").hours / gpu.stage("sft").tokens == pytest.approx(
        gpu.stage("pretrain").hours / gpu.stage("pretrain").tokens)
    assert "assumed" in gpu.to_dict()["estimate"]["sft_cost_source"]


def test_the_json_plan_carries_the_interconnect_figures_the_table_shows():
    """`plan --depth 26 --gpus 32` shows the all-reduce share of a step; `-o json` is the contract and holds it."""
    d = json.loads(plan(RunSpec(depth=26, gpus=32)).to_json())["interconnect"]
    assert d["link"] == "fabric" and 0.01 < d["interconnect_share"] < 0.1
    assert d["busbw"] == 300e9 and d["busbw_source"].startswith("assumed") and d["bytes_per_step"] > 1e9
    assert d["compute_seconds"] + d["interconnect_seconds"] == pytest.approx(d["step_seconds"])
    given = json.loads(plan(RunSpec(depth=26, gpus=32, interconnect_busbw_gbs=50.0)).to_json())["interconnect"]
    assert given["busbw"] == 50e9 and given["busbw_source"] == "given" and given["interconnect_share"] > d["interconnect_share"]
    assert plan(RunSpec(depth=26, gpus=8)).interconnect["link"] == "nvlink"
    local = plan(RunSpec(depth=4, gpus=2, gpu_type="cpu", seq_len=256, vocab_size=4096, total_batch_size=8192))
    assert local.interconnect["link"] == "local" and local.interconnect["interconnect_seconds"] == 0.0


def test_budget_cap():
    assert plan(RunSpec(depth=20, gpus=8, budget_cap=1.0)).estimate.within_budget is False
    assert plan(RunSpec(depth=20, gpus=8, budget_cap=1e6)).estimate.within_budget is True
    assert plan(RunSpec(depth=20, gpus=8)).estimate.within_budget is None


def test_run_name_is_deterministic_and_dns_safe():
    a, b = plan(RunSpec(depth=26, gpus=8)), plan(RunSpec(depth=26, gpus=8, price_per_gpu_hour=9.0))
    assert a.name == b.name  # price does not change what is trained: a retry resumes the same run
    assert a.name != plan(RunSpec(depth=26, gpus=16)).name
    assert len(a.name) <= 47 and a.name.startswith("gpt-d26-")
    assert a.urls["run"].endswith(f"/runs/{a.name}")


def test_json_roundtrip_holds_every_design_field():
    p = plan(RunSpec(depth=26, gpus=8))
    d = json.loads(p.to_json())
    assert d["schema"] == SCHEMA
    for key in ("n_layer", "n_embd", "n_head", "head_dim", "vocab_size", "window_pattern"):
        assert key in d["arch"]
    for key in ("total", "scaling"):
        assert key in d["params"]
    for key in ("flops_per_token", "target_tokens", "total_batch_size", "grad_accum", "optim", "stages"):
        assert key in d
    for key in ("mfu", "mfu_source", "train_hours", "overhead_hours", "total_dollars"):
        assert key in d["estimate"]
    assert RunPlan.from_json(p.to_json()) == p


def test_a_stored_plan_that_this_code_would_plan_differently_is_refused():
    d = json.loads(plan(RunSpec(depth=4)).to_json())
    d["total_batch_size"] = 12345
    with pytest.raises(PlanError, match="total_batch_size"):
        RunPlan.from_dict(d)
    with pytest.raises(PlanError, match="schema"):
        RunPlan.from_dict({**d, "schema": "other"})


@pytest.mark.parametrize("fields,bad", [
    (dict(depth=0), "depth"),
    (dict(depth=12, gpus=-1), "gpus"),
    (dict(depth=12, gpus=0), "gpus"),
    (dict(depth=12, gpu_type="tpu"), "gpu_type"),
    (dict(depth=12, ratio=0), "ratio"),
    (dict(depth=12, ratio=-3.0), "ratio"),
    (dict(depth=12, stages=("sft", "pretrain")), "stages"),
    (dict(depth=12, stages=("rl",)), "stages"),
    (dict(depth=12, seq_len=1000), "seq_len"),
    (dict(depth=12, name="Bad_Name"), "name"),
    (dict(depth=12, budget_cap=0), "budget_cap"),
])
def test_bad_specs_name_the_field(fields, bad):
    with pytest.raises(PlanError, match=f"^{bad}:"):
        plan(RunSpec(**fields))


@pytest.mark.parametrize("fields,why", [
    (dict(depth=24, gpus=3), "3 GPUs cannot share"),
    (dict(depth=24, gpus=8, device_batch_size=3), "not a multiple of 3"),
    (dict(depth=24, gpus=8, total_batch_size=1000), "whole number"),
])
def test_batches_that_do_not_divide_are_refused_with_the_reason(fields, why):
    with pytest.raises(PlanError, match=why):
        plan(RunSpec(**fields))


def test_small_local_spec():
    p = plan(RunSpec(depth=2, gpus=2, gpu_type="cpu", vocab_size=2048, seq_len=128, head_dim=64,
                     total_batch_size=4096, num_iterations=30))
    assert p.arch.n_embd == 128 and p.stage("pretrain").steps == 30
    assert p.estimate.total_dollars == 0.0 and p.estimate.overhead_hours["scheduling_and_image_pull"] == 0


def test_schedules_follow_the_reference():
    from trainer.plan.schedule import lr_multiplier, muon_momentum, muon_weight_decay

    p = plan(RunSpec(depth=24, gpus=8, ratio=8))
    s = p.stage("pretrain")  # 5,568 steps, warm-up 40, warm-down 3,619 (starts after step 1,949)
    assert lr_multiplier(s, 0) == pytest.approx(1 / 40)
    assert lr_multiplier(s, 39) == 1.0 and lr_multiplier(s, 1949) == 1.0
    assert lr_multiplier(s, 1950) < 1.0
    assert lr_multiplier(s, s.steps) == pytest.approx(0.05)
    assert muon_momentum(s, 0) == 0.85 and muon_momentum(s, 400) == pytest.approx(0.97)
    assert muon_momentum(s, 1949) == pytest.approx(0.97) and muon_momentum(s, s.steps) == pytest.approx(0.90)
    assert muon_weight_decay(s, 0) == pytest.approx(p.optim.weight_decay)
    assert muon_weight_decay(s, s.steps // 2) == pytest.approx(p.optim.weight_decay / 2, rel=1e-3)
    assert muon_weight_decay(s, s.steps) == pytest.approx(0.0, abs=1e-12)
    f = p.stage("sft")  # progress-driven: flat to half the data, then linear to 0, all x0.8
    assert lr_multiplier(f, 0, progress=0.0) == pytest.approx(0.8)
    assert lr_multiplier(f, 0, progress=0.75) == pytest.approx(0.4, rel=0.01)
    assert lr_multiplier(f, 0, progress=1.0) == pytest.approx(0.0)
    assert muon_momentum(f, 300) == pytest.approx(0.95) and muon_weight_decay(f, 10) == 0.0


def test_muon_momentum_ramp_wins_inside_the_warm_down_of_a_short_run():
    """The reference (base_train.py get_muon_momentum): 0.85 -> 0.97 linearly over the first 400 steps, and
    that ramp is what a step below 400 gets even inside the warm-down; from step 400 on, the warm-down takes
    momentum linearly from 0.97 (at its start) to 0.90 (at the last step). Here 1,000 steps: warm-down 650,
    starting after step 350, so steps 351-399 are in both."""
    from trainer.plan.schedule import muon_momentum

    s = plan(RunSpec(depth=24, gpus=8, num_iterations=1000)).stage("pretrain")
    assert (s.steps, s.warmdown_steps) == (1000, 650)
    assert muon_momentum(s, 200) == pytest.approx(0.85 + 0.5 * 0.12)
    assert muon_momentum(s, 380) == pytest.approx(0.85 + 380 / 400 * 0.12)  # the ramp, not blended
    assert muon_momentum(s, 399) == pytest.approx(0.85 + 399 / 400 * 0.12)
    for step in (400, 500, 1000):
        p = (step - 350) / 650
        assert muon_momentum(s, step) == pytest.approx(0.97 * (1 - p) + 0.90 * p)

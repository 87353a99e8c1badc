"""Tests of trainer/metrics.py: MFU and cost against hand numbers, the metric contract, bounded labels, and
the end-to-end path: a real training loop's exporters scraped by a real Prometheus, where every PromQL
expression of every dashboard panel and every alert rule returns data.

Run: .venv/bin/pytest tests/test_metrics.py -v
"""

from __future__ import annotations

import io
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import prom as promlib
from trainer.metrics import (CORE_TASKS, INFO_LABELS, LABELS, METRIC_NAMES, METRICS_PORT_BASE, RunMetrics,
                             device_peak, mfu)
from trainer.plan.catalog import GPUS
from trainer.plan import RunSpec, plan

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "charts/llmctl/files/alerts.yaml"
DASHBOARDS = sorted((ROOT / "charts/llmctl/dashboards").glob("*.json"))

# docs/observability.md: the names shared by exporter, dashboards and alerts (a histogram serves
# _bucket/_sum/_count).
DESIGN_NAMES = (
    "llmctl_tokens_total", "llmctl_tokens_per_second", "llmctl_mfu_ratio", "llmctl_step",
    "llmctl_steps_total_planned", "llmctl_train_loss", "llmctl_val_bpb", "llmctl_step_seconds",
    "llmctl_data_wait_seconds_total", "llmctl_checkpoint_seconds", "llmctl_cost_dollars",
    "llmctl_cost_estimated_dollars", "llmctl_eta_seconds", "llmctl_run_info", "llmctl_core_score",
    "llmctl_core_task_centered",
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def d24_plan():
    return plan(RunSpec(depth=24, gpus=8, ratio=8))


def small_plan(**kw):
    fields = dict(depth=2, gpus=2, gpu_type="h100", seq_len=64, num_iterations=100, name="obs-test")
    fields.update(kw)
    return plan(RunSpec(**fields))


def value(m: RunMetrics, name: str, **labels) -> float | None:
    base = dict(run=m.plan.name, stage=m.stage, rank=str(m.rank))
    return m.registry.get_sample_value(name, {**base, **labels})


def series(m: RunMetrics) -> list[tuple[str, dict]]:
    """Every series the exporter serves, without prometheus_client's `_created` timestamps."""
    return [(s.name, s.labels) for fam in m.registry.collect() for s in fam.samples
            if not s.name.endswith("_created")]


# ---------------------------------------------------------------------------------------------
# MFU


def test_mfu_of_d24_on_8xh100_at_800k_tokens_per_second_is_about_half():
    """The nanochat leaderboard run: d24 on 8xH100 at 800K tok/s is ~50% MFU (LEADERBOARD run 1; docs/recipe.md, cost model).

    By hand: 4,775,225,616 FLOPs/token (plan) x 100,000 tok/s per GPU / 989.4e12 FLOP/s = 0.48264.
    """
    p = d24_plan()
    assert p.flops_per_token == 4_775_225_616
    m = RunMetrics(p, "pretrain", rank=3, local_rank=3, world_size=8, device_name="NVIDIA H100 80GB HBM3")
    # One step of 2^20 tokens over 8 ranks at 800K tok/s for the node: 131,072 tokens in 1.31072 s per rank.
    m.on_step(1, 131_072, 1.31072, 0.0, 3.1)
    assert m.snapshot()["tokens_per_second"] == pytest.approx(100_000)
    assert m.snapshot()["mfu"] == pytest.approx(0.48264, abs=1e-5)
    assert value(m, "llmctl_mfu_ratio") == pytest.approx(0.48264, abs=1e-5)
    assert 0.45 < m.snapshot()["mfu"] < 0.55
    assert mfu(4_775_225_616, 100_000, 989.4e12) == pytest.approx(0.48264, abs=1e-5)


@pytest.mark.parametrize("name, key, reason", [
    ("NVIDIA H100 80GB HBM3", "h100", "ok"),  # SXM: no "SXM" in the name
    ("NVIDIA H100 PCIe", "h100-pcie", "ok"),
    ("NVIDIA H200", "h200", "ok"),
    ("NVIDIA GH200 480GB", "h200", "ok"),
    ("NVIDIA A100-SXM4-80GB", "a100", "ok"),
    ("NVIDIA H100 NVL", "none", "unknown_gpu"),  # 835 TFLOP/s: not the SXM peak
    ("NVIDIA H200 NVL", "none", "unknown_gpu"),
    ("NVIDIA GeForce RTX 4090", "none", "unknown_gpu"),
    (None, "none", "cpu"),
])
def test_device_name_maps_to_the_catalog_peak_or_a_reason(name, key, reason):
    peak, got_key, got_reason = device_peak(name)
    assert (got_key, got_reason) == (key, reason)
    assert peak == (GPUS[key].peak_bf16 if key != "none" else 0.0)


@pytest.mark.parametrize("device, reason", [(None, "cpu"), ("NVIDIA GeForce RTX 4090", "unknown_gpu")])
def test_mfu_is_zero_with_a_reason_on_cpu_and_unknown_gpus(device, reason):
    m = RunMetrics(small_plan(), "pretrain", rank=0, local_rank=0, world_size=2, device_name=device)
    m.on_step(1, 10_000, 0.1, 0.0, 4.0)
    assert m.snapshot()["mfu"] == 0.0 and value(m, "llmctl_mfu_ratio") == 0.0
    assert m.snapshot()["tokens_per_second"] == pytest.approx(100_000)  # throughput is still real
    info = [labels for name, labels in series(m) if name == "llmctl_run_info"]
    assert len(info) == 1 and info[0]["mfu_reason"] == reason and info[0]["peak_gpu"] == "none"


# ---------------------------------------------------------------------------------------------
# Cost, tokens, ETA


def test_cost_accrues_with_elapsed_gpu_hours_at_the_plan_price():
    clock = Clock()
    p = small_plan()  # h100 at the catalog's $3.00 per GPU-hour
    assert p.estimate.price_per_gpu_hour == 3.0
    ranks = [RunMetrics(p, "pretrain", rank=r, local_rank=r, world_size=2, device_name=None, clock=clock,
                        prior_seconds=1800.0) for r in range(2)]
    # Half an hour already paid before a resume: $1.50 per GPU, before any new time passes.
    assert [m.snapshot()["cost_dollars"] for m in ranks] == [pytest.approx(1.5)] * 2
    clock.t += 3600  # one more hour, stalled or not: the bill runs
    assert [value(m, "llmctl_cost_dollars") for m in ranks] == [pytest.approx(4.5)] * 2
    assert sum(m.snapshot()["cost_dollars"] for m in ranks) == pytest.approx(9.0)  # the run's spend
    clock.t += 1200
    assert value(ranks[0], "llmctl_cost_dollars") == pytest.approx(5.5)
    assert ranks[0].snapshot()["elapsed_seconds"] == pytest.approx(1800 + 3600 + 1200)
    assert value(ranks[0], "llmctl_gpu_seconds") == pytest.approx(1800 + 3600 + 1200)  # the same clock
    assert value(ranks[1], "llmctl_gpu_seconds_estimated") == pytest.approx(p.estimate.total_hours * 3600 * 2)
    assert value(ranks[1], "llmctl_gpu_seconds_estimated") / 3600 * 3.0 == pytest.approx(p.estimate.total_dollars)


def test_attempts_and_time_lost_to_restarts_come_from_the_ledger_and_stay_put():
    """The spend ledger's view when the worker starts (trainer/spend.py): 3 attempts, 20 minutes lost."""
    clock = Clock()
    m = RunMetrics(small_plan(), "pretrain", rank=1, local_rank=1, world_size=2, device_name=None, clock=clock,
                   attempts=3, lost_seconds=1200.0)
    assert value(m, "llmctl_attempts") == 3 and value(m, "llmctl_lost_seconds") == 1200.0
    m.on_step(1, 4096, 0.5, 0.0, 3.0)
    clock.t += 600
    assert value(m, "llmctl_attempts") == 3 and value(m, "llmctl_lost_seconds") == 1200.0
    first = RunMetrics(small_plan(), "pretrain", rank=0, local_rank=0, world_size=2, device_name=None)
    assert value(first, "llmctl_attempts") == 1 and value(first, "llmctl_lost_seconds") == 0.0


def test_estimate_and_cap_come_from_the_plan():
    capped = small_plan(budget_cap=25.0)
    m = RunMetrics(capped, "pretrain", rank=0, local_rank=0, world_size=2, device_name=None)
    assert value(m, "llmctl_cost_estimated_dollars") == pytest.approx(capped.estimate.total_dollars)
    assert value(m, "llmctl_cost_cap_dollars") == 25.0 and m.snapshot()["cost_cap_dollars"] == 25.0
    uncapped = RunMetrics(small_plan(), "pretrain", rank=0, local_rank=0, world_size=2, device_name=None)
    assert value(uncapped, "llmctl_cost_cap_dollars") is None and "cost_cap_dollars" not in uncapped.snapshot()


def test_tokens_continue_after_a_resume_and_the_step_time_lands_in_the_histogram():
    m = RunMetrics(small_plan(), "pretrain", rank=1, local_rank=1, world_size=2, device_name=None,
                   prior_tokens=40_000)
    assert value(m, "llmctl_tokens_total") == 40_000
    m.on_step(5, 8_192, 0.3, 0.05, 3.5)
    m.on_step(6, 8_192, 0.2, 0.0, 3.4)
    assert value(m, "llmctl_tokens_total") == 40_000 + 2 * 8_192
    assert value(m, "llmctl_step") == 6
    assert value(m, "llmctl_step_seconds_count") == 2 and value(m, "llmctl_step_seconds_sum") == pytest.approx(0.5)
    assert value(m, "llmctl_step_seconds_bucket", le="0.25") == 1
    assert value(m, "llmctl_data_wait_seconds_total") == pytest.approx(0.05)


def test_eta_is_the_plan_before_the_first_step_then_steps_left_times_the_step_time():
    p = small_plan()  # 100 planned pretraining steps
    m = RunMetrics(p, "pretrain", rank=0, local_rank=0, world_size=2, device_name=None)
    assert value(m, "llmctl_steps_total_planned") == 100
    assert value(m, "llmctl_eta_seconds") == pytest.approx(p.stage("pretrain").hours * 3600)
    for step in range(1, 11):
        m.on_step(step, 1024, 2.0, 0.0, 3.0)
    assert value(m, "llmctl_eta_seconds") == pytest.approx(90 * 2.0)  # debiased average of equal steps
    assert m.snapshot()["progress"] == pytest.approx(0.10)


def test_snapshot_holds_the_numbers_the_exporter_serves():
    m = RunMetrics(small_plan(budget_cap=9.0), "pretrain", rank=0, local_rank=0, world_size=2,
                   device_name="NVIDIA H100 80GB HBM3", clock=Clock())
    first = m.snapshot()
    assert "train_loss" not in first and "val_bpb" not in first  # nothing made up before the events
    m.on_step(1, 4096, 0.5, 0.1, 3.25)
    m.on_val(1.75)
    m.on_checkpoint(2.5)
    m.on_core(0.12, {"copa": 0.3, "piqa": 0.2})
    snap = m.snapshot()
    assert all(isinstance(v, float) for v in snap.values())
    pairs = {"step": "llmctl_step", "steps_planned": "llmctl_steps_total_planned",
             "tokens_total": "llmctl_tokens_total", "tokens_per_second": "llmctl_tokens_per_second",
             "mfu": "llmctl_mfu_ratio", "train_loss": "llmctl_train_loss", "val_bpb": "llmctl_val_bpb",
             "data_wait_seconds_total": "llmctl_data_wait_seconds_total",
             "checkpoint_seconds": "llmctl_checkpoint_seconds", "cost_dollars": "llmctl_cost_dollars",
             "cost_estimated_dollars": "llmctl_cost_estimated_dollars", "cost_cap_dollars": "llmctl_cost_cap_dollars",
             "eta_seconds": "llmctl_eta_seconds", "core_score": "llmctl_core_score"}
    for key, name in pairs.items():
        assert snap[key] == pytest.approx(value(m, name)), key


# ---------------------------------------------------------------------------------------------
# The contract and its labels


def test_exporter_serves_exactly_the_contract_names():
    m = RunMetrics(small_plan(budget_cap=9.0), "sft", rank=0, local_rank=0, world_size=2, device_name=None)
    m.on_step(1, 4096, 0.5, 0.1, 3.25)
    m.on_val(1.7)
    m.on_checkpoint(1.0)
    m.on_core(0.1, dict.fromkeys(CORE_TASKS, 0.1))
    m.on_collective(1)  # the watchdog's pair (trainer/watchdog.py)
    m.on_hang_bound(300.0)
    served = {name for name, _ in series(m)}
    assert served == set(METRIC_NAMES)
    for name in DESIGN_NAMES:  # docs/observability.md, histogram by its parts
        assert name in served or f"{name}_bucket" in served, name


def test_label_cardinality_is_bounded():
    """Series count is a constant of the run's shape: 1,000 more steps, evals and saves add none."""
    m = RunMetrics(small_plan(budget_cap=9.0), "pretrain", rank=1, local_rank=1, world_size=2, device_name=None)

    def drive(start: int, n: int) -> None:
        for i in range(start, start + n):
            m.on_step(i, 1000 + i, 0.001 * (1 + i % 300), 0.0001 * i, 3.0 - i * 1e-4)
            if i % 10 == 0:
                m.on_val(1.0 + 1 / i)
                m.on_checkpoint(0.01 * i)
                m.on_core(0.1 + 1e-4 * i, {t: 1e-4 * i for t in CORE_TASKS})

    drive(1, 1000)
    before = series(m)
    drive(1001, 1000)
    after = series(m)
    assert len(after) == len(before) and sorted(map(str, after)) == sorted(map(str, before))
    allowed = set(LABELS) | set(INFO_LABELS) | {"task", "le"}
    assert all(set(labels) <= allowed for _, labels in after)
    assert {labels["task"] for _, labels in after if "task" in labels} == set(CORE_TASKS)
    assert len(after) < 100  # 26 names, 15 histogram buckets, 22 CORE tasks
    with pytest.raises(ValueError, match="unknown CORE task"):
        m.on_core(0.2, {"my_new_benchmark": 0.5})


@pytest.mark.parametrize("kwargs, field", [
    (dict(stage="rl"), "stage"),
    (dict(rank=2), "rank"),
    (dict(world_size=0), "world_size"),
    (dict(local_rank=-1), "local_rank"),
    (dict(prior_seconds=-1.0), "prior_seconds"),
    (dict(prior_tokens=-5), "prior_tokens"),
    (dict(attempts=0), "attempts"),
    (dict(lost_seconds=math.inf), "lost_seconds"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    args = dict(stage="pretrain", rank=0, local_rank=0, world_size=2, device_name=None)
    args.update(kwargs)
    stage = args.pop("stage")
    with pytest.raises(ValueError, match=f"^{field}:"):
        RunMetrics(small_plan(), stage, **args)


def test_bad_step_values_are_refused():
    m = RunMetrics(small_plan(), "pretrain", rank=0, local_rank=0, world_size=2, device_name=None)
    with pytest.raises(ValueError, match="step_seconds > 0"):
        m.on_step(1, 100, 0.0, 0.0, 3.0)
    m.on_step(1, 100, 0.1, 0.0, math.nan)  # a NaN loss is reported as it is: an alert watches for it
    assert math.isnan(value(m, "llmctl_train_loss"))


# ---------------------------------------------------------------------------------------------
# The HTTP server


def test_exporter_serves_over_http_and_close_stops_it():
    m = RunMetrics(small_plan(), "pretrain", rank=0, local_rank=0, world_size=2, device_name=None, port=0,
                   addr="127.0.0.1")
    m.on_step(1, 100, 0.1, 0.0, 3.0)
    with urllib.request.urlopen(m.url, timeout=5) as r:
        text = r.read().decode()
    assert 'llmctl_step{rank="0",run="obs-test",stage="pretrain"} 1.0' in text
    m.close()
    m.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(m.url, timeout=5)


def test_a_taken_port_leaves_training_running_without_an_exporter(capfd):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        m = RunMetrics(small_plan(), "pretrain", rank=0, local_rank=0, world_size=2, device_name=None,
                       port=port, addr="127.0.0.1")
    assert m.port is None and m.url is None
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in capfd.readouterr().err
    m.on_step(1, 100, 0.1, 0.0, 3.0)  # training goes on
    assert m.snapshot()["step"] == 1.0
    m.close()


def test_port_base_and_module_import_stay_light():
    assert METRICS_PORT_BASE == 9400
    code = "import sys, trainer.metrics; assert 'torch' not in sys.modules, 'torch imported'; " \
           "assert 'prometheus_client' not in sys.modules, 'prometheus_client imported at import time'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# End to end: a real loop, real exporters, a real Prometheus, every dashboard and alert query


class TinyRun:
    """A small real training loop standing in for trainer/loop.py: `world` ranks in threads, each training
    its own tiny torch model (an embedding and a linear head, AdamW) and reporting into its own RunMetrics
    exactly as the loop does (per-step on_step, on_val every 5 steps, a checkpoint into memory every 10,
    CORE once). It runs until `stop()`; a short interruptible wait stands in for the data source's latency
    (what data_wait measures), so two ranks do not saturate the machine's two cores."""

    VOCAB, BATCH, SEQ = 64, 8, 32

    def __init__(self, p, world: int = 2) -> None:
        self.plan = p
        self.metrics = [RunMetrics(p, "pretrain", rank=r, local_rank=r, world_size=world, device_name=None,
                                   port=0, addr="127.0.0.1") for r in range(world)]
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self.steps = [0] * world
        self._threads = [threading.Thread(target=self._guarded, args=(r,), daemon=True) for r in range(world)]

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{m.port}" for m in self.metrics]

    def start(self) -> TinyRun:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        for m in self.metrics:
            m.close()

    def _guarded(self, rank: int) -> None:
        try:
            self._train(rank)
        except BaseException as e:  # surfaced by stop()
            self._errors.append(e)

    def _train(self, rank: int) -> None:
        import torch
        import torch.nn.functional as F

        torch.manual_seed(rank)
        model = torch.nn.Sequential(torch.nn.Embedding(self.VOCAB, 32), torch.nn.Linear(32, self.VOCAB))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        from trainer.watchdog import Watchdog

        m = self.metrics[rank]
        wd = Watchdog(rank=rank, world=len(self.metrics), hang_url="memory://hangs", metrics=m,
                      on_hang=lambda verdict: None)  # the loop's watchdog, for its gauges
        gen = torch.Generator().manual_seed(rank)
        step = 0
        while not self._stop.is_set():
            wd.begin(step)
            t0 = time.perf_counter()
            self._stop.wait(0.02)  # the data source's latency
            x = torch.randint(0, self.VOCAB, (self.BATCH, self.SEQ), generator=gen)
            y = (x * 7 + 3) % self.VOCAB  # a learnable mapping
            data_wait = time.perf_counter() - t0
            wd.arrive(step)
            loss = F.cross_entropy(model(x).view(-1, self.VOCAB), y.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            wd.end(step, time.perf_counter() - t0)
            step += 1
            m.on_step(step, x.numel(), time.perf_counter() - t0, data_wait, loss.item())
            self.steps[rank] = step
            if step % 5 == 0:
                m.on_val(loss.item() / math.log(2))  # bits per token stands in for bits per byte here
            if step % 10 == 0:
                t1 = time.perf_counter()
                torch.save(model.state_dict(), io.BytesIO())
                m.on_checkpoint(time.perf_counter() - t1)
            if step == 3:
                m.on_core(0.05, {t: 0.05 for t in CORE_TASKS})
        wd.close()


def _without_data(prom: promlib.Prometheus, queries: list[tuple[str, str]], ranks: int,
                  at: float | None = None) -> dict[str, str]:
    """where -> why, for every query that errors or returns no data (now, or at unix time `at`); a query by
    rank must see every rank."""
    bad = {}
    for where, expr in queries:
        try:
            got = len(prom.query(expr, at))
        except promlib.PrometheusError as e:
            bad[where] = str(e)
            continue
        want = ranks if "rank)" in expr else 1
        if got < want:
            bad[where] = f"{got} series, expected {want}: {expr}"
    return bad


@pytest.fixture
def prometheus_tools():
    from tests.tools import ensure_prometheus

    ensure_prometheus()


def test_real_prometheus_scrapes_a_run_and_every_dashboard_and_alert_query_returns_data(tmp_path, prometheus_tools):
    p = small_plan(num_iterations=100_000, budget_cap=50.0, name="obs-e2e")  # never finishes by itself
    run = TinyRun(p).start()
    try:
        with promlib.Prometheus(tmp_path / "prom", run.targets, rule_files=[ALERTS]) as prom:
            queries = promlib.dashboard_queries(DASHBOARDS, run=p.name, rate_interval="5s")
            queries += promlib.alert_queries(ALERTS)
            # serving: tests/serve/test_metrics.py; Ray's own metrics (cluster alerts): promtool cases only
            queries = [q for q in queries if "llmctl_serve_" not in q[1] and "ray_resources" not in q[1]]
            # NVIDIA's DCGM exporter runs on GPU nodes only: its panels must parse and run here, with no series
            dcgm = [q for q in queries if "DCGM_" in q[1]]
            assert dcgm and all(prom.query(q[1]) == [] for q in dcgm)
            queries = [q for q in queries if "DCGM_" not in q[1]]
            assert len(queries) > 40
            # rate() over 5s needs a few scrapes of every target: wait for 4 in the window, then for data.
            prom.wait_until(lambda: [float(r["value"][1]) >= 4 for r in prom.query('count_over_time(up[5s])')]
                            == [True] * len(run.targets), "4 scrapes of every exporter", 60)
            try:
                prom.wait_until(lambda: not _without_data(prom, queries, len(run.targets)),
                                "every query to return data", 60)
            except promlib.PrometheusError:
                bad = _without_data(prom, queries, len(run.targets))
                pytest.fail("queries without data:\n" + "\n".join(f"  {k}: {v}" for k, v in bad.items()))

            # The rules loaded into Prometheus evaluate without errors.
            prom.wait_until(lambda: all(r.get("lastEvaluation", "").startswith("2") and r["health"] == "ok"
                                        for r in prom.rules()), "every rule to be evaluated healthy", 30)
            assert {r["name"] for r in prom.rules()} >= {"LlmctlTrainingStalled", "LlmctlExporterDown"}

            # CPU ranks: MFU 0 with the reason on the info metric, never a made-up number.
            assert prom.query(f'llmctl_run_info{{run="{p.name}",mfu_reason="cpu"}}')
            assert all(float(r["value"][1]) == 0 for r in prom.query("llmctl_mfu_ratio"))

            # Stop training; the exporters stay up. Prometheus then holds the snapshot's numbers.
            run.stop()
            snaps = [m.snapshot() for m in run.metrics]
            total = sum(s["tokens_total"] for s in snaps)
            prom.wait_until(lambda: [float(r["value"][1]) for r in prom.query(
                f'sum(llmctl_tokens_total{{run="{p.name}"}})')] == [total], "the final token count", 30)

            # Real firing inputs, end to end: a NaN loss on rank 0, then rank 1's exporter going away.
            nan_alert, down_alert = (expr for name, expr in promlib.alert_rules(ALERTS)
                                     if name in ("LlmctlLossNotFinite", "LlmctlExporterDown"))
            run.metrics[0].on_step(run.steps[0] + 1, 256, 0.05, 0.0, math.nan)
            hit = prom.wait_until(lambda: prom.query(nan_alert), "the NaN-loss alert expression to match", 30)
            assert [r["metric"]["rank"] for r in hit] == ["0"]
            gone = run.targets[1]
            run.metrics[1].close()
            hit = prom.wait_until(lambda: prom.query(down_alert), "the exporter-down alert expression", 30)
            assert [r["metric"]["instance"] for r in hit] == [gone]
    finally:
        run.stop()
        run.close()


def _free_port_pair() -> int:
    """A base port with base and base + 1 free on loopback (the loop binds base + local rank)."""
    for _ in range(20):
        base = promlib.free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
                return base
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.slow
def test_the_real_training_loop_answers_every_dashboard_and_alert_query(tmp_path, prometheus_tools, tiny_inputs):
    """The same check with trainer/loop.py's own exporters: a 2-worker CPU pretraining run on a local Ray
    cluster (trainer.launch.run), scraped by a real Prometheus. The stage ends before the queries run, so
    they are evaluated at the last moments when both ranks were still being scraped. The CORE pair comes
    from the eval stage, which this run leaves out; the in-test loop above covers it."""
    import ray

    from tests.finished_run import tiny_plan
    from trainer.launch import run as launch

    # The tests' tiny model (tests/finished_run.py) on the session's inputs, pretraining only, 80 steps.
    p = tiny_plan(tiny_inputs, "obs-real", num_iterations=80, checkpoint_every=20, stages=("pretrain",),
                  budget_cap=50.0)
    # An earlier attempt of this run was killed after 2 minutes without keeping any work (its row still says
    # running): the workers export 2 attempts and those 120 s as lost (trainer/spend.py).
    from trainer.storage import write_json

    write_json(f"{p.urls['run']}/spend.json", {"schema": 1, "run": p.name, "price_per_gpu_hour": 0.0, "attempts": [
        {"start": "2026-11-30T10:00:00Z", "last": "2026-11-30T10:02:00Z", "gpus": 2, "seconds": 120.0,
         "state": "running"}]})
    base = _free_port_pair()
    targets = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    with promlib.Prometheus(tmp_path / "prom", targets, rule_files=[ALERTS]) as prom:
        start = time.time()
        try:
            summary = launch(p, storage_options={}, metrics_port_base=base, log_every=20)
        finally:
            ray.shutdown()
        assert summary["status"] == "completed"
        # Moments when both ranks' exporters were scraped, latest first.
        live = prom.query_range(f'count(llmctl_run_info{{run="{p.name}"}})', start, time.time())
        moments = [float(t) for t, v in (live[0]["values"] if live else []) if float(v) == 2][::-1][:8]
        assert moments, "Prometheus never saw both ranks' exporters"
        queries = [q for q in promlib.dashboard_queries(DASHBOARDS, run=p.name, rate_interval="5s")
                   + promlib.alert_queries(ALERTS) if "llmctl_core_" not in q[1] and "llmctl_serve_" not in q[1]
                   and "ray_resources" not in q[1]]
        bad = None
        for at in moments:
            missing = _without_data(prom, queries, 2, at)
            bad = missing if bad is None else {k: v for k, v in bad.items() if k in missing}
        assert not bad, "queries without data at every live moment:\n" + "\n".join(f"  {k}: {v}" for k, v in bad.items())
        ledger = {name: prom.query(f'max by (rank) ({name}{{run="{p.name}"}})', at=moments[0])
                  for name in ("llmctl_attempts", "llmctl_lost_seconds")}
        assert {r["metric"]["rank"]: float(r["value"][1]) for r in ledger["llmctl_attempts"]} == {"0": 2.0, "1": 2.0}
        assert {r["metric"]["rank"]: float(r["value"][1]) for r in ledger["llmctl_lost_seconds"]} == \
            {"0": 120.0, "1": 120.0}

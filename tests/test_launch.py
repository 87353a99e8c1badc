"""trainer/launch.py + loop.py on a real local Ray cluster (2 CPU workers, gloo): the run path end to end.

- pretrain, SFT and the eval stage complete; plan.json, checkpoints, summaries and the report card land in
  storage; val bpb falls (checked on the session's shared `finished_run`, tests/finished_run.py);
- a worker SIGKILLed between checkpoints: Ray restarts the group, the run resumes from the last checkpoint
  and the data after the resume is exactly what an uninterrupted run saw (per-step fingerprints); the restart
  shows on the driver's console, in the report, in `llmctl status` and in the attempts/lost-seconds metrics;
- a worker killed during a checkpoint save: the previous checkpoint stays the latest and the run finishes.

Fault tests upload checkpoints synchronously so which checkpoint is "the last" does not depend on timing.
The fault tests run by default (CI proves resume on every change); the S3 variant is marked slow.
Run: .venv/bin/pytest tests/test_launch.py   (slow ones: -m slow)
"""

import json
import os
import signal
from collections import defaultdict

import pytest

from tests.finished_run import tiny_plan



@pytest.fixture(scope="module")
def inputs(tiny_inputs):
    """Corpus, conversations, tokenizer and CORE bundle, built once per session and shared by every run."""
    return tiny_inputs


def read_trace(path):
    """{(step, rank): [fingerprints in the order they were trained]} — repeats show re-executed steps."""
    seen = defaultdict(list)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            seen[(r["step"], r["rank"])].append(r["fp"])
    return seen


def test_pretrain_then_sft_end_to_end(ray_cluster, finished_run):
    from trainer.launch import run, summarize

    p = finished_run  # the session's run of the tiny plan through launch.run (tests/finished_run.py)
    run_dir = p.urls["run"][len("file://"):]
    summary = json.load(open(f"{run_dir}/summary.json"))
    assert summary["status"] == "completed" and set(summary["stages"]) == {"pretrain", "sft", "eval"}
    assert json.load(open(f"{run_dir}/plan.json"))["name"] == p.name
    stages = {name: json.load(open(f"{run_dir}/{name}/summary.json")) for name in ("pretrain", "sft", "eval")}
    assert summarize(p, stages) == summary and summary["tokens"] > 0  # the run's totals are its stages' sums
    pre = summary["stages"]["pretrain"]
    assert pre["steps"] == 30 and pre["tokens"] == 30 * 512
    history = [bpb for _, bpb in pre["val_history"]]
    assert history[-1] < history[0] - 0.3, f"val bpb did not fall: {history}"
    ckpts = sorted(os.listdir(f"{run_dir}/pretrain"))
    assert "pretrain_step000030" in ckpts and "pretrain_step000004" not in ckpts  # keep last 3
    assert sorted(os.listdir(f"{run_dir}/pretrain/pretrain_step000030")) == [
        "loader_rank0.json", "loader_rank1.json", "meta.json", "model.pt", "optim_rank0.pt", "optim_rank1.pt"]
    sft = summary["stages"]["sft"]
    assert sft["status"] == "completed" and sft["steps"] >= 1
    assert any(d.startswith("sft_step") for d in os.listdir(f"{run_dir}/sft"))
    evaluated = summary["stages"]["eval"]
    assert evaluated["status"] == "completed" and evaluated["core"] is not None
    report = open(f"{run_dir}/report.md").read()
    assert "smoke" in report.lower() and "bpb" in report.lower()
    # Running the finished plan again resumes nothing and trains nothing.
    again = run(p, storage_options={})
    assert again["stages"] == summary["stages"]


@pytest.fixture(scope="module")
def baseline(finished_run):
    """The uninterrupted pretraining the fault tests compare against: the session's finished run (the same tiny
    plan; tests/finished_run.py) and its data trace. Its SFT steps follow pretraining's in the trace, so each
    (step, rank)'s first fingerprint is pretraining's, the one `_assert_exact_resume` reads."""
    from tests.finished_run import finished_trace

    run_dir = finished_run.urls["run"][len("file://"):]
    return json.load(open(f"{run_dir}/summary.json")), read_trace(finished_trace(finished_run))


def _assert_exact_resume(trace, base, resumed_from):
    for key, fps in base.items():
        assert trace[key][-1] == fps[0], f"step {key[0]} rank {key[1]} trained on different data after resume"
    repeated = sorted({step for (step, _), fps in trace.items() if len(fps) > 1})
    assert repeated and repeated[0] == resumed_from, f"re-executed steps {repeated}, expected from {resumed_from}"


def test_worker_killed_between_checkpoints_resumes_exactly_and_the_restart_shows(ray_cluster, baseline, inputs,
                                                                                 tmp_path, capsys):
    """Rank 1 SIGKILLed at step 7 (checkpoints every 4 steps): Ray Train restarts the worker group from step 4 and
    the run ends as an uninterrupted one would. The restart is seen everywhere a person looks: one console line on
    the driver (the local run's stage bars), `<run>/restarts.json`, the report card, `llmctl status` and the
    workers' llmctl_attempts / llmctl_lost_seconds (the stage summary carries the exporter's values)."""
    import io
    from argparse import Namespace

    from rich.console import Console

    from cli.runview import cmd_status_local, local_summary
    from trainer.launch import run
    from trainer.progress import StageBars
    from trainer.restarts import read_restarts

    base_summary, base_trace = baseline
    trace = str(tmp_path / "trace.jsonl")
    progress = str(tmp_path / "progress.jsonl")
    open(progress, "w").close()
    chaos = {"kill_at_step": 7, "rank": 1, "marker": str(tmp_path / "killed")}
    p = tiny_plan(inputs, "killed", stages=("pretrain",))
    console = io.StringIO()
    with StageBars(progress, [("pretrain", 30)], priced=False, console=Console(file=console, width=250)):
        summary = run(p, storage_options={}, checkpoint_upload="sync", trace=trace, chaos=chaos,
                      progress_file=progress, quiet=True)
    assert os.path.exists(chaos["marker"]), "the fault was not injected"
    assert summary["status"] == "completed"
    _assert_exact_resume(read_trace(trace), base_trace, resumed_from=4)  # last checkpoint before step 7
    a, b = summary["stages"]["pretrain"], base_summary["stages"]["pretrain"]
    assert a["train_loss_ema"] == pytest.approx(b["train_loss_ema"], rel=1e-4)
    assert a["val_bpb"] == pytest.approx(b["val_bpb"], rel=1e-4)

    # The record: one restart of the worker group, rank 1 lost at step 7, resumed from 4, 3 steps redone.
    (event,) = read_restarts(p.urls["run"])
    assert (event["stage"], event["rank"], event["cause"], event["reached"], event["resumed_from"],
            event["lost_steps"], event["kind"]) == ("pretrain", 1, "died", 7, 4, 3, "worker group")
    assert event["lost_seconds"] > 0 and event["restart_seconds"] > 0
    # (1) the driver's console: one line, the bars untouched.
    lines = [line for line in console.getvalue().splitlines() if "restart" in line]
    assert len(lines) == 1, console.getvalue()
    assert ("[pretrain] worker group restart 1: rank 1 died at step 7; resumed from the step-4 checkpoint: "
            "3 steps lost") in lines[0]
    # (2) the report card: two attempts, one restart, and the restart itself.
    run_dir = p.urls["run"][len("file://"):]
    report = open(f"{run_dir}/report.md").read()
    assert "2 attempt(s) (1 restart(s)" in report, report
    assert "rank 1 died at step 7; resumed from the step-4 checkpoint: 3 steps lost" in report
    card = json.load(open(f"{run_dir}/report.json"))
    assert card["spend"]["attempts"] == 2 and card["spend"]["restarts"] == 1
    assert [(r["rank"], r["resumed_from"], r["lost_steps"]) for r in card["restarts"]] == [(1, 4, 3)]
    # (3) llmctl status --local.
    s = local_summary(p.urls["run"], None)
    assert s["attempts"] == 2 and [r["rank"] for r in s["restarts"]] == [1]
    capsys.readouterr()
    assert cmd_status_local(Namespace(run=p.urls["run"], storage=None, output="table")) == 0
    out = capsys.readouterr().out
    assert "2 attempt(s) (1 restart(s))" in out and "rank 1 died at step 7" in out, out
    # (4) the workers' exporters after the restart: 2 attempts, the restart's seconds counted as lost.
    assert a["attempts"] == 2 and b["attempts"] == 1 and b["lost_seconds"] == 0
    assert a["lost_seconds"] == pytest.approx(event["lost_seconds"] + event["restart_seconds"], abs=1e-6)


def test_crash_during_checkpoint_save_keeps_the_previous_one(ray_cluster, baseline, inputs, tmp_path):
    from trainer.launch import run

    _, base_trace = baseline
    trace = str(tmp_path / "trace.jsonl")
    chaos = {"kill_at_step": 8, "rank": 1, "marker": str(tmp_path / "killed"), "during_save": True}
    summary = run(tiny_plan(inputs, "torn-save", stages=("pretrain",)), storage_options={},
                  checkpoint_upload="sync", trace=trace, chaos=chaos)
    assert os.path.exists(chaos["marker"]) and summary["status"] == "completed"
    _assert_exact_resume(read_trace(trace), base_trace, resumed_from=4)  # step 8's save never became whole


@pytest.mark.slow
def test_pretrain_then_sft_end_to_end_on_s3(ray_cluster, inputs, s3_server):
    """The same run with the storage root on S3 (moto on loopback): inputs read, plan, checkpoints (through
    Ray's storage_filesystem) and summaries written, all in the bucket; workers reach the endpoint through
    the storage options `run` passes them."""
    from trainer.launch import run

    fs = s3_server.fs()
    root = s3_server.bucket("e2e")
    local = inputs[len("file://"):]
    for sub in ("data", "tokenizers", "eval_bundle"):  # the module's inputs, uploaded as they are
        fs.put(f"{local}/{sub}", f"{root[len('s3://'):]}/{sub}", recursive=True)
    p = tiny_plan(root, "e2e-s3")
    summary = run(p, storage_options=s3_server.storage_options, log_every=4)
    assert summary["status"] == "completed" and set(summary["stages"]) == {"pretrain", "sft", "eval"}
    run_dir = p.urls["run"][len("s3://"):]
    fs.invalidate_cache()
    assert json.loads(fs.cat_file(f"{run_dir}/plan.json"))["name"] == "e2e-s3"
    assert json.loads(fs.cat_file(f"{run_dir}/summary.json"))["tokens"] == summary["tokens"] > 0
    pre = summary["stages"]["pretrain"]
    assert pre["steps"] == 30 and pre["val_history"][-1][1] < pre["val_history"][0][1] - 0.3
    ckpt = f"{run_dir}/pretrain/pretrain_step000030"
    assert sorted(f.rsplit("/", 1)[1] for f in fs.ls(ckpt, detail=False)) == [
        "loader_rank0.json", "loader_rank1.json", "meta.json", "model.pt", "optim_rank0.pt", "optim_rank1.pt"]
    assert any(d.rsplit("/", 1)[1].startswith("sft_step") for d in fs.ls(f"{run_dir}/sft", detail=False))
    assert summary["stages"]["eval"]["core"] is not None and fs.exists(f"{run_dir}/report.md")


def test_budget_cap_stops_cleanly_with_a_checkpoint(ray_cluster, inputs):
    from trainer import checkpoint
    from trainer.launch import run

    # $720,000 per GPU-hour on 2 workers = $400/s of wall time: a $50 cap is reached within the first steps.
    p = tiny_plan(inputs, "capped", price_per_gpu_hour=720_000.0, budget_cap=50.0)
    summary = run(p, storage_options={})
    pre = summary["stages"]["pretrain"]
    assert summary["status"] == "stopped" and pre["status"] == "budget_cap_reached"
    assert 0 < pre["steps"] < 30 and "sft" not in summary["stages"]
    latest = checkpoint.latest(f"{p.urls['run']}/pretrain")
    assert latest and latest.endswith(checkpoint.dir_name("pretrain", pre["steps"]))


def test_non_finite_loss_stops_the_run_with_a_clear_error(ray_cluster, inputs, tmp_path):
    from trainer.launch import LaunchError, run

    p = tiny_plan(inputs, "diverged", stages=("pretrain",))
    with pytest.raises(LaunchError, match=r"stage pretrain stopped at step 5: the loss became NaN/inf"):
        run(p, storage_options={}, chaos={"nan_at_step": 5, "marker": str(tmp_path / "unused")})


def _my_train_workers() -> list[int]:
    """PIDs of this test process's Ray Train worker actors (descendants of this pytest, by Ray's title)."""
    parent, title = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                title[int(d)] = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0", 1)[0].decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue

    def mine(pid):
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [p for p, t in title.items() if t.startswith("ray::RayTrainWorker") and mine(p)]


def test_sigterm_preempt_checkpoints_the_current_step_and_redoes_nothing(ray_cluster, inputs, tmp_path):
    """A preemption notice: SIGTERM to the run's worker processes mid-run (what the pods' preStop hook does).
    Every rank finishes its step, a checkpoint at that step is written, the attempt ends, and the resumed
    attempt starts there, redoing zero steps. (Without the handler, Ray's own exits the workers and the run
    redoes the steps since the last periodic checkpoint.)"""
    import threading

    from tests.prom import wait_until
    from trainer import checkpoint
    from trainer.launch import run

    trace = str(tmp_path / "trace.jsonl")
    open(trace, "w").close()
    signalled: list[int] = []

    def preempt_at_step_5():
        def reached():
            with open(trace) as f:
                lines = f.read().splitlines()[:-1]  # the last line may be half-written
            return any(json.loads(line)["step"] >= 5 for line in lines)
        wait_until(reached, "step 5 in the trace", 600)
        signalled.extend(_my_train_workers())
        for pid in signalled:
            os.kill(pid, signal.SIGTERM)

    sender = threading.Thread(target=preempt_at_step_5, daemon=True)
    sender.start()
    p = tiny_plan(inputs, "preempted", stages=("pretrain",), keep_checkpoints=30)
    summary = run(p, storage_options={}, checkpoint_upload="sync", trace=trace)
    sender.join(5)
    assert len(signalled) == 2, f"expected to SIGTERM 2 workers, found {signalled}"
    assert summary["status"] == "completed" and summary["stages"]["pretrain"]["steps"] == 30
    run_dir = p.urls["run"][len("file://"):]
    events = sorted(os.listdir(f"{run_dir}/pretrain/preemptions"))
    assert events and all(e.endswith(("_rank0.json", "_rank1.json")) for e in events), events
    event = json.load(open(f"{run_dir}/pretrain/preemptions/{events[0]}"))
    step = event["step"]
    assert event["reason"] == "SIGTERM" and 5 <= step < 30, event
    assert checkpoint.latest(f"{p.urls['run']}/pretrain", step=step), f"no whole checkpoint at step {step}"
    seen = read_trace(trace)
    assert set(seen) == {(s, r) for s in range(30) for r in (0, 1)}
    assert not [k for k, fps in seen.items() if len(fps) > 1], "the resumed run redid steps"

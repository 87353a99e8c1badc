"""trainer/tracking.py: `--track` against real trackers. MLflow: a real tracking server on loopback
(tests/tracking_server.py, `mlflow server` from PyPI), read back through `MlflowClient`; W&B: offline mode, its run
files read back with wandb's own record reader. The end-to-end check is the session's finished run
(tests/finished_run.py), which tracked to the session's server and to a closed loopback port: it trained to the
end with one warning, and everything it logged is read back here. The unit checks feed a `RunMetrics` (the one
place a worker's numbers are made) with a stream of steps through a `Tracker`, as rank 0 does.

Run: .venv/bin/pytest tests/test_tracking.py -v
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import pytest

from tests.finished_run import finished_console, tiny_plan
from trainer.metrics import RunMetrics, device_peak, mfu
from trainer.storage import write_bytes, write_json, write_text
from trainer.tracking import (MAX_PARAM_VALUE, TRACKING_FILE, Tracker, close_runs, open_runs, plan_params,
                              read_tracking)

H100 = "NVIDIA H100 80GB HBM3"  # a device name with a known peak, so MFU is a real number
STEPS, TOKENS, STEP_S, WORLD = 250, 4096, 0.5, 2  # 250 steps x 4 metrics: over MLflow's 1,000 per batch


def _mlflow(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _stream(p, refs, stage: str = "pretrain") -> list[float]:
    """Rank 0's stage: STEPS steps with a falling loss, a val pass every 50, through RunMetrics -> Tracker."""
    losses = [8.0 * math.exp(-i / 80) + 2.0 for i in range(STEPS)]
    with RunMetrics(p, stage, rank=0, local_rank=0, world_size=WORLD, device_name=H100,
                    tracker=Tracker(p.name, refs, stage)) as m:
        m.on_val(5.0)
        for step, loss in enumerate(losses, start=1):
            m.on_step(step, TOKENS, STEP_S, 0.01, loss)
            if step % 50 == 0:
                m.on_val(5.0 - step / 100)
    return losses


def _report_files(p) -> None:
    """What the driver finds at the end of a run: plan.json, a report and a curve (real bytes, small)."""
    url = p.urls["run"]
    write_text(f"{url}/plan.json", p.to_json())
    write_text(f"{url}/report.md", "# Run report\n")
    write_bytes(f"{url}/bpb.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))


# ---------------------------------------------------------------------------------------------
# Units: the plan as parameters, a metrics stream, resume, W&B offline


def test_tracking_params_are_the_flattened_plan_within_mlflows_limits(tmp_path):
    p = tiny_plan(f"file://{tmp_path}", "params")
    params = plan_params(p)
    assert params["spec.depth"] == "2" and params["arch.n_layer"] == "2" and params["name"] == "params"
    assert params["stages.0.name"] == "pretrain" and params["stages.0.steps"] == "30"
    assert all(len(v) <= MAX_PARAM_VALUE and len(k) <= 250 for k, v in params.items())
    long = tiny_plan(f"file://{tmp_path}/" + "x" * 600, "params")  # a storage root longer than a param value
    assert plan_params(long)["spec.storage_root"].endswith("…")
    assert len(plan_params(long)["spec.storage_root"]) == MAX_PARAM_VALUE


def test_tracking_to_a_real_mlflow_server(mlflow_server, tmp_path):
    """The driver opens a run (params in batches of 100), rank 0 streams 250 steps (metrics in batches of
    1,000), the driver uploads the files and ends it; a second attempt resumes the same run."""
    client = _mlflow(mlflow_server.ready().uri)
    p = tiny_plan(f"file://{tmp_path}", "unit-mlflow", price_per_gpu_hour=2.0, track=(f"mlflow={mlflow_server.uri}",))
    refs = open_runs(p, {})
    (ref,) = refs
    assert ref["link"] == f"{mlflow_server.uri}/#/experiments/{ref['experiment_id']}/runs/{ref['run_id']}"
    assert read_tracking(p.urls["run"]) == refs
    losses = _stream(p, refs)
    _report_files(p)
    close_runs(p, refs, {}, ok=True)

    run = client.get_run(ref["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-mlflow"
    assert run.data.params == plan_params(p) and len(run.data.params) > 100  # more than one params batch
    rid = ref["run_id"]
    assert _history(client, rid, "pretrain/loss") == list(enumerate(losses, start=1))
    tps = TOKENS / STEP_S * WORLD
    assert _history(client, rid, "pretrain/tokens_per_second") == [(s, tps) for s in range(1, STEPS + 1)]
    expected_mfu = mfu(p.flops_per_token, TOKENS / STEP_S, device_peak(H100)[0])
    assert [v for _, v in _history(client, rid, "pretrain/mfu")] == pytest.approx([expected_mfu] * STEPS)
    dollars = [v for _, v in _history(client, rid, "pretrain/dollars")]
    assert len(dollars) == STEPS and dollars == sorted(dollars) and dollars[0] >= 0
    assert _history(client, rid, "pretrain/val_bpb") == [(0, 5.0)] + [(s, 5.0 - s / 100) for s in range(50, 251, 50)]
    assert {a.path for a in client.list_artifacts(rid)} == {"plan.json", "report.md", "bpb.png"}
    plan_json = client.download_artifacts(rid, "plan.json", str(tmp_path / "dl"))
    assert json.loads(Path(plan_json).read_text()) == json.loads(p.to_json())

    again = open_runs(p, {})  # a retried RayJob: tracking.json names the run, so it goes on
    assert [r["run_id"] for r in again] == [rid] and client.get_run(rid).info.status == "RUNNING"
    close_runs(p, again, {}, ok=False)
    assert client.get_run(rid).info.status == "FAILED"


def _wandb_records(path: str):
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(path)
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        yield record


def test_tracking_to_wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode: every process's part of the run (the driver's start and end, the stage's rank 0) is
    an offline run directory with the same id under WANDB_DIR; read back with wandb's own record reader."""
    def process(name: str) -> None:  # each its own WANDB_DIR, as on a cluster's pods: offline run directories
        (tmp_path / name).mkdir()     # are named by the second they start in, so two in one second would share one
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / name))

    monkeypatch.setenv("WANDB_MODE", "offline")
    p = tiny_plan(f"file://{tmp_path}", "unit-wandb", track=("wandb=team/llm",))
    process("driver-start")
    (ref,) = refs = open_runs(p, {})
    assert ref["target"] == "team/llm" and "link" not in read_tracking(p.urls["run"])[0]  # offline: no page
    process("rank0")
    losses = _stream(p, refs)
    _report_files(p)
    process("driver-end")
    close_runs(p, refs, {}, ok=True)

    dirs = [d for name in ("driver-start", "rank0", "driver-end")
            for d in glob.glob(str(tmp_path / name / "wandb" / f"offline-run-*-{ref['run_id']}"))]
    assert len(dirs) == 3, dirs  # one run id, three processes' parts
    runs, config, history, exits = [], {}, [], []
    for d in dirs:
        for r in _wandb_records(f"{d}/run-{ref['run_id']}.wandb"):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                runs.append((r.run.project, r.run.entity, r.run.display_name))
                config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            elif kind == "exit":
                exits.append(r.exit.exit_code)
    assert set(runs) == {("llm", "team", "unit-wandb")} and exits == [0, 0, 0]
    assert config["spec.depth"] == "2" and config["stages.0.steps"] == "30"
    steps = [h for h in history if "pretrain/loss" in h]
    assert [(h["pretrain/step"], h["pretrain/loss"]) for h in steps] == list(enumerate(losses, start=1))
    assert [h["pretrain/val_bpb"] for h in history if "pretrain/val_bpb" in h][-1] == pytest.approx(2.5)
    assert {"plan.json", "report.md", "bpb.png"} <= set(os.listdir(f"{dirs[-1]}/files"))


def test_tracking_records_are_read_as_untrusted(tmp_path):
    url = f"file://{tmp_path}/runs/r"
    write_json(f"{url}/{TRACKING_FILE}", {"runs": [
        {"kind": "mlflow", "target": "http://m", "run_id": "1", "name": "a\x1b]0;pwned\x07b", "link": "javascript:x"},
        {"kind": "comet", "target": "x", "run_id": "2"}, {"kind": "wandb", "run_id": 3}, "nonsense",
        {"kind": "wandb", "target": "p", "run_id": "4", "link": "https://wandb.ai/t/p/runs/4", "extra": "dropped"}]})
    assert read_tracking(url) == [{"kind": "mlflow", "target": "http://m", "run_id": "1", "name": "ab"},
                                  {"kind": "wandb", "target": "p", "run_id": "4", "link": "https://wandb.ai/t/p/runs/4"}]
    write_text(f"{url}/{TRACKING_FILE}", " " * (65 * 1024))
    with pytest.raises(ValueError, match="over"):
        read_tracking(url)
    assert read_tracking(f"file://{tmp_path}/runs/none") == []


# ---------------------------------------------------------------------------------------------
# End to end: the session's finished run


def test_tracking_end_to_end_on_the_finished_run(finished_run, mlflow_server):
    """The finished run tracked to the server (everything read back) and to a closed port (one warning, not
    recorded, and the run completed)."""
    p, url = finished_run, finished_run.urls["run"]
    live, dead = (t.split("=", 1)[1] for t in p.spec.track)
    (ref,) = read_tracking(url)
    assert ref["target"] == live and ref["name"] == "finished" and ref["link"].startswith(f"{live}/#/experiments/")
    summary = json.loads(Path(url.removeprefix("file://"), "summary.json").read_text())
    assert summary["status"] == "completed"
    warnings = [line for line in Path(finished_console(p)).read_text().splitlines() if "llmctl tracking:" in line]
    assert len(warnings) == 1 and dead in warnings[0] and "training goes on" in warnings[0]

    client, rid = _mlflow(live), ref["run_id"]
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params["spec.depth"] == "2" and run.data.params["arch.n_embd"] == str(p.arch.n_embd)
    for key in ("loss", "tokens_per_second", "mfu", "dollars"):
        assert [s for s, _ in _history(client, rid, f"pretrain/{key}")] == list(range(1, 31)), key
        assert [s for s, _ in _history(client, rid, f"sft/{key}")] == list(range(1, 7)), key
    assert all(v > 0 for _, v in _history(client, rid, "pretrain/tokens_per_second"))
    val = _history(client, rid, "pretrain/val_bpb")
    assert [s for s, _ in val] == [0, 10, 20, 30] and val[-1][1] == summary["stages"]["pretrain"]["val_bpb"]
    assert [s for s, _ in _history(client, rid, "eval/val_bpb")] == [1, 2]  # base, then chat
    assert [s for s, _ in _history(client, rid, "eval/core")] == [1]
    assert {a.path for a in client.list_artifacts(rid)} == {"plan.json", "report.md", "report.html", "report.json",
                                                            "loss.png", "bpb.png"}


def test_tracking_shown_by_status(finished_run, capsys):
    from cli.main import main

    root = finished_run.urls["runs_root"].removesuffix("/runs")
    (ref,) = read_tracking(finished_run.urls["run"])
    assert main(["status", "finished", "--local", "--storage", root]) == 0
    out = capsys.readouterr().out
    assert f"tracking  mlflow run finished: {ref['link']}" in out
    assert main(["status", "finished", "--local", "--storage", root, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["tracking"] == [ref]

"""trainer/spend.py (the run's spend ledger) and trainer/progress.py's storage document: attempts accumulate
across a killed attempt (time up to its last heartbeat kept), an elastic attempt pays each segment at the
size it ran, readers refuse oversized or malformed files, and a real finished run leaves both documents in
its storage.

Run: .venv/bin/pytest tests/test_spend.py -v
"""

from __future__ import annotations

import json

import pytest

from trainer import spend
from trainer.progress import read_progress, write_progress
from trainer.storage import DocumentTooLarge, read_json


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def ledger(url: str, clock, gpus: int = 8, opts=None) -> spend.Ledger:
    return spend.Ledger(url, run="r", gpus=gpus, price_per_gpu_hour=2.0, storage_options=opts, clock=clock)


def test_a_killed_attempt_keeps_its_time_up_to_the_last_heartbeat_and_the_next_adds_to_it(tmp_path):
    url, clock = f"file://{tmp_path}/runs/r", Clock()
    first = ledger(url, clock).begin()
    clock.t += 5 * 3600
    first.heartbeat()
    clock.t += 50  # killed 50 s after its last heartbeat: those 50 s are not in the ledger
    second = ledger(url, clock).begin()
    assert second.earlier_seconds == 5 * 3600
    clock.t += 3600
    second.heartbeat()
    doc = spend.read_spend(url)
    assert [a["state"] for a in doc["attempts"]] == ["lost", "running"]
    assert doc["totals"]["gpu_seconds"] == 8 * 6 * 3600 and doc["totals"]["dollars"] == pytest.approx(96.0)
    assert doc["totals"]["restarts"] == 1 and doc["totals"]["lost_attempts"] == 1
    second.end("finished")
    assert spend.read_spend(url)["attempts"][-1]["state"] == "finished"
    assert spend.lost_seconds(spend.read_spend(url), kept_seconds=5.5 * 3600) == pytest.approx(0.5 * 3600)


def test_the_ledger_works_on_s3(s3_server):
    url, clock = f"{s3_server.bucket('spend')}/runs/r", Clock()
    with_opts = ledger(url, clock, gpus=16, opts=s3_server.storage_options).begin()
    clock.t += 100
    with_opts.end("failed")
    doc = spend.read_spend(url, s3_server.storage_options)
    assert doc["attempts"][0]["state"] == "failed" and doc["totals"]["gpu_seconds"] == 1600


def test_the_attempt_context_closes_failed_on_an_exception(tmp_path):
    url = f"file://{tmp_path}/runs/r"
    with pytest.raises(RuntimeError):
        with spend.attempt(url, run="r", gpus=2, price_per_gpu_hour=1.0):
            raise RuntimeError("stage failed")
    assert spend.read_spend(url)["attempts"][0]["state"] == "failed"


def test_readers_treat_stored_files_as_untrusted(tmp_path):
    url = f"file://{tmp_path}/runs/r"
    (tmp_path / "runs" / "r").mkdir(parents=True)
    good = {"start": "2026-01-01T00:00:00Z", "last": "2026-01-01T01:00:00Z", "gpus": 8, "seconds": 3600.0,
            "state": "finished"}
    (tmp_path / "runs/r/spend.json").write_text(json.dumps({
        "run": "r\x1b]0;owned\x07", "price_per_gpu_hour": 2.0, "totals": {"dollars": 0.01},  # stored totals ignored
        "attempts": [good, dict(good, gpus=-1), dict(good, seconds=float("nan")), dict(good, state="weird"),
                     dict(good, start="yesterday"), "not a row", dict(good, gpus=True)]}))
    doc = spend.read_spend(url)
    assert doc["attempts"] == [good] and doc["totals"]["dollars"] == pytest.approx(16.0)
    assert "\x1b" not in doc["run"] and "\x07" not in doc["run"]
    (tmp_path / "runs/r/spend.json").write_text("[" * (spend.MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(DocumentTooLarge):
        spend.read_spend(url)
    (tmp_path / "runs/r/spend.json").write_text("{not json")
    with pytest.raises(ValueError):
        spend.read_spend(url)
    with pytest.raises(ValueError, match="unknown key"):
        write_progress(url, {"step": 1, "bogus": 2})


def test_elastic_spend_prices_each_segment_at_the_size_it_ran(tmp_path):
    """An attempt that starts on 2 GPUs, shrinks to 1 after an hour and grows back to 2 half an hour later
    pays 2 x 1 h + 1 x 0.5 h + 2 x 0.5 h = 3.5 GPU-hours over its 2 hours, not 2 x 2 = 4 (the planned size
    throughout). The sizes come from the worker groups (`record_world`), folded in at heartbeats; a change
    from before the attempt began is not its own."""
    url, clock = f"file://{tmp_path}/runs/r", Clock()
    spend.record_world(url, 1, clock=lambda: clock.t - 10)  # an earlier attempt's last group: not this one's
    led = ledger(url, clock, gpus=2).begin()
    spend.record_world(url, 2, clock=lambda: clock.t + 5)  # this attempt's first group: the size it opened at
    led.heartbeat()
    assert "segments" not in spend.read_spend(url)["attempts"][-1]  # a row that kept its size has none
    clock.t += 3600
    spend.record_world(url, 1, clock=clock)  # a node lost: the group restarts on 1
    clock.t += 600
    led.heartbeat()  # folds the shrink in at the moment it happened, not at the heartbeat
    row = spend.read_spend(url)["attempts"][-1]
    assert row["gpus"] == 1 and row["segments"] == [[0.0, 2], [3600.0, 1]]
    assert spend.read_spend(url)["totals"]["gpu_seconds"] == 2 * 3600 + 600
    clock.t += 1200
    spend.record_world(url, 2, clock=clock)  # capacity back: the group grows at the next checkpoint
    clock.t += 1800
    led.end("finished")
    doc = spend.read_spend(url)
    assert doc["attempts"][-1]["segments"] == [[0.0, 2], [3600.0, 1], [5400.0, 2]]
    assert doc["totals"]["seconds"] == 7200 and doc["totals"]["gpu_seconds"] == 3.5 * 3600
    assert doc["totals"]["dollars"] == pytest.approx(3.5 * 2.0)
    row = doc["attempts"][-1]  # `llmctl cost --since`: the attempt's last 45 min, 15 of them at 1 GPU, 30 at 2
    assert spend.gpu_seconds(row, last=2700) == 900 + 2 * 1800 and spend.gpu_seconds(row, last=0) == 0
    # a fresh attempt on 1 GPU (resumed on fewer workers) starts its own row at its own size
    second = ledger(url, clock, gpus=1).begin()
    clock.t += 100
    second.end("finished")
    assert spend.read_spend(url)["totals"]["gpu_seconds"] == 3.5 * 3600 + 100


def test_segments_and_world_records_are_untrusted(tmp_path):
    url = f"file://{tmp_path}/runs/r"
    (tmp_path / "runs" / "r").mkdir(parents=True)
    good = {"start": "2026-01-01T00:00:00Z", "last": "2026-01-01T01:00:00Z", "gpus": 1, "seconds": 3600.0,
            "state": "finished", "segments": [[0, 4], [1800, 1]]}
    bad = [dict(good, segments=s) for s in ([], [[5, 4]], [[0, 4], [10, 2], [5, 1]], [[0, -1]], [[0, 4.5]],
                                            [[0, 4, 1]], "x", [[0, 4]] * (spend.MAX_SEGMENTS + 1))]
    (tmp_path / "runs/r/spend.json").write_text(json.dumps({"run": "r", "price_per_gpu_hour": 1.0,
                                                            "attempts": [good, *bad]}))
    doc = spend.read_spend(url)
    assert doc["attempts"] == [good] and doc["totals"]["gpu_seconds"] == 4 * 1800 + 1800
    (tmp_path / "runs/r/workers.json").write_text(json.dumps({"changes": [[1, 2], ["x", 3], [2, 0], [3, 2.5], 7]}))
    spend.record_world(url, 3, clock=lambda: 4.0)
    assert json.loads((tmp_path / "runs/r/workers.json").read_text()) == {"changes": [[1, 2], [4.0, 3]]}
    (tmp_path / "runs/r/workers.json").write_text("{not json")
    spend.record_world(url, 2, clock=lambda: 5.0)  # a broken file is started again, never fatal
    assert json.loads((tmp_path / "runs/r/workers.json").read_text()) == {"changes": [[5.0, 2]]}


def test_a_finished_run_leaves_its_progress_and_one_finished_attempt(finished_run):
    url = finished_run.urls["run"]
    doc = spend.read_spend(url)
    # One attempt trained it; a later `run` of the same finished plan (test_launch re-runs it) adds a finished
    # attempt that only skips the stages: every row is finished, the first paid for what the stages kept.
    rows = doc["attempts"]
    assert rows and all(r["state"] == "finished" and r["gpus"] == finished_run.spec.gpus for r in rows)
    summary = read_json(f"{url}/summary.json")
    assert rows[0]["seconds"] >= summary["hours"] * 3600  # the attempt paid at least the time the stages kept
    prog = read_progress(url)
    assert prog["stage"] == "sft" and prog["step"] == prog["steps"] and prog["kept_seconds"] > 0


# ---------------------------------------------------------------- hostile ledgers 


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00Z",
                                  "9999-12-31T23:59:59Z"])
def test_hostile_a_row_dated_year_1_or_9999_is_dropped_alone(tmp_path, capsys, when):
    url = f"file://{tmp_path}/runs/r"
    (tmp_path / "runs" / "r").mkdir(parents=True)
    good = {"start": "2026-01-01T00:00:00Z", "last": "2026-01-01T01:00:00Z", "gpus": 8, "seconds": 3600.0,
            "state": "finished"}
    (tmp_path / "runs/r/spend.json").write_text(json.dumps({
        "run": "r", "price_per_gpu_hour": 2.0, "attempts": [good, dict(good, start=when), dict(good, last=when)]}))
    doc = spend.read_spend(url)  # the ledger stays readable: the bad rows go, the good one stays
    assert doc["attempts"] == [good] and doc["totals"]["gpu_seconds"] == 8 * 3600
    assert doc["dropped"] == 2
    err = capsys.readouterr().err  # and it says so, once, on stderr (status, cost and report read it this way)
    assert err.count("\n") == 1 and "2 malformed row(s) dropped" in err and "spend.json" in err


LEDGER = """
import sys, time
from trainer import spend
url, gpus, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
clock = lambda: 1_800_000_000.0 + time.monotonic()
led = spend.Ledger(url, run="r", gpus=gpus, price_per_gpu_hour=1.0, clock=clock).begin()
for _ in range(n):
    led.heartbeat()
    spend.record_world(url, gpus, clock=clock)
led.end("finished")
"""

READ_LEDGER = """
import os, sys
from trainer import spend
url, stop = sys.argv[1], sys.argv[2]
seen = bad = 0
while not os.path.exists(stop):
    try:
        spend.read_spend(url)
        seen += 1
    except Exception as e:
        bad += 1
        print(type(e).__name__, e, file=sys.stderr)
print(seen, bad)
"""


def test_hostile_concurrent_attempts_keep_every_row(tmp_path):
    # Two launchers of one run at once (an attempt not yet dead while its retry begins) and their worker groups,
    # as real processes: every row and every world change survives, no reader sees a torn ledger, no writer
    # fails (the old writers shared `spend.json.tmp`: torn JSON, FileNotFoundError, rows overwritten).
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    url, stop = f"file://{tmp_path}/runs/r", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READ_LEDGER, url, str(stop)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs = [subprocess.Popen([sys.executable, "-c", LEDGER, url, str(g), "30"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for g in (1, 2, 3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    stop.write_text("")
    out, err = reader.communicate(timeout=60)
    assert all(p.returncode == 0 for p in procs) and not any(outs), outs  # record_world prints its failures
    seen, bad = map(int, out.split())
    assert bad == 0 and seen > 0, err[-2000:]
    doc = spend.read_spend(url)
    # three rows, one per launcher; each row's size is the last world change it folded in, and the three share
    # one workers.json, so which size a row ends at depends on the interleaving: only that it is one of them
    assert len(doc["attempts"]) == 3 and len({a["id"] for a in doc["attempts"]}) == 3
    assert all(a["gpus"] in (1, 2, 3) for a in doc["attempts"])
    assert all(a["state"] == "finished" for a in doc["attempts"])
    assert len(json.loads((tmp_path / "runs/r/workers.json").read_text())["changes"]) == 90

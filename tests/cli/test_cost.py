"""cli/cost.py: `llmctl cost` sums each run's spend ledger (trainer/spend.py) over a storage root, prorates
--since, refuses bad input with exit 2 and skips an unreadable run with a warning.

Run: .venv/bin/pytest tests/cli/test_cost.py -v
"""

from __future__ import annotations

import json

import pytest

from cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _ledger(root, name: str, rows: list[dict], price: float = 2.0, estimate: float | None = 100.0) -> None:
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "spend.json").write_text(json.dumps({"run": name, "price_per_gpu_hour": price, "attempts": rows}))
    if estimate is not None:
        (d / "plan.json").write_text(json.dumps({"estimate": {"total_dollars": estimate}}))


def row(start: str, last: str, seconds: float, gpus: int = 8, state: str = "finished") -> dict:
    return {"start": start, "last": last, "gpus": gpus, "seconds": seconds, "state": state}


@pytest.fixture
def root(tmp_path):
    _ledger(tmp_path, "a", [row("2026-11-01T00:00:00Z", "2026-11-01T05:00:00Z", 5 * 3600, state="lost"),
                            row("2026-11-02T00:00:00Z", "2026-11-02T01:00:00Z", 3600)])
    _ledger(tmp_path, "b", [row("2026-11-03T00:00:00Z", "2026-11-03T02:00:00Z", 7200, gpus=16, state="running")],
            price=3.0, estimate=None)
    (tmp_path / "runs" / "no-ledger").mkdir()  # an older run: nothing to count
    return tmp_path


def test_cost_sums_every_attempt_of_every_run(root, capsys):
    rc, out, err = run(capsys, "cost", "--storage", f"file://{root}", "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    a, b = doc["runs"]
    assert (a["run"], a["attempts"], a["restarts"], a["lost_attempts"]) == ("a", 2, 1, 1)
    assert a["dollars"] == pytest.approx(6 * 8 * 2.0) and a["estimate_dollars"] == 100.0
    assert b["dollars"] == pytest.approx(2 * 16 * 3.0) and b["running"] and b["estimate_dollars"] is None
    assert doc["total"]["dollars"] == pytest.approx(96.0 + 96.0) and doc["total"]["runs"] == 2
    rc, out, _ = run(capsys, "cost", "--storage", str(root))
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "ATTEMPTS", "RESTARTS", "GPU-H", "SPENT", "ESTIMATE", "LAST"]
    assert lines[-1].split()[:4] == ["total", "1", "80.00", "$192.00"]


def test_since_counts_only_the_time_after_it(root, capsys):
    rc, out, _ = run(capsys, "cost", "--storage", str(root), "--since", "2026-11-01T04:00:00Z", "-o", "json")
    a, b = json.loads(out)["runs"]
    assert a["gpu_hours"] == pytest.approx(8 * (1 + 1))  # the last hour of the lost attempt, then all of the next
    rc, out, _ = run(capsys, "cost", "--storage", str(root), "--since", "2026-11-03", "-o", "json")
    assert [r["run"] for r in json.loads(out)["runs"]] == ["b"]


def test_bad_since_is_one_line_and_exit_2(root, capsys):
    rc, out, err = run(capsys, "cost", "--storage", str(root), "--since", "last tuesday")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--since: expected a date" in err


def test_an_unreadable_ledger_is_skipped_with_a_warning(root, capsys):
    (root / "runs" / "a" / "spend.json").write_text("{broken")
    rc, out, err = run(capsys, "cost", "--storage", str(root), "-o", "json")
    assert rc == 0 and [r["run"] for r in json.loads(out)["runs"]] == ["b"] and "skipping a" in err


def test_an_empty_storage_says_so(tmp_path, capsys):
    rc, out, err = run(capsys, "cost", "--storage", str(tmp_path))
    assert rc == 0 and out == "" and "no spend recorded" in err


def test_a_finished_run_appears_with_its_one_attempt(finished_run, capsys):
    root = finished_run.urls["run"].rsplit("/runs/", 1)[0]
    rc, out, _ = run(capsys, "cost", "--storage", root, "-o", "json")
    (r,) = [r for r in json.loads(out)["runs"] if r["run"] == finished_run.name]
    assert r["attempts"] == 1 and r["restarts"] == 0 and not r["running"] and r["gpu_hours"] > 0


def test_status_local_reads_the_run_from_storage_without_a_cluster(tmp_path, capsys, monkeypatch):
    import datetime

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))  # no cluster: --local must not need one
    d = tmp_path / "runs" / "r"
    d.mkdir(parents=True)
    (d / "plan.json").write_text(json.dumps({"name": "r", "stages": [{"name": "pretrain"}],
                                             "spec": {"gpus": 2, "gpu_type": "cpu"},
                                             "estimate": {"total_dollars": 1.5, "total_hours": 0.1}}))
    (d / "progress.json").write_text(json.dumps({"stage": "pretrain", "step": 20, "steps": 40, "kept_seconds": 30}))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    (d / "spend.json").write_text(json.dumps({"price_per_gpu_hour": 3600.0, "attempts": [
        row("2026-11-01T00:00:00Z", "2026-11-01T00:00:40Z", 40, gpus=2, state="lost"),
        row(now, now, 20, gpus=2, state="running")]}))
    rc, out, err = run(capsys, "status", "r", "--local", "--storage", f"file://{tmp_path}", "-o", "json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["state"] == "running" and s["progress"]["step"] == 20 and s["spend"]["attempts"] == 2
    assert s["spent_dollars"] == pytest.approx(60 * 2) and s["lost_hours"] == pytest.approx(30 / 3600)
    rc, out, _ = run(capsys, "status", str(d), "--local")
    assert "pretrain step 20 / 40 (50%)" in out and "$120.00 over 2 attempt(s)" in out and "estimate $1.50" in out
    (d / "summary.json").write_text(json.dumps({"status": "completed", "hours": 50 / 3600}))
    rc, out, _ = run(capsys, "status", "r", "--local", "--storage", str(tmp_path), "-o", "json")
    assert json.loads(out)["state"] == "succeeded" and json.loads(out)["lost_hours"] == pytest.approx(10 / 3600)
    rc, _, err = run(capsys, "status", "nope", "--local", "--storage", str(tmp_path))
    assert rc == 2 and "no run at" in err


def test_hostile_run_directory_names_are_printed_without_escapes(tmp_path, capsys):
    """A run directory is named by whoever wrote the bucket: its name reaches the table, the JSON and the
    warning for an unreadable ledger without its escape sequences ."""
    evil = "r\x1b]0;pwned\x07\x1b[2J\u202e"
    _ledger(tmp_path, evil, [row("2026-11-01T00:00:00Z", "2026-11-01T01:00:00Z", 3600)])
    _ledger(tmp_path, evil + "x", [])
    (tmp_path / "runs" / (evil + "x") / "spend.json").write_text("{broken")
    rc, out, err = run(capsys, "cost", "--storage", str(tmp_path))
    assert rc == 0, err
    assert "\x1b" not in out + err and "\x07" not in out + err and "\u202e" not in out + err
    assert out.splitlines()[1].startswith("r ") and "skipping rx" in err
    rc, out, err = run(capsys, "cost", "--storage", str(tmp_path), "-o", "json")
    assert "\x1b" not in err and json.loads(out)["runs"][0]["run"] == "r"


def test_hostile_plan_that_is_not_an_object_is_a_warning(tmp_path, capsys):
    """cost reads a plan only for its estimate: a plan.json that is a list or a string is one warning line and
    no estimate, and the run's spend still counts ."""
    _ledger(tmp_path, "a", [row("2026-11-01T00:00:00Z", "2026-11-01T01:00:00Z", 3600)])
    for doc in ([{"estimate": {"total_dollars": 1}}], "x", {"estimate": [1]}):
        (tmp_path / "runs" / "a" / "plan.json").write_text(json.dumps(doc))
        rc, out, err = run(capsys, "cost", "--storage", str(tmp_path), "-o", "json")
        assert rc == 0 and json.loads(out)["runs"][0]["estimate_dollars"] is None and "Traceback" not in err
        assert err.count("\n") == 1 and "warning: a: plan.json" in err, err

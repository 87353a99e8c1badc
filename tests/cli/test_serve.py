"""cli/serve.py and the other commands that open a stored run (chat, report, status --local): a plan.json in
shared storage is untrusted, so a tampered one is one line on stderr and exit 2, never a traceback, and
nothing is started or written.

The run is tests/serve_app.py's `tiny_run` (a plan, a tokenizer, one pretrain and one sft checkpoint), its
plan.json then replaced. `serve --local` would start Ray: its `run_local` is replaced by a function that fails.

Run: .venv/bin/pytest tests/cli/test_serve.py -v
"""

from __future__ import annotations

import json

import pytest

from cli.main import main

ESC_NAME = "tiny\x1b]0;pwned\x07\x1b[2J"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    from tests.serve_app import tiny_run

    root = tmp_path_factory.mktemp("hostile-plans")
    p = tiny_run(root)
    path = root / "runs" / "tiny" / "plan.json"
    return root, path, json.loads(path.read_text())


def _cases(good: dict) -> dict:
    return {"stages [1]": dict(good, stages=[1]), "stages null": dict(good, stages=None),
            "no name": {k: v for k, v in good.items() if k != "name"}, "a list": [good], "a string": "tiny",
            "escapes in the name": dict(good, name=ESC_NAME), "a name that is no DNS-1035 label": dict(good, name="Bad_Name"),
            "a name that is a list": dict(good, name=["tiny"]), "a name of 64 characters": dict(good, name="a" * 64)}


CASES = ["stages [1]", "stages null", "no name", "a list", "a string", "escapes in the name",
         "a name that is no DNS-1035 label", "a name that is a list", "a name of 64 characters"]
COMMANDS = {"serve --local": ["serve", "tiny", "--local"],
            "serve --dry-run": ["serve", "tiny", "--dry-run"],
            "chat": ["chat", "tiny", "--prompt", "hi", "--device", "cpu"],
            "report": ["report", "tiny"],
            "status --local": ["status", "tiny", "--local"]}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", CASES)
def test_hostile_stored_plan_is_one_line_and_exit_2(stored, case, command, capsys, monkeypatch):
    import trainer.serve.app

    root, path, good = stored
    monkeypatch.setenv("KUBECONFIG", str(root / "absent"))  # --dry-run reads no cluster
    monkeypatch.setattr(trainer.serve.app, "run_local", lambda *a, **k: pytest.fail("serve --local started"))
    path.write_text(json.dumps(_cases(good)[case]))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    try:
        rc = main([*COMMANDS[command], "--storage", f"file://{root}"])
    finally:
        path.write_text(json.dumps(good))
    out, err = capsys.readouterr()
    if command == "report" and case in ("escapes in the name", "a name that is no DNS-1035 label",
                                        "a name of 64 characters"):
        # The report names no Kubernetes object: any name is text, escaped in report.html (tests/test_report.py)
        # and printed without its escapes.
        assert rc == 0 and "\x1b" not in out + err and "\x07" not in out + err, err
        for new in set(root.rglob("*")) - {root / p for p in before}:  # the report it wrote: the next case starts bare
            if new.is_file():
                new.unlink()
        return
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "plan.json" in err, err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written (no report, no lock)


def test_hostile_cluster_serve_uses_the_run_it_opened(stored, capsys, monkeypatch):
    """A plan whose stored `urls.run` points elsewhere (another team's run) and whose stages are plain names:
    the RayService is built from the URL opened and the checked stages, so here (local storage) it is one
    line, never a TypeError and never a RayService serving the stored URL."""
    root, path, good = stored
    monkeypatch.setenv("KUBECONFIG", str(root / "absent"))
    doc = dict(good, stages=["pretrain", "sft"], urls=dict(good["urls"], run="s3://other-team/runs/theirs"))
    path.write_text(json.dumps(doc))
    try:
        rc = main(["serve", "tiny", "--dry-run", "--storage", f"file://{root}"])
    finally:
        path.write_text(json.dumps(good))
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"file://{root}/runs/tiny is on this machine" in err and "other-team" not in err


def test_hostile_rayservice_run_is_built_from_the_checked_plan(stored):
    from cli.serve import service_run
    from trainer import run_loader

    root, path, good = stored
    doc = dict(good, stages=["pretrain", "sft"], urls=dict(good["urls"], run="s3://other-team/runs/theirs"),
               spec=dict(good["spec"], depth="2\nx: y"))
    path.write_text(json.dumps(doc))
    try:
        checked = run_loader.read_checked_plan(f"file://{root}/runs/tiny")
    finally:
        path.write_text(json.dumps(good))
    run = service_run(checked, "s3://ours/runs/tiny")
    assert run == {"name": "tiny", "urls": {"run": "s3://ours/runs/tiny"},
                   "stages": [{"name": "pretrain"}, {"name": "sft"}],
                   "spec": {"depth": 2, "seq_len": checked.arch.seq_len}}  # from the checked architecture
    assert isinstance(run["spec"]["seq_len"], int) and run["spec"]["seq_len"] > 0

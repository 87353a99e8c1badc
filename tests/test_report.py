"""trainer/report.py and `llmctl report`: the report card of a run made by the local pipeline, a run still
going, a real (non-smoke) CORE result, and a run on s3://.

Run: .venv/bin/pytest tests/test_report.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.report import gather, render, write_report

LLMCTL = str(Path(sys.executable).parent / "llmctl")


@pytest.fixture(scope="module")
def run(finished_run):
    return finished_run


def local(p):
    return Path(p.urls["run"][len("file://"):])


def test_the_report_card_of_a_finished_run(run):
    text = write_report(run.urls["run"])
    d = json.loads((local(run) / "report.json").read_text())
    assert (local(run) / "report.md").read_text() == text
    for heading in ("## Plan", "## Measured against the estimate", "## Loss and bits per byte", "## CORE",
                    "## Samples", "### Base model (pretrain step 30, greedy)", "### Chat model (sft step 6, greedy)"):
        assert heading in text
    # The plan and what happened, against the estimate.
    assert "2 layers, 128 wide" in text and f"{run.params.total:,} parameters" in text
    pre = json.loads((local(run) / "pretrain/summary.json").read_text())
    assert "| pretrain | completed | 30/30 | 15,360 |" in text and "| sft | completed |" in text
    assert d["stages"]["pretrain"]["measured"]["tokens"] == pre["tokens"] == 30 * 512
    assert d["stages"]["pretrain"]["planned"]["steps"] == 30 and "| eval | completed | 2" in text
    # Loss and bpb: the eval stage's figures, equal to the training stages' last val passes.
    base, chat = d["eval"]["models"]["base"], d["eval"]["models"]["chat"]
    assert f"| base | pretrain | {pre['train_loss_ema']:.4f} | {base['val_bpb']:.4f} |" in text
    assert "| chat | sft |" in text and f"{chat['val_bpb']:.4f} |" in text
    # CORE per task, labelled as a smoke test, with GPT-2's references beside it.
    assert "Smoke test" in text and "not a capability score" in text
    for task in ("smoke_lm", "smoke_mc", "smoke_schema"):
        assert f"| {task} |" in text
    assert f"**CORE {base['core']['core']:.4f}**" in text and "GPT-2 XL 1.5B 0.2565" in text
    # Samples from both models.
    assert "| The capital of France is |" in text and "**user:** What does the json module do?" in text
    assert len(chat["samples"]) == 3 and len(base["samples"]) == 7


def test_llmctl_report_prints_it(run, tmp_path):
    r = subprocess.run([LLMCTL, "report", run.urls["run"]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (local(run) / "report.md").read_text()
    root = run.urls["runs_root"][: -len("/runs")]
    j = subprocess.run([LLMCTL, "report", run.name, "--storage", root, "-o", "json"], capture_output=True,
                       text=True, timeout=120)
    assert j.returncode == 0 and json.loads(j.stdout)["run"] == run.name
    missing = subprocess.run([LLMCTL, "report", "nope", "--storage", f"file://{tmp_path}"], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr
    assert not any(tmp_path.iterdir()), "a failed report creates nothing"


def test_a_run_still_going_says_what_is_missing(run, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "plan.json").write_text(run.to_json())  # the plan with its eval stage
    shutil.copytree(local(run) / "pretrain", partial / "pretrain")
    text = write_report(str(partial))
    assert "Status **unfinished**" in text
    assert "| sft | not run |" in text and "| eval | not run |" in text
    assert "CORE not measured: the run has no eval stage results yet." in text
    assert "No samples: the eval stage has not run." in text
    assert "| base | pretrain |" in text  # training's own val bpb stands in until the eval stage has run


def test_a_real_bundle_is_not_labelled_a_smoke_test(run):
    d = gather(run.urls["run"])
    d["eval"]["models"]["base"]["core"]["smoke_test"] = False
    text = render(d)
    assert "Smoke test" not in text and "GPT-2 XL 1.5B 0.2565" in text


def test_a_skipped_core_is_explained(run):
    d = gather(run.urls["run"])
    d["eval"]["models"]["base"]["core"] = {"bundle": "s3://b/eval_bundle", "skipped": "core.yaml is missing"}
    assert "CORE not measured: core.yaml is missing" in render(d)


def test_report_on_s3(run, s3_server):
    bucket = s3_server.bucket("report")
    fs = s3_server.fs()
    fs.put(str(local(run)), f"{bucket[5:]}/runs/{run.name}", recursive=True)
    fs.rm(f"{bucket[5:]}/runs/{run.name}/report.md")
    fs.rm(f"{bucket[5:]}/runs/{run.name}/report.json")
    url = f"{bucket}/runs/{run.name}"
    r = subprocess.run([LLMCTL, "report", url], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint_url})
    assert r.returncode == 0, r.stderr
    assert "## CORE" in r.stdout and fs.exists(f"{bucket[5:]}/runs/{run.name}/report.md")

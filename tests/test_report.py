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
from tests.hostile import ESC, llmctl, no_controls, plan_doc, refused, store_plan

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
    last_loss = pre["loss_history"][-1][1]  # the debiased EMA at the last logged step
    assert f"| base | pretrain | {last_loss:.4f} | {base['val_bpb']:.4f} | {base['unigram_bpb']:.4f} |" in text
    assert 0 < base["unigram_bpb"] < 16 and 0 < chat["unigram_bpb"] < 16
    assert "| chat | sft |" in text and f"{chat['val_bpb']:.4f} |" in text
    # CORE per task, labelled as a smoke test, with GPT-2's references beside it.
    assert "Smoke test" in text and "not a capability score" in text
    for task in ("smoke_lm", "smoke_mc", "smoke_schema"):
        assert f"| {task} |" in text
    assert f"**CORE {base['core']['core']:.4f}**" in text and "GPT-2 XL 1.5B 0.2565" in text
    # Samples from both models, prompted in the sample corpus's domain, never with a raw special token.
    assert "| Return a new list |" in text and "**user:** What does json.dumps do?" in text
    assert len(chat["samples"]) == 3 and len(base["samples"]) == 7
    assert "<|" not in text and not any("<|" in s["reply"] for s in chat["samples"])
    assert not any("<|" in s["completion"] for s in base["samples"])
    # The curves, linked.
    assert "![Training loss (EMA) by step](loss.png)" in text and "(bpb.png)" in text


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


def test_lm_eval_results_show_on_the_report_card(run):
    """results.json's `lm_eval` (trainer/eval_stage.py, with --lm-eval) in report.md and the console card;
    a skipped pass says why; a run without one shows no section."""
    from trainer.report import card

    d = gather(run.urls["run"])
    assert "lm-eval" not in render(d) and "lm-eval" not in card(d)
    d["eval"]["lm_eval"] = {"run": "finished", "stage": "pretrain", "step": 30, "tasks": ["toy_mc"],
                            "results": {"toy_mc": {"acc": 0.625, "acc_norm": 0.5, "alias": "toy"}}, "seconds": 2.0}
    text = render(d)
    assert "## lm-eval-harness" in text and "| toy_mc | acc | 0.6250 |" in text
    assert "| toy_mc | acc_norm | 0.5000 |" in text
    assert "alias" not in text and "On the pretrain model (step 30)" in text
    assert "  lm-eval (pretrain step 30): toy_mc acc 0.6250, toy_mc acc_norm 0.5000" in card(d).splitlines()
    d["eval"]["lm_eval"] = {"tasks": ["hellaswag"], "skipped": "TaskError: hellaswag needs its data <downloaded>"}
    assert "lm-eval not measured: TaskError: hellaswag needs its data \\<downloaded\\>" in render(d)
    assert "lm-eval" not in card(d)


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


# ---------------------------------------------------------------- pictures: PNG curves and report.html


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature and the chunk's place."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR", "IHDR is not the first chunk"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_curves_are_valid_pngs_of_real_size(run):
    write_report(run.urls["run"])
    for name in ("loss.png", "bpb.png"):
        data = (local(run) / name).read_bytes()
        w, h = png_size(data)
        assert w >= 400 and h >= 200, (name, w, h)
        assert len(data) > 10_000, f"{name} is {len(data)} bytes: too small to hold a plotted curve"


def test_curves_cover_both_stages_and_the_baseline(run):
    from trainer.plots import _series

    d = gather(run.urls["run"])
    series = _series(d)
    assert set(series) == {"pretrain", "sft"} and series["sft"][0] == 30  # SFT continues after pretraining
    assert [p[0] for p in series["pretrain"][2]] == [0, 10, 20, 30]  # val bpb at each eval
    assert series["pretrain"][1][-1][0] == 30 and series["sft"][1]  # loss EMA logged in both stages


def test_report_html_is_self_contained(run):
    write_report(run.urls["run"])
    html = (local(run) / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 2
    for ref in ("http://", "https://", "<script", "<link", "@import", 'src="loss.png"'):
        assert ref not in html, ref
    assert "<table>" in html and "unigram bpb" in html


def test_report_html_renders_in_headless_chromium(run, tmp_path):
    from tests.tools import ensure_chromium

    chromium, _ = ensure_chromium()  # (browser, driver): this test drives the browser alone
    write_report(run.urls["run"])
    out = Path(__file__).parent / "artifacts"
    out.mkdir(exist_ok=True)
    shot = out / "report.png"
    shot.unlink(missing_ok=True)
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                        (local(run) / "report.html").resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    assert png_size(shot.read_bytes()) == (1200, 1600)
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) one colour: nothing rendered"


def test_report_open_opens_the_html(run, tmp_path):
    # $BROWSER is what the webbrowser module runs: echo prints the URL it was given instead of opening it.
    r = subprocess.run([LLMCTL, "report", run.urls["run"], "--open"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BROWSER": "echo"})
    assert r.returncode == 0, r.stderr
    opening, target = r.stdout.splitlines()
    assert opening == f"opening {target}" and target.startswith("file:///") and target.endswith("/report.html")
    # A private copy of the page just built (never a report.html found in storage), equal to the one written.
    assert Path(target[len("file://"):]).read_text() == (local(run) / "report.html").read_text()


# ---------------------------------------------------------------- hostile stored text 

PWN = "document.title='pwned';var p=document.createElement('p');p.id='pwned';document.body.appendChild(p)"
PAYLOADS = [f"<script>{PWN}</script>", f'<img src=x onerror="{PWN}">', f"[click me](javascript:{PWN})",
            f"<iframe srcdoc=\"<script>parent.{PWN}</script>\"></iframe>", f'<svg onload="{PWN}"></svg>',
            "![tracker](https://evil.example/t.png)", "<a href='javascript:alert(1)'>x</a>", "`code` *b* | pipe"]
EVIL_NAME = f"<img src=y onerror=\"{PWN}\">"


def _hostile_run(tmp_path) -> Path:
    """A run directory whose stored text (run name, samples, task labels, bundle, status) is HTML and
    Markdown a model trained on web text emits by itself, or an attacker writes; no training needed."""
    from tests.finished_run import tiny_plan

    d = tmp_path / "evil"
    (d / "pretrain").mkdir(parents=True)
    (d / "eval").mkdir()
    doc = json.loads(tiny_plan(f"file://{tmp_path}").to_json())
    doc["name"] = EVIL_NAME
    (d / "plan.json").write_text(json.dumps(doc))
    (d / "pretrain/summary.json").write_text(json.dumps({
        "status": PAYLOADS[0], "steps": 3, "tokens": 100, "seconds": 2.0, "dollars": 0.0,
        "loss_history": [[1, 3.0], [3, 2.0]], "val_history": [[0, 2.5], [3, 2.2]]}))
    task = {"type": PAYLOADS[1], "shots": PAYLOADS[3], "examples": 3, "accuracy": 0.5, "baseline": 25.0,
            "centered": 0.1}
    (d / "eval/results.json").write_text(json.dumps({"models": {
        "base": {"stage": PAYLOADS[4], "step": 3, "val_bpb": 2.2, "unigram_bpb": 3.0,
                 "core": {"core": 0.1, "bundle": PAYLOADS[2], "smoke_test": True, "tasks": {p: task for p in PAYLOADS}},
                 "samples": [{"prompt": p, "completion": q} for p, q in zip(PAYLOADS, reversed(PAYLOADS))]},
        "chat": {"stage": "sft", "step": 1, "val_bpb": 2.1,
                 "samples": [{"prompt": p, "reply": q} for p, q in zip(PAYLOADS, reversed(PAYLOADS))]}}}))
    return d


def _chromium(tmp_path, page: Path, shot: Path | None = None) -> str:
    """The DOM of `page` after headless Chromium loaded it and ran whatever it would run (2 s of virtual time)."""
    from tests.tools import ensure_chromium

    chromium, _ = ensure_chromium()
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000", "--window-size=1200,1600"]
    if shot is not None:
        r = subprocess.run(args + [f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    r = subprocess.run(args + ["--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "<body" in r.stdout, r.stderr[-2000:]
    return r.stdout


def _no_script_ran(dom: str) -> None:
    """The rendered DOM: the title as written, no element a payload adds, and no active markup at all (elements
    and attributes as the browser parsed them, not text that merely shows them)."""
    import re
    from html.parser import HTMLParser

    title = re.findall(r"<title>(.*?)</title>", dom, re.S)[0]
    assert title.startswith("Run report: ") and title != "pwned", "a payload set document.title"
    tags = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    Tags().feed(dom)
    assert not [a for _, a in tags if a.get("id") == "pwned"], "a payload added an element"
    assert not [t for t, _ in tags if t in ("script", "iframe", "svg", "object", "embed", "form", "base", "a")]
    for tag, attrs in tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)
        assert tag != "img" or (attrs.get("src") or "").startswith("data:image/png;base64,"), (tag, attrs)


def test_hostile_report_html_runs_no_script_in_headless_chromium(tmp_path):
    run = _hostile_run(tmp_path)
    text = write_report(f"file://{run}")
    html = (run / "report.html").read_text()
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\';' in html
    out = Path(__file__).parent / "artifacts"
    out.mkdir(exist_ok=True)
    shot = out / "report-hostile.png"
    shot.unlink(missing_ok=True)
    dom = _chromium(tmp_path, run / "report.html", shot)
    _no_script_ran(dom)
    # The payloads are shown as the text they are, not dropped: a reader sees what the model wrote.
    assert "&lt;script&gt;document.title=" in dom and "[click me](javascript:" in dom
    assert "&lt;img src=y onerror=" in dom  # the run name, in the heading
    assert "<script" not in text.lower().replace("\\<script", "")  # report.md: markup escaped too
    # The page's Content-Security-Policy stops a script even if one slipped through escaping.
    leaky = run / "leaky.html"
    leaky.write_text(html.replace("<body>", f"<body><script>{PWN}</script><img src=z onerror=\"{PWN}\">"))
    dom = _chromium(tmp_path, leaky)
    assert 'id="pwned"' not in dom and "<title>Run report" in dom


def test_hostile_report_open_never_opens_stored_html(tmp_path):
    run = _hostile_run(tmp_path)
    write_report(f"file://{run}")
    (run / "report.html").write_text(f"<html><body><script>{PWN}</script></body></html>")  # planted after the build
    r = subprocess.run([LLMCTL, "report", str(run), "--open"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BROWSER": "echo"})
    assert r.returncode == 0, r.stderr
    opened = Path(r.stdout.splitlines()[-1][len("file://"):])
    page = opened.read_text()
    assert "<script" not in page and "Content-Security-Policy" in page and "Run report" in page
    assert opened.stat().st_mode & 0o077 == 0  # a private copy: nobody else can swap it before the browser reads it


def test_hostile_report_of_a_1gib_summary_is_one_line_in_bounded_memory(tmp_path):
    run = _hostile_run(tmp_path)
    with open(run / "summary.json", "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used; read whole it took 2.1 GB and died with a traceback
    # A small wrapper runs `llmctl report` and reports its child's peak memory: measured from pytest itself, a
    # forked child would count pytest's own pages until it execs.
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(r.stderr); print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    w = subprocess.run([sys.executable, "-c", wrapper, LLMCTL, "report", str(run)], capture_output=True, text=True,
                       timeout=120)
    rc, maxrss = map(int, w.stdout.split())
    err = w.stderr
    assert rc == 2, err[-2000:]
    assert maxrss < 600 * 1024, f"{maxrss // 1024} MB"  # KiB on Linux
    assert err.count("\n") == 1 and "summary.json" in err and "over the" in err, err[-2000:]


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def test_hostile_report_refresh_does_not_follow_a_stage_name_out_of_the_run(capsys, tmp_path):
    private = tmp_path / "private" / "team-b"
    private.mkdir(parents=True)
    (private / "summary.json").write_text(json.dumps({"status": "completed", "secret": "TEAM-B-MARKER"}))
    doc = plan_doc(tmp_path)
    doc["stages"][0]["name"] = "../../private/team-b"
    run = store_plan(tmp_path, "evil", doc)
    err = refused(capsys, "report", "evil", "--refresh", "--storage", f"file://{tmp_path}")
    assert "stages" in err and "../../private/team-b" in err and "TEAM-B-MARKER" not in err
    assert not any("TEAM-B-MARKER" in p.read_text() for p in run.iterdir())


def test_hostile_report_and_errors_strip_escapes_from_stored_files(capsys, tmp_path):
    doc = plan_doc(tmp_path)
    doc["estimate"]["mfu_source"] = f"prior{ESC}"
    store_plan(tmp_path, "evil", doc)
    rc, out, err = llmctl(capsys, "report", "evil", "--storage", f"file://{tmp_path}")
    assert rc == 0, err
    no_controls(out + err)
    doc["name"] = f"x{ESC}"
    doc["stages"] = [s for s in doc["stages"] if s["name"] != "sft"]
    store_plan(tmp_path, "evil2", doc)
    err = refused(capsys, "chat", "evil2", "--storage", f"file://{tmp_path}", "--prompt", "hi")
    no_controls(err)

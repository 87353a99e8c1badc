"""trainer/progress.py: the local run's stage bars follow the workers' progress file (a real file, a real rich
console), `progress_bar`'s no-op, and the spinner (silent off a terminal, stored names cleaned on one). (The
run's progress.json is tested in test_jobs.py and test_cluster_defects.py.)

Run: .venv/bin/pytest tests/test_progress.py
"""

import io
import json

from rich.console import Console

from trainer.progress import ProgressFile, StageBars, progress_bar


def test_stage_bars_follow_the_progress_file(tmp_path):
    path = str(tmp_path / "progress.jsonl")
    out = io.StringIO()
    bars = StageBars(path, [("pretrain", 40), ("sft", 5)], priced=True,
                     console=Console(file=out, width=150, force_terminal=False))
    pf = ProgressFile(path)
    with bars:
        bars.poll()  # no file yet: nothing to show, no error
        pf.write(stage="pretrain", step=20, steps=40, loss=5.25, tokens_per_second=1234.0, eta_seconds=75,
                 dollars=0.5)
        with open(path, "a") as f:
            f.write('{"stage": "pretrain", "st')  # a half-written line waits for the rest
        bars.poll()
        with open(path, "a") as f:
            f.write('ep": 40, "steps": 40, "val_bpb": 1.75}\nnot json\n')
        pf.write(stage="sft", step=5, steps=5, loss=2.0)
        bars.poll()
    lines = out.getvalue().splitlines()
    pre = next(line for line in lines if line.startswith("pretrain"))
    sft = next(line for line in lines if line.startswith("sft"))
    assert "40/40" in pre and "1,234 tok/s" in pre and "loss 5.250" in pre and "val bpb 1.750" in pre
    assert "$0.50" in pre and "ETA" not in pre  # done: no ETA left
    assert "5/5" in sft and "loss 2.000" in sft
    assert [json.loads(line)["stage"] for line in open(path) if line.startswith('{"stage": "pretrain", "step": 20')]


def test_unpriced_runs_show_no_dollars_and_eta_while_running(tmp_path):
    path = str(tmp_path / "p.jsonl")
    out = io.StringIO()
    with StageBars(path, [("pretrain", 100)], priced=False, console=Console(file=out, width=150)) as bars:
        ProgressFile(path).write(stage="pretrain", step=10, steps=100, dollars=0.0, eta_seconds=3725)
        bars.poll()
    line = next(x for x in out.getvalue().splitlines() if x.startswith("pretrain"))
    assert "10/100" in line and "$" not in line and "ETA 1:02:05" in line


def test_progress_file_off_and_bar_off_do_nothing(tmp_path):
    ProgressFile(None).write(stage="x", step=1)  # no path: nothing written, no error
    assert not list(tmp_path.iterdir())
    with progress_bar(False, "x", 10) as advance:
        advance(5)


def test_a_narrow_terminal_cuts_the_info_never_the_step_count_or_elapsed_time(tmp_path):
    path = str(tmp_path / "p.jsonl")
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    with StageBars(path, [("pretrain", 700)], priced=False, console=console) as bars:
        ProgressFile(path).write(stage="pretrain", step=70, steps=700, loss=4.433, val_bpb=3.471,
                                 tokens_per_second=3970.0, eta_seconds=1385)
        bars.poll()
    line = [x for x in out.getvalue().replace("\r", "\n").splitlines() if x.lstrip("\x1b[2K").startswith("pretrain")][-1]
    assert "70/700" in line and "0:00:0" in line and "…" not in line.split("tok/s")[0]
    assert "3,970 tok/s" in line and "loss 4.433" in line


def test_spinner_prints_nothing_off_a_terminal(capsys):
    from trainer.progress import spinner

    with spinner(True, "loading"):
        pass
    s = spinner(True, "merging")
    s.start()
    s.stop()
    s.stop()  # idempotent
    assert capsys.readouterr() == ("", "")


def test_spinner_on_a_terminal_shows_a_stored_name_without_its_escapes():
    """A run name from storage may carry terminal escapes or rich markup: shown as printable text only."""
    import os
    import pty
    import subprocess
    import sys

    code = ("from trainer.progress import spinner\n"
            "with spinner(True, 'loading evil\\x1b]0;pwned\\x07[/]name (sft)'):\n    pass\nprint('done')\n")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    assert "loading evil[/]name (sft)" in text and "\x1b]0;" not in text and "done" in text, text

"""Tests of `llmctl top` (cli/top.py): the text-format parser against prometheus_client's own output, one
frame read from live exporters and the same frame read through a real Prometheus, step time between frames,
and bad input (one line, exit 2) and unreachable sources (one line, exit 1).

Run: .venv/bin/pytest tests/cli/test_top.py -v
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from cli.top import Sample, build, metrics_url, parse_exposition
from tests import prom as promlib
from trainer.metrics import RunMetrics
from trainer.plan import RunSpec, plan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def exporters():
    """Two ranks of a capped h100 plan on CPU, three steps each (rank 1 slower), rank 0 evaluated and saved."""
    p = plan(RunSpec(depth=2, gpus=2, seq_len=64, num_iterations=100, budget_cap=20.0, name="top-test"))
    ms = [RunMetrics(p, "pretrain", rank=r, local_rank=r, world_size=2, device_name=None, port=0, addr="127.0.0.1")
          for r in range(2)]
    for m in ms:
        for step in range(1, 4):
            m.on_step(step, 4096, 0.2 + 0.1 * m.rank, 0.02, 3.5 - 0.1 * step)
    ms[0].on_val(1.2345)
    ms[0].on_checkpoint(1.5)
    yield ms
    for m in ms:
        m.close()


def frame_lines(out: str) -> list[str]:
    return [" ".join(line.strip("│ ").split()) for line in out.splitlines()]


def check_frame(out: str) -> None:
    lines = frame_lines(out)
    text = "\n".join(lines)
    assert "top-test · pretrain" in text
    assert "step 3/100" in text and "3.0%" in text
    assert "MFU n/a (cpu)" in text and "val bpb 1.2345" in text and "loss 3.2000" in text
    assert "of estimate $" in text and "(cap $20.00," in text
    assert "d2 on 2 x h100 at $3/GPU-h" in text
    # Per-rank rows: rank, step, tok/s, MFU, loss, step time, data wait, last checkpoint.
    assert "0 3 20.5K n/a (cpu) 3.2000 200 ms 10.0% 1.5 s" in lines
    assert "1 3 13.7K n/a (cpu) 3.2000 300 ms 6.7% -" in lines


def test_parser_reads_what_prometheus_client_writes(exporters):
    from prometheus_client import generate_latest

    m = exporters[0]
    samples = parse_exposition(generate_latest(m.registry).decode())
    assert samples
    for s in samples:
        if s.name not in ("llmctl_cost_dollars", "llmctl_gpu_seconds"):  # read live from the clock at each scrape
            assert s.value == m.registry.get_sample_value(s.name, s.labels), s
    (s,) = parse_exposition('x{a="q\\"uote",b="back\\\\slash"} NaN 1700000000\n# HELP x\n')
    assert s.labels == {"a": 'q"uote', "b": "back\\slash"} and math.isnan(s.value)


def test_one_frame_from_the_exporters(exporters, capsys):
    assert main(["top", "--once", *(m.url for m in exporters)]) == 0
    check_frame(capsys.readouterr().out)


def test_the_same_frame_through_a_real_prometheus(exporters, capsys, tmp_path):
    from tests.tools import ensure_prometheus

    ensure_prometheus()
    targets = [f"127.0.0.1:{m.port}" for m in exporters]
    with promlib.Prometheus(tmp_path / "prom", targets) as prom:
        prom.wait_until(lambda: len(prom.query('llmctl_step{run="top-test"} == 3')) == 2, "both ranks scraped")
        assert main(["top", "--once", "--prometheus", prom.url, "--run", "top-test"]) == 0
        check_frame(capsys.readouterr().out)
        assert main(["top", "--once", "--prometheus", prom.url, "--run", "no-such-run"]) == 1
        assert "no llmctl metrics yet" in capsys.readouterr().out


def test_step_time_is_measured_between_frames():
    def samples(total_seconds: float, steps: float, wait: float) -> list[Sample]:
        labels = {"run": "r", "stage": "pretrain", "rank": "0"}
        return [Sample("llmctl_step_seconds_sum", labels, total_seconds),
                Sample("llmctl_step_seconds_count", labels, steps),
                Sample("llmctl_data_wait_seconds_total", labels, wait)]

    first = samples(100.0, 100, 1.0)  # 1 s per step so far, 1% waiting
    (view,) = build(first)
    assert view.ranks["0"].step_seconds == pytest.approx(1.0) and view.ranks["0"].wait_share == pytest.approx(0.01)
    (view,) = build(samples(130.0, 110, 7.0), previous=first)  # 10 steps of 3 s, 6 s of waiting
    assert view.ranks["0"].step_seconds == pytest.approx(3.0) and view.ranks["0"].wait_share == pytest.approx(0.2)
    (view,) = build(samples(130.0, 110, 7.0), previous=samples(130.0, 110, 7.0))  # no new step: stage mean
    assert view.ranks["0"].step_seconds == pytest.approx(130 / 110)


@pytest.mark.parametrize("argv, message", [
    (["top"], "say where to read"),
    (["top", "--once", "127.0.0.1:9400", "--prometheus", "http://p:9090"], "not both"),
    (["top", "--local-ranks", "0"], "--local-ranks must be"),
    (["top", "--once", "127.0.0.1:9400", "--interval", "0"], "--interval must be > 0"),
    (["top", "--once", "http://"], "is not host:port"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_unreachable_exporter_is_one_line_and_exit_1(capsys):
    port = promlib.free_port()  # nothing listens there
    assert main(["top", "--once", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"llmctl: error: cannot reach http://127.0.0.1:{port}/metrics: [Errno 111] Connection refused"


def test_urls_and_a_light_import():
    assert metrics_url("10.0.0.5:9400") == "http://10.0.0.5:9400/metrics"
    assert metrics_url("http://h:1/") == "http://h:1/metrics"
    assert metrics_url("https://h/custom/path") == "https://h/custom/path"
    code = ("import sys, cli.main, cli.top; heavy = {'torch', 'ray', 'prometheus_client', 'kubernetes'} & "
            "set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_local_metrics_port_is_the_trainers():
    """cli/top.py names the ranks' first port without importing trainer.metrics (it imports the planner)."""
    from cli import top
    from trainer.metrics import METRICS_PORT_BASE

    assert top.METRICS_PORT_BASE == METRICS_PORT_BASE


def test_deps_a_malformed_scrape_is_an_error_not_a_partial_view():
    """The hand parser once skipped a line it could not read, so a truncated /metrics body showed
    as a complete frame; prometheus_client's parser (the format's reference) refuses it."""
    from cli.errors import CLIError

    with pytest.raises(CLIError, match="not the Prometheus text format"):
        parse_exposition('llmctl_step{run="a"} 1\nllmctl_step{run="b" 2\n')


# ---------------------------------------------------------------------------------------------
# Hostile input: label text an exporter (any pod of a run) or Prometheus serves is data,
# never rich markup, and never reaches the terminal with its escape sequences.

HOSTILE_RUN = "evil[/]\x1b]0;pwned\x07\x1b[2J[link=https://evil.example]x[/link]"
HOSTILE_EXPOSITION = "\n".join([
    f'llmctl_step{{run="{HOSTILE_RUN}",stage="[bold red]pretrain",rank="[/]"}} 3',
    f'llmctl_step{{run="{HOSTILE_RUN}",stage="[bold red]pretrain",rank="0"}} 2',
    f'llmctl_mfu_ratio{{run="{HOSTILE_RUN}",stage="[bold red]pretrain",rank="0"}} 0.5',
    f'llmctl_eta_seconds{{run="{HOSTILE_RUN}",stage="[bold red]pretrain",rank="0"}} +Inf',
    f'llmctl_run_info{{run="{HOSTILE_RUN}",stage="[bold red]pretrain",rank="0",gpu_type="\x1b]8;;https://evil/\x1b\\\\h100",'
    f'mfu_reason="[/]\x1b[2J"}} 1',
]) + "\n"


def _hostile_exporter(body: bytes):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hostile_labels_render_as_text_on_a_terminal():
    """On a terminal (styles on), markup in labels is shown literally and no escape from a label gets through."""
    import io

    from rich.console import Console

    from cli.top import render

    views = build(parse_exposition(HOSTILE_EXPOSITION))
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=300, color_system="truecolor").print(render(views, "1 exporter"))
    out = buf.getvalue()
    assert "\x1b]" not in out and "\x1b[2J" not in out and "\x07" not in out  # no OSC (title, OSC-8 link), no clear
    assert "pwned" not in out or "\x1b]0;pwned" not in out
    assert "[/]" in out and "[link=https://evil.example]" in out and "[bold red]pretrain" in out


def test_hostile_exporter_labels_through_the_command(capsys):
    server = _hostile_exporter(HOSTILE_EXPOSITION.encode() + b"llmctl_step{run=\"\xff\xfe\"} 1\n")
    try:
        rc = main(["top", "--once", f"127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out and "[/]" in out and "ETA -" in out


@pytest.mark.parametrize("answer", [b'{"status": "success"}', b'{"status": "success", "data": {"result": [1]}}',
                                    b'{"status": "success", "data": {"result": [{"metric": {}, "value": [0, "x"]}]}}',
                                    b'[1, 2]', b"\xff\xfe"])
def test_hostile_prometheus_answers_are_one_line(answer, capsys):
    server = _hostile_exporter(answer)
    try:
        rc = main(["top", "--once", "--prometheus", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    out, err = capsys.readouterr()
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "did not answer like a Prometheus server" in err


def test_hostile_rank_labels_of_any_kind_sort():
    views = build([Sample("llmctl_step", {"run": "r", "stage": "pretrain", "rank": rank}, 1.0)
                   for rank in ("10", "a", "2", "²")])
    from cli.top import render

    render(views, "x")  # no TypeError sorting "a" against 2, no ValueError from int("²")

"""`llmctl top`: a live terminal view of a run, read from its exporters' /metrics or from Prometheus.

Two sources, one view:
- exporter URLs (`host:port`, one per rank; `--local-ranks N` means 127.0.0.1:9400..9400+N-1, a local run),
  read directly in the Prometheus text format: no Prometheus needed;
- `--prometheus URL`: every llmctl run that Prometheus scrapes (or `--run NAME`), via its HTTP API.

Per run and stage it shows progress and ETA, throughput (sum over ranks), MFU (mean over ranks, or why it
is not measured), loss and val bpb, dollars spent against the estimate and the cap, and a row per rank (step
time, data-wait share, MFU) to spot a straggler. Step time is the mean since the previous refresh (over the
whole stage on the first frame). The numbers are the exporter's (trainer/metrics.py); aggregation matches
the dashboards.

Imports only the standard library and rich at start-up (prometheus_client's parser when a scrape arrives; no
torch or ray): it runs from a laptop.

Everything read is untrusted (any pod of a run serves its exporter; anyone who can push series can write
Prometheus): label values are cleaned of terminal escapes and cut to `MAX_LABEL` characters as they are
read (trainer/text.py `clean`), rendered as `rich.text.Text`, never as markup (`[/]` is shown, not parsed),
and an answer not in the expected shape is one line (exit 1), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field

from cli.errors import CLIError, UsageError
from trainer.text import clean

METRICS_PORT_BASE = 9400  # trainer/metrics.py METRICS_PORT_BASE, not imported: it imports the planner (tests check)

TIMEOUT = 5.0  # seconds per HTTP request
MAX_LABEL = 128  # characters kept of a label value (a run name is at most 47)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


# ---------------------------------------------------------------------------------------------
# Reading


def parse_exposition(text: str) -> list[Sample]:
    """Samples from the Prometheus text exposition format (what /metrics serves), read by prometheus_client's own
    parser (imported here, not at start-up: ~45 ms), label values cleaned as they are read. A malformed body is an
    error, not a silently partial view."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return [Sample(s.name, _clean_labels(dict(s.labels)), float(s.value))
                for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as e:
        raise CLIError(f"not the Prometheus text format ({e})") from None


def _clean_labels(labels: dict) -> dict:
    """Label values as they may be printed: no escape sequences or control characters, at most MAX_LABEL long."""
    return {clean(k, limit=MAX_LABEL): clean(v, limit=MAX_LABEL) for k, v in labels.items()}


def metrics_url(target: str) -> str:
    """`host:port` or `http://host:port` -> `http://host:port/metrics`; a URL with a path stays as it is."""
    import urllib.parse

    url = target if "://" in target else f"http://{target}"
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc:
        raise UsageError(f"top: {target!r} is not host:port or a URL")
    return url if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}/metrics"


def _get(url: str) -> bytes:
    import urllib.error  # here, not at the top: urllib.request costs ~40 ms of llmctl's start-up
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise CLIError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CLIError(f"cannot reach {url}: {reason}") from None


def scrape(url: str) -> list[Sample]:
    body = _get(url).decode("utf-8", "replace")
    try:
        samples = parse_exposition(body)
    except CLIError as e:
        raise CLIError(f"{url}: {e}") from None
    return [s for s in samples if s.name.startswith("llmctl_")]


def query_prometheus(base: str, run: str | None) -> list[Sample]:
    """The current value of every llmctl series (buckets and _created left out) from Prometheus."""
    import urllib.parse

    sel = ['__name__=~"llmctl_.+"', '__name__!~"llmctl_step_seconds_bucket|.+_created"']
    if run:
        sel.append('run="' + run.replace("\\", "\\\\").replace('"', '\\"') + '"')
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": "{" + ",".join(sel) + "}"})
    try:
        body = json.loads(_get(url))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CLIError(f"{base} did not answer like a Prometheus server (not JSON)") from None
    if not isinstance(body, dict):
        raise CLIError(f"{base} did not answer like a Prometheus server (not a JSON object)")
    if body.get("status") != "success":
        raise CLIError(f"{base}: {clean(body.get('errorType'), limit=100)}: {clean(body.get('error'), limit=300)}")
    out = []
    try:
        for r in body["data"]["result"]:
            labels = {str(k): str(v) for k, v in r["metric"].items()}
            name = labels.pop("__name__")
            out.append(Sample(name, _clean_labels(labels), float(r["value"][1])))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CLIError(f"{base} did not answer like a Prometheus server (a query result without "
                       f"{clean(e, limit=60) if isinstance(e, KeyError) else 'the usual shape'})") from None
    return out


# ---------------------------------------------------------------------------------------------
# The view: one block per (run, stage), one row per rank


@dataclass
class RankRow:
    rank: str
    step: float = math.nan
    tokens_per_second: float = math.nan
    mfu: float = math.nan
    loss: float = math.nan
    step_seconds: float = math.nan  # mean since the previous refresh
    wait_share: float = math.nan
    checkpoint_seconds: float = math.nan


@dataclass
class StageView:
    run: str
    stage: str
    info: dict = field(default_factory=dict)
    planned: float = math.nan
    eta_seconds: float = math.nan
    val_bpb: float = math.nan
    core: float = math.nan
    spent: float = 0.0
    estimate: float = math.nan
    cap: float = math.nan
    ranks: dict = field(default_factory=dict)

    @property
    def step(self) -> float:
        return max((r.step for r in self.ranks.values() if not math.isnan(r.step)), default=math.nan)

    @property
    def tokens_per_second(self) -> float:
        return sum(r.tokens_per_second for r in self.ranks.values() if not math.isnan(r.tokens_per_second))

    @property
    def mfu(self) -> float:
        vals = [r.mfu for r in self.ranks.values() if not math.isnan(r.mfu)]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def loss(self) -> float:
        vals = [r.loss for r in self.ranks.values() if not math.isnan(r.loss)]
        return sum(vals) / len(vals) if vals else math.nan


_RANK_GAUGES = {"llmctl_step": "step", "llmctl_tokens_per_second": "tokens_per_second", "llmctl_mfu_ratio": "mfu",
                "llmctl_train_loss": "loss", "llmctl_checkpoint_seconds": "checkpoint_seconds"}


def build(samples: list[Sample], previous: list[Sample] | None = None) -> list[StageView]:
    """Group samples into stage views; step time and data-wait share from the change since `previous`."""
    views: dict[tuple, StageView] = {}
    counters: dict[tuple, dict] = {}
    for s in samples:
        run, stage, rank = s.labels.get("run"), s.labels.get("stage"), s.labels.get("rank")
        if run is None or stage is None or rank is None:
            continue
        v = views.setdefault((run, stage), StageView(run, stage))
        row = v.ranks.setdefault(rank, RankRow(rank))
        if s.name in _RANK_GAUGES:
            setattr(row, _RANK_GAUGES[s.name], s.value)
        elif s.name == "llmctl_cost_dollars":
            v.spent += s.value
        elif s.name == "llmctl_steps_total_planned":
            v.planned = s.value
        elif s.name == "llmctl_eta_seconds":
            v.eta_seconds = s.value if math.isnan(v.eta_seconds) else max(v.eta_seconds, s.value)
        elif s.name == "llmctl_val_bpb":
            v.val_bpb = s.value
        elif s.name == "llmctl_core_score":
            v.core = s.value
        elif s.name == "llmctl_cost_estimated_dollars":
            v.estimate = s.value
        elif s.name == "llmctl_cost_cap_dollars":
            v.cap = s.value
        elif s.name == "llmctl_run_info":
            v.info = {k: val for k, val in s.labels.items() if k not in ("run", "stage", "rank", "job", "instance")}
        elif s.name in ("llmctl_step_seconds_sum", "llmctl_step_seconds_count", "llmctl_data_wait_seconds_total"):
            counters.setdefault((run, stage, rank), {})[s.name] = s.value
    before = {}
    for s in previous or []:
        key = (s.labels.get("run"), s.labels.get("stage"), s.labels.get("rank"))
        before.setdefault(key, {})[s.name] = s.value
    for (run, stage, rank), now in counters.items():
        then = before.get((run, stage, rank), {})
        d_sum = now.get("llmctl_step_seconds_sum", 0.0) - then.get("llmctl_step_seconds_sum", 0.0)
        d_cnt = now.get("llmctl_step_seconds_count", 0.0) - then.get("llmctl_step_seconds_count", 0.0)
        d_wait = now.get("llmctl_data_wait_seconds_total", 0.0) - then.get("llmctl_data_wait_seconds_total", 0.0)
        if d_cnt <= 0 or d_sum <= 0:  # no new step since the last frame (or a restart): the stage's mean
            d_sum = now.get("llmctl_step_seconds_sum", 0.0)
            d_cnt = now.get("llmctl_step_seconds_count", 0.0)
            d_wait = now.get("llmctl_data_wait_seconds_total", 0.0)
        row = views[(run, stage)].ranks[rank]
        if d_cnt > 0 and d_sum > 0:
            row.step_seconds = d_sum / d_cnt
            row.wait_share = d_wait / d_sum
    order = {"pretrain": 0, "sft": 1, "eval": 2}
    return sorted(views.values(), key=lambda v: (v.run, order.get(v.stage, 9), v.stage))


# ---------------------------------------------------------------------------------------------
# Rendering


def _num(x: float, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None or math.isnan(x) else fmt.format(x)


def _si(x: float) -> str:
    if math.isnan(x):
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _mfu(v: StageView, value: float) -> str:
    reason = v.info.get("mfu_reason", "ok")
    if reason != "ok":
        return f"n/a ({reason.replace('_', ' ')})"
    return _num(value * 100 if not math.isnan(value) else value, "{:.1f}%")


def render(views: list[StageView], source: str, errors: list[str] | None = None):
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    blocks = [Text(f"llmctl top · {clean(source)} · {time.strftime('%H:%M:%S')}", style="bold")]
    for err in errors or []:
        blocks.append(Text(f"! {clean(err, limit=300)}", style="yellow"))
    if not views:
        blocks.append(Text("no llmctl metrics yet (is the run started? are the URLs right?)", style="dim"))
    for v in views:
        i = v.info  # label text: shown as Text, never parsed as markup
        what = Text(f"d{i.get('depth', '?')} on {i.get('gpus', '?')} x {i.get('gpu_type', '?')} at "
                    f"${i.get('price_per_gpu_hour', '?')}/GPU-h" if i else "")
        done = v.step / v.planned if v.planned and not math.isnan(v.step) and v.planned > 0 else 0.0
        head = Table.grid(padding=(0, 2))
        head.add_row(Text(f"step {_num(v.step)}/{_num(v.planned)}"), ProgressBar(total=1.0, completed=min(done, 1.0),
                     width=30), Text(f"{done:.1%}"), Text(f"ETA {_duration(v.eta_seconds)}"))
        stats = Table.grid(padding=(0, 3))
        stats.add_row(
            Text.assemble((_si(v.tokens_per_second), "bold"), " tok/s"),
            Text.assemble("MFU ", (_mfu(v, v.mfu), "bold")),
            Text.assemble("loss ", (_num(v.loss, '{:.4f}'), "bold")),
            Text.assemble("val bpb ", (_num(v.val_bpb, '{:.4f}'), "bold"),
                          f"   CORE {v.core:.4f}" if not math.isnan(v.core) else ""),
        )
        money = Text.assemble("spent ", (f"${v.spent:,.2f}", "bold"), f" of estimate ${_num(v.estimate, '{:,.2f}')}")
        if not math.isnan(v.cap):
            money.append(f" (cap ${v.cap:,.2f}, {v.spent / v.cap:.0%} used)" if v.cap > 0 else "")
        ranks = Table(box=None, padding=(0, 2), header_style="dim")
        for col in ("rank", "step", "tok/s", "MFU", "loss", "step time", "data wait", "last ckpt"):
            ranks.add_column(col, justify="right")
        for key in sorted(v.ranks, key=lambda r: (0, int(r), "") if r.isascii() and r.isdigit() else (1, 0, r)):
            r = v.ranks[key]
            ranks.add_row(*map(Text, (r.rank, _num(r.step), _si(r.tokens_per_second), _mfu(v, r.mfu),
                                      _num(r.loss, "{:.4f}"), _num(r.step_seconds * 1e3, "{:,.0f} ms"),
                                      _num(r.wait_share * 100, "{:.1f}%"), _num(r.checkpoint_seconds, "{:.1f} s"))))
        blocks.append(Panel(Group(head, stats, money, ranks), title=Text.assemble((v.run, "bold"), f" · {v.stage}"),
                            subtitle=what, title_align="left", subtitle_align="right"))
    return Group(*blocks)


# ---------------------------------------------------------------------------------------------
# The command


def _sources(args: argparse.Namespace) -> tuple[str, list[str]]:
    urls = [metrics_url(u) for u in args.urls]
    if args.local_ranks is not None:
        if args.local_ranks < 1:
            raise UsageError("top: --local-ranks must be a positive number of ranks")
        urls += [f"http://127.0.0.1:{METRICS_PORT_BASE + r}/metrics" for r in range(args.local_ranks)]
    if args.prometheus and urls:
        raise UsageError("top: give exporter URLs or --prometheus, not both")
    if not args.prometheus and not urls:
        raise UsageError("top: say where to read: exporter URLs (host:port), --local-ranks N, or --prometheus URL")
    if args.interval <= 0:
        raise UsageError(f"top: --interval must be > 0 seconds, got {args.interval}")
    return ("prometheus", [args.prometheus]) if args.prometheus else ("exporters", urls)


def collect(kind: str, where: list[str], run: str | None) -> tuple[list[Sample], list[str]]:
    """All samples from the sources, and one line per source that failed."""
    samples, errors = [], []
    for url in where:
        try:
            got = query_prometheus(url, run) if kind == "prometheus" else scrape(url)
        except CLIError as e:
            errors.append(str(e))
            continue
        samples += [s for s in got if run is None or s.labels.get("run") == run]
    return samples, errors


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    kind, where = _sources(args)
    source = where[0] if kind == "prometheus" else f"{len(where)} exporter{'s' * (len(where) > 1)}"
    samples, errors = collect(kind, where, args.run)
    if args.once:
        if errors and not samples:
            raise CLIError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)
        console.print(render(build(samples), source, errors))
        return 0 if samples else 1
    previous = None
    try:
        with Live(render(build(samples), source, errors), auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                previous, (samples, errors) = samples, collect(kind, where, args.run)
                live.update(render(build(samples, previous), source, errors), refresh=True)
    except KeyboardInterrupt:
        return 0


def register(sub) -> None:
    p = sub.add_parser("top", help="live view of a run: throughput, MFU, loss, progress, dollars",
                       description="A live terminal view of training runs from their Prometheus exporters "
                       "(one /metrics per rank) or from a Prometheus server. Ctrl-C quits.",
                       epilog="Examples:\n  llmctl top --local-ranks 2\n  llmctl top 10.0.0.5:9400 10.0.0.5:9401\n"
                       "  llmctl top --prometheus http://prometheus:9090 --run gpt-d26-8xh100-1a2b3c4d\n"
                       "  llmctl top --local-ranks 2 --once",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", nargs="*", metavar="URL", help="exporter /metrics URLs, one per rank (host:port is enough)")
    p.add_argument("--local-ranks", type=int, metavar="N",
                   help=f"read a local run's N ranks at 127.0.0.1:{METRICS_PORT_BASE}..{METRICS_PORT_BASE}+N-1")
    p.add_argument("--prometheus", metavar="URL", help="read every llmctl run from this Prometheus server instead")
    p.add_argument("--run", help="show only this run (default: every run found)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (exit 1 if no metrics were found)")
    p.set_defaults(func=cmd_top)

"""The run's report card: what was planned, what happened, how good the model is, and what it says.

`write_report(run_url)` reads what a run leaves in its directory and writes `report.md` (for people) and
`report.json` (the same facts, for tools) beside it:

    plan.json                  the RunPlan (trainer/launch.py write_plan)
    summary.json               the run's totals against the estimate (launch.summarize)
    <stage>/summary.json       each training stage's steps, tokens, seconds, dollars, loss, val bpb (loop.py)
    eval/results.json          the eval stage: val bpb per model, CORE per task, samples (evaluate.py), and
                               lm-eval-harness's scores under `lm_eval` when the plan asked (--lm-eval)
    spend.json, restarts.json  what the attempts paid (spend.py) and each worker group restart (restarts.py)

Sections: the plan; measured time, tokens, throughput, MFU and dollars against the estimate; loss and bits per
byte; CORE per task with GPT-2's reference scores (a smoke-test bundle is labelled as such: it checks the
pipeline, it does not measure capability); samples from the base and chat models. Missing pieces (a run still
going, no eval stage) are said plainly rather than failing. Torch-free: `llmctl report` imports it.

Reading and writing the run directory goes through trainer/storage.py (`read_json`, `read_plan`, `write_text`).
"""

from __future__ import annotations

import json

from trainer.restarts import read_restarts_or_none
from trainer.storage import read_json, read_plan, write_text

REPORT_FORMAT = "llmctl.report/v1"
# CORE of the reference models (nanochat `core_eval.py` / README; docs/recipe.md, evaluation); GPT-2 XL is
# the speedrun's target.
GPT2_CORE = (("GPT-2 124M", 0.1139), ("GPT-2 355M", 0.1849), ("GPT-2 774M", 0.2146), ("GPT-2 XL 1.5B", 0.256525))
SMOKE_NOTE = ("Smoke test: this CORE figure comes from a tiny bundle the local run built from held-out text, "
              "scored through the same code path as the DCLM bundle. It shows the pipeline works; it is not a "
              "capability score and is not comparable with GPT-2's.")


# -------------------------------------------------------------------------------------------- gathering


def gather(url: str, storage_options: dict | None = None) -> dict:
    """Everything the report shows, as one JSON-able dict (this is report.json)."""
    from trainer.plan.stored_plan import StoredPlanError, plan_object, stage_names

    plan = plan_object(read_plan(url, storage_options))
    stage_names(plan)  # plan.json is untrusted: each stage is a directory of this run, by a known name only
    if not isinstance(plan.get("name"), str):  # any text: escaped where it is shown (render, to_html)
        raise StoredPlanError(f"plan.json: name must be a string, got {plan.get('name')!r:.60}")
    summary = read_json(f"{url}/summary.json", storage_options)
    restarts = read_restarts_or_none(url, storage_options)  # trainer/restarts.py
    stages = {}
    for st in plan["stages"]:
        done = read_json(f"{url}/{st['name']}/summary.json", storage_options)
        stages[st["name"]] = {"planned": {k: st[k] for k in ("steps", "tokens", "hours", "dollars")},
                              "measured": done}
    evals = read_json(f"{url}/eval/results.json", storage_options)
    if evals is not None and "eval" not in stages:  # evaluated outside the plan (e.g. a plan from before eval)
        stages["eval"] = {"planned": None, "measured": read_json(f"{url}/eval/summary.json", storage_options)}
    spec, arch, est = plan["spec"], plan["arch"], plan["estimate"]
    status = (summary or {}).get("status", "unfinished")
    return {"format": REPORT_FORMAT, "run": plan["name"], "url": url, "status": status,
            "spec": {k: spec[k] for k in ("depth", "gpus", "gpu_type", "precision", "ratio", "seq_len")},
            "model": {"n_layer": arch["n_layer"], "n_embd": arch["n_embd"], "n_head": arch["n_head"],
                      "vocab_size": arch["vocab_size"], "seq_len": arch["seq_len"],
                      "window_pattern": arch["window_pattern"], "params": plan["params"]["total"],
                      "scaling_params": plan["params"]["scaling"], "flops_per_token": plan["flops_per_token"]},
            "estimate": {k: est[k] for k in ("mfu", "mfu_source", "peak_flops_per_gpu", "tokens_per_second",
                                             "train_hours", "total_hours", "total_dollars", "price_per_gpu_hour")},
            "stages": stages, "totals": summary, "eval": evals, "restarts": restarts,
            "spend": spend_section(url, storage_options, summary, restarts)}


def spend_section(url: str, storage_options: dict | None, summary: dict | None,
                  restarts: list[dict] | None = None) -> dict | None:
    """What the run paid across all its attempts (`<run>/spend.json`, trainer/spend.py) against the work it
    kept (the run summary's hours), its attempts counting each worker group restart (trainer/restarts.py):
    None for a run without a ledger or whose ledger cannot be read."""
    from trainer.restarts import counts
    from trainer.spend import lost_seconds, read_spend

    try:
        spend = read_spend(url, storage_options)
    except (ValueError, OSError):
        return None
    if not spend or not spend["attempts"]:
        return None
    kept = (summary or {}).get("hours")
    lost = lost_seconds(spend, kept * 3600 if isinstance(kept, (int, float)) else None)
    return dict(spend["totals"], **counts(spend["totals"]["attempts"], restarts or []),
                running=spend["attempts"][-1]["state"] == "running", dropped=spend["dropped"],
                lost_hours=None if lost is None else lost / 3600)


# -------------------------------------------------------------------------------------------- rendering


def _hours(h: float | None) -> str:
    if h is None:
        return "–"
    s = h * 3600
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{h:.2f} h"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


# Characters that make Markdown markup out of stored text: HTML (`<`, `&` entities), links and images (`[`, `]`,
# `!`), code spans, emphasis, table cells. Each is backslash-escaped (CommonMark: any ASCII punctuation may be).
_MD_SPECIAL = frozenset("\\`*[]<>!|&")


def _md(value) -> str:
    """Stored text (a run name, a sample, a task label...) as Markdown that renders as exactly that text: one
    line, every markup character escaped. Every stored string reaches report.md through here (or `_code`)."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "⏎ ")
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text)


def _code(value) -> str:
    """Stored text as a code span when it can be one (no backtick, one line), else as escaped text."""
    text = str(value)
    return f"`{text}`" if "`" not in text and "\n" not in text and "\r" not in text else _md(text)


def _cell(text) -> str:
    """Text safe inside a markdown table cell: one line, markup (pipes included) escaped."""
    return _md(text).strip() or "(empty)"


def _measured_row(name: str, s: dict, d: dict) -> str:
    planned, m = s["planned"], s["measured"]
    est_time, est_dollars = _hours(planned and planned["hours"]), _num(planned and planned["dollars"], ",.2f")
    if m is None:
        return f"| {name} | not run | | | {est_time} | | | | ${est_dollars} |"
    secs = m.get("seconds") or 0.0
    tokens = m.get("tokens", 0)
    tps = tokens / secs if secs and name != "eval" else None  # eval: forward passes of mixed kinds, no rate
    gpus, peak = d["spec"]["gpus"], d["estimate"]["peak_flops_per_gpu"]
    mfu = d["model"]["flops_per_token"] * tps / (gpus * peak) if tps and peak else None
    if name == "eval":
        tokens = m.get("tokens_evaluated", 0)
    steps = _cell(m.get('steps', '–')) + (f"/{_cell(planned['steps'])}" if planned else "")
    return (f"| {name} | {_cell(m.get('status', '–'))} | {steps} | {_num(tokens)} | {_hours(secs / 3600)} / {est_time} | "
            f"{_num(tps)} | {_num(mfu, '.1%')} | ${_num(m.get('dollars'), ',.2f')} | ${est_dollars} |")


def restart_lines(events: list[dict]) -> list[str]:
    """The report's list of worker group restarts (trainer/restarts.py), one bullet each."""
    from trainer.restarts import describe

    if not events:
        return []
    return ["", "Restarts (restarts.json; a worker group restart redoes the steps since its checkpoint):", ""] + [
        f"{i}. {e['stage']}, {'a new attempt' if e['kind'] == 'attempt' else 'worker group'}: {describe(e)}"
        for i, e in enumerate(events, 1)]


def render(d: dict, curves: list[str] | tuple[str, ...] = (), curves_note: str | None = None) -> str:
    """report.md from `gather`'s dict; `curves`: the PNG files beside it to link (trainer/plots.py)."""
    sp, mo, est = d["spec"], d["model"], d["estimate"]
    # Every stored string goes through _md/_cell/_code: report.html renders it as text, never as markup.
    out = [f"# Run report: {_md(d['run'])}", "",
           f"Status **{_md(d['status'])}** · d{_md(sp['depth'])} on {_md(sp['gpus'])} x {_md(sp['gpu_type'])} · "
           f"{_code(d['url'])}", "",
           "## Plan", "",
           f"- model: {mo['n_layer']} layers, {mo['n_embd']} wide, {mo['n_head']} heads, vocab {mo['vocab_size']:,}, "
           f"context {mo['seq_len']}, windows {_md(mo['window_pattern'])}; {mo['params']:,} parameters "
           f"({mo['scaling_params']:,} scaling), {mo['flops_per_token']:.4g} FLOPs/token",
           f"- recipe: ratio {_md(sp['ratio'])} tokens per scaling parameter, "
           + ("float32 (CPU)" if sp["gpu_type"] == "cpu" else _md(sp["precision"])),
           f"- estimate: {_hours(est['total_hours'])} ({_hours(est['train_hours'])} training), "
           f"${est['total_dollars']:,.2f} at ${est['price_per_gpu_hour']:.2f}/GPU-h, "
           f"{est['tokens_per_second']:,.0f} tok/s at {est['mfu']:.0%} MFU ({_md(est['mfu_source'])})", "",
           "## Measured against the estimate", "",
           "| stage | status | steps | tokens | time / estimate | tok/s | MFU | $ | $ estimate |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += [_measured_row(name, s, d) for name, s in d["stages"].items()]
    t = d["totals"]
    if t:
        out += ["", f"Whole run: {t.get('tokens', 0):,} tokens trained in {_hours(t.get('hours'))} "
                    f"(estimate {_hours(t['estimate']['total_hours'])}), ${t.get('dollars', 0):,.2f} "
                    f"(estimate ${t['estimate']['total_dollars']:,.2f})."]
    sd = d.get("spend")
    if sd and sd.get("dropped"):
        out += ["", f"spend.json: {sd['dropped']} malformed row(s) dropped; the figures below count the others."]
    if sd:
        out += ["", f"Paid across {sd['attempts']} attempt(s) ({sd['restarts']} restart(s), spend.json"
                    + (", so far" if sd["running"] else "") + f"): {sd['gpu_seconds'] / 3600:,.2f} GPU-hours, "
                    f"${sd['dollars']:,.2f} against the estimate ${est['total_dollars']:,.2f}"
                    + (f"; {_hours(sd['lost_hours'])} of it lost to restarts and start-up (paid, not kept)"
                       if sd.get("lost_hours") is not None else "") + "."]
    out += restart_lines(d.get("restarts") or [])
    out += ["", "tok/s and MFU are wall-clock averages over the stage (evaluations and checkpoints included), "
                "against the plan's peak per GPU" + (" (a nominal CPU peak on local runs)" if sp["gpu_type"] == "cpu"
                                                     else "") + ". The eval stage's tokens are those of its bpb "
                "passes (CORE's are not counted); its steps are the models it scored."]

    out += ["", "## Loss and bits per byte", "",
            "| model | stage | train loss (EMA) | val bpb | unigram bpb (same tokens) |", "|---|---|---|---|---|"]
    models = (d["eval"] or {}).get("models", {})
    for name, model in (("base", "pretrain"), ("chat", "sft")):
        m = d["stages"].get(model, {}).get("measured")
        ev = models.get(name)
        if m is None and ev is None:
            continue
        bpb = ev["val_bpb"] if ev else (m or {}).get("val_bpb")
        history = (m or {}).get("loss_history")  # debiased EMA at each log (trainer/loop.py); older runs: the raw EMA
        loss = history[-1][1] if history else (m or {}).get("train_loss_ema")
        uni = (ev or {}).get("unigram_bpb")
        out.append(f"| {name} | {model} | {_num(loss, '.4f')} | {_num(bpb, '.4f')} | {_num(uni, '.4f')} |")
    if models:
        out += ["", "val bpb: the eval stage's figure on the stage's validation tokens (the same definition and "
                    "tokens as training's val pass). Unigram bpb: the same tokens priced by their own frequencies "
                    "alone, the best a model that ignores context can do; the gap below it is what the model "
                    "learned from context."]

    if curves or curves_note:
        out += ["", "## Curves", ""]
        titles = {"loss.png": "Training loss (EMA) by step", "bpb.png": "Validation bits per byte at each eval"}
        out += [f"![{titles.get(c, c)}]({c})" for c in curves] or [curves_note]

    out += ["", "## CORE", ""]
    core = models.get("base", {}).get("core")
    if core is None:
        out.append("CORE not measured: " + ("the run has no eval stage results yet." if not d["eval"]
                                            else "no base model was evaluated."))
    elif "skipped" in core:
        out.append(f"CORE not measured: {_md(core['skipped'])}")
    else:
        if core.get("smoke_test"):
            out += [f"> {SMOKE_NOTE}", ""]
        out += ["| task | type | shots | examples | accuracy | random baseline | centered |",
                "|---|---|---|---|---|---|---|"]
        for label, r in core["tasks"].items():
            out.append(f"| {_cell(label)} | {_cell(r['type'])} | {_cell(r['shots'])} | {_cell(r['examples'])} | "
                       f"{r['accuracy']:.4f} | "
                       f"{r['baseline'] / 100:.2f} | {r['centered']:.4f} |")
        refs = ", ".join(f"{n} {v:.4f}" for n, v in GPT2_CORE)
        out += ["", f"**CORE {core['core']:.4f}** (mean centered accuracy over {len(core['tasks'])} tasks; "
                    f"bundle {_code(core['bundle'])}). Reference: {refs} (the speedrun's target)."]

    lm = (d["eval"] or {}).get("lm_eval")
    if isinstance(lm, dict):  # the eval stage's lm-eval-harness pass, when the plan asked for one (--lm-eval)
        out += ["", "## lm-eval-harness", ""]
        if "skipped" in lm:
            out.append(f"lm-eval not measured: {_md(lm['skipped'])}")
        else:
            out += ["| task | metric | value |", "|---|---|---|"]
            out += [f"| {_cell(task)} | {_cell(metric)} | {value:.4f} |" for task, metric, value in lm_eval_scores(lm)]
            out += ["", f"On the {_md(lm.get('stage'))} model (step {_md(lm.get('step'))}) through its Hugging Face "
                        "export (docs/export.md)."]

    out += ["", "## Samples", ""]
    if not models:
        out.append("No samples: the eval stage has not run.")
    for name, title in (("base", "Base model"), ("chat", "Chat model")):
        m = models.get(name)
        if not m or not m.get("samples"):
            continue
        out += [f"### {title} ({_md(m['stage'])} step {_md(m['step'])}, greedy)", ""]
        if name == "base":
            out += ["| prompt | continuation |", "|---|---|"]
            out += [f"| {_cell(s['prompt'])} | {_cell(s['completion'])} |" for s in m["samples"]]
        else:
            for s in m["samples"]:
                out += [f"**user:** {_cell(s['prompt'])}  ", f"**assistant:** {_cell(s['reply'])}", ""]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def lm_eval_scores(lm: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) from results.json's `lm_eval` (trainer/eval_stage.py); a stored file, so only
    numbers under dicts are kept."""
    results = lm.get("results")
    return [(task, metric, value) for task, metrics in (results.items() if isinstance(results, dict) else ())
            if isinstance(metrics, dict) for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def _gain(bpb: float, unigram: float) -> str:
    share = 1 - bpb / unigram
    return f"{share:.0%} fewer bits" if share >= 0 else f"{-share:.0%} more bits: not yet past the baseline"


def card(d: dict, *, samples: int = 2) -> str:
    """The report card's summary for a console: status and time, bpb against the unigram baseline, CORE,
    lm-eval's scores when measured, and a few samples (report.md has everything)."""
    t, models = d["totals"] or {}, (d["eval"] or {}).get("models", {})
    lines = [f"run {d['run']}: {d['status']}, {t.get('tokens', 0):,} tokens trained in {_hours(t.get('hours'))}"
             + (f", ${t['dollars']:,.2f}" if t.get("dollars") else "")]
    for name, stage in (("base", "pretrain"), ("chat", "sft")):
        ev = models.get(name)
        if ev:
            uni = ev.get("unigram_bpb")
            lines.append(f"  {name} model ({stage} step {ev['step']}): val bpb {ev['val_bpb']:.3f}"
                         + (f" vs {uni:.3f} for a unigram model of the same tokens ({_gain(ev['val_bpb'], uni)})"
                            if uni else ""))
    core = models.get("base", {}).get("core") or {}
    if "core" in core:
        lines.append(f"  CORE {core['core']:.4f}" + (" (smoke-test bundle: checks the pipeline, not a capability "
                                                      "score)" if core.get("smoke_test") else ""))
    lm = (d["eval"] or {}).get("lm_eval")
    if isinstance(lm, dict) and lm_eval_scores(lm):
        lines.append(f"  lm-eval ({_cell(lm.get('stage'))} step {_cell(lm.get('step'))}): "
                     + ", ".join(f"{_cell(t)} {_cell(m)} {v:.4f}" for t, m, v in lm_eval_scores(lm)))
    for name, key in (("base", "completion"), ("chat", "reply")):
        for smp in (models.get(name, {}).get("samples") or [])[:samples]:
            text = _cell(smp[key])
            lines.append(f"  {name}: {_cell(smp['prompt'])!r} -> {text[:100] + ('…' if len(text) > 100 else '')!r}")
    return "\n".join(lines)


def to_html(markdown: str, images: dict[str, bytes], title: str) -> str:
    """report.html: the report's markdown as one self-contained page, each linked image embedded as a base64
    data URI; no script, no stylesheet or font from the network.

    Stored text is data, not markup, three times over: `render` escapes every stored string's Markdown; the
    Markdown is rendered with raw HTML off (`html: False`: a `<script>` in a sample is shown as text) and
    markdown-it's link check (no `javascript:`, `vbscript:`, `file:` or non-image `data:` URL); and the page
    carries a Content-Security-Policy that allows no script, frame, form, base URL or fetch at all: only
    its own stylesheet (by hash) and images embedded as `data:` URIs."""
    import base64
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    for name, png in images.items():
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        body = body.replace(f'src="{name}"', f'src="{uri}"')
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{html_csp()}\">"
            f"<meta name=\"referrer\" content=\"no-referrer\"><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head>\n<body>\n{body}</body></html>\n")


def html_csp() -> str:
    """report.html's Content-Security-Policy: nothing but its own inline stylesheet and data: images."""
    import base64
    import hashlib

    style = base64.b64encode(hashlib.sha256(HTML_STYLE.encode()).digest()).decode()
    return (f"default-src 'none'; img-src data:; style-src 'sha256-{style}'; script-src 'none'; object-src 'none'; "
            "frame-src 'none'; base-uri 'none'; form-action 'none'")


HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;"
              "background:#fff;line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
              "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}"
              "img{max-width:100%;display:block;margin:1em 0}blockquote{border-left:4px solid #ddd;margin:1em 0;"
              "padding:.2em 1em;color:#555}code{background:#f5f5f5;padding:0 .2em}")


def write_report(run_url: str, storage_options: dict | None = None) -> str:
    """Write `<run>/report.md`, `report.json`, the curves (`loss.png`, `bpb.png`: trainer/plots.py) and the
    self-contained `report.html` from what the run left behind; return the markdown."""
    return write_report_files(run_url, storage_options)["report.md"]


def write_report_files(run_url: str, storage_options: dict | None = None) -> dict[str, str]:
    """`write_report`, returning {file name: text} of report.json, report.md and report.html as written (so
    `llmctl report --open` opens the page it built, never a stored one)."""
    url = run_url.rstrip("/")
    d = gather(url, storage_options)
    try:
        from trainer.plots import write_curves

        images, note = write_curves(url, d, storage_options), None
    except ImportError:  # the CLI-only install: no matplotlib
        images, note = {}, "Curves need matplotlib: `pip install 'llmctl[train]'`, then `llmctl report RUN --refresh`."
    text = render(d, curves=list(images), curves_note=note)
    files = {"report.json": json.dumps(d, indent=2), "report.md": text,
             "report.html": to_html(text, images, f"Run report: {d['run']}")}
    for name, body in files.items():
        write_text(f"{url}/{name}", body, storage_options)
    return files

"""What a run's storage says about it, for `llmctl status`: progress (`<run>/progress.json`, written by rank 0
at each checkpoint, trainer/progress.py) and spend (`<run>/spend.json`, the launcher's ledger of attempts,
trainer/spend.py), worker group restarts (`<run>/restarts.json`, trainer/restarts.py) and the experiment-tracker
runs (`<run>/tracking.json`, trainer/tracking.py), all read as untrusted documents. Reading storage instead of the RayJob means no pod
needs a Kubernetes API token; reading the ledger means spend counts every attempt, where KubeRay's
`status.startTime` is reset by each retry.
"""

from __future__ import annotations

import datetime

from cli.console import clean, fmt_hours


def storage_options_for_cli(url: str) -> dict | None:
    """fsspec options for reading a run's storage from the CLI: the environment's S3 endpoint, and short
    timeouts with one retry, so an unreachable bucket costs `status` seconds, not minutes."""
    if not url.startswith(("s3://", "s3a://")):
        return None
    from trainer.storage import storage_options_from_env

    return {**storage_options_from_env(), "config_kwargs": {"connect_timeout": 5, "read_timeout": 10,
                                                             "retries": {"max_attempts": 2}}}


def add_storage_view(s: dict, now: datetime.datetime | None = None) -> dict:
    """Fill `s` (a `summary`) from the run's storage: progress (progress.json, written by rank 0 at each
    checkpoint) and spend (spend.json, the launcher's ledger of attempts), both read as untrusted documents
    (trainer/progress.py, trainer/spend.py). Spend then counts every attempt: KubeRay resets status.startTime
    on each retry, so the wall clock alone forgets the earlier ones. A storage that cannot be read becomes
    `storage_error` (a warning), never a failure of `status`."""
    from trainer.progress import read_progress
    from trainer.spend import lost_seconds, parse_iso, read_spend

    now = now or datetime.datetime.now(datetime.timezone.utc)
    url = s.get("storage")
    if not url or not isinstance(url, str) or "://" not in url:
        return s
    opts = storage_options_for_cli(url)
    from trainer.restarts import counts, read_restarts_or_none

    from trainer.tracking import read_tracking

    spend, events = None, []
    try:
        s["progress"] = read_progress(url, opts)
        spend = read_spend(url, opts)
        s["restarts"] = events = read_restarts_or_none(url, opts)
        s["tracking"] = read_tracking(url, opts)
    except Exception as e:  # noqa: BLE001 - any storage failure is a warning here (auth, network, bad file)
        s["storage_error"] = clean(f"{type(e).__name__}: {e}", limit=300)
    prog = s["progress"] or {}
    gpus, price = s["gpus"], s["price_per_gpu_hour"]
    rows = (spend or {}).get("attempts") or []
    live = rows[-1] if rows and rows[-1]["state"] == "running" else None  # its `gpus`: the size it runs at now
    candidates = [prog.get("spent_gpu_seconds") or 0.0]
    if s["elapsed_hours"] is not None:  # this attempt's wall clock (KubeRay's startTime)
        candidates.append(s["elapsed_hours"] * 3600 * (live["gpus"] if live else gpus))
    if rows:
        candidates.append(spend["totals"]["gpu_seconds"])
        if live and s["elapsed_hours"] is not None:  # the ledger, plus the live clock past its last heartbeat
            ahead = max(0.0, s["elapsed_hours"] * 3600 - live["seconds"])
            candidates.append(spend["totals"]["gpu_seconds"] + ahead * live["gpus"])
        last = parse_iso(rows[-1]["last"])
        s["spend"] = dict(spend["totals"], **counts(spend["totals"]["attempts"], events),
                          last_heartbeat=rows[-1]["last"],
                          heartbeat_age_seconds=(now - last).total_seconds() if last else None)
        lost = lost_seconds(spend, prog.get("kept_seconds"))
        s["lost_hours"] = None if lost is None else lost / 3600
    spent = max(candidates)
    s["spent_gpu_seconds"] = spent if (spent or s["elapsed_hours"] is not None or spend) else None
    if s["spent_gpu_seconds"] is not None and price is not None:
        s["spent_dollars"] = s["spent_gpu_seconds"] / 3600 * price
    return s


def tracking_lines(refs: list[dict] | None) -> list[str]:
    """One line per experiment-tracker run (trainer/tracking.py `read_tracking`, already validated): the tracker,
    the run's name there and its link (or where it went, where there is no page: a file store, W&B offline)."""
    return [clean(f"{r['kind']} run {r.get('name') or r['run_id']}: {r.get('link') or r['target']}", limit=600)
            for r in refs or []]


def local_summary(url: str, opts: dict | None, now: datetime.datetime | None = None) -> dict:
    """A run's status from its storage alone (`llmctl status RUN --local`: a laptop run, or any run whose
    storage you can read): the plan's estimate, progress, the spend ledger and the run summary, all read
    bounded and validated. The state: succeeded/stopped from summary.json; else running while the ledger's
    last attempt heartbeats, else interrupted."""
    from trainer.plan import stored_plan
    from trainer.progress import read_progress
    from trainer.restarts import counts, read_restarts_or_none
    from trainer.spend import HEARTBEAT_SECONDS, lost_seconds, parse_iso, read_spend
    from trainer.storage import read_small_json
    from trainer.tracking import read_tracking

    now = now or datetime.datetime.now(datetime.timezone.utc)
    plan = read_small_json(f"{url}/plan.json", 1024 * 1024, opts)
    if plan is None:
        return {}
    plan = stored_plan.plan_object(plan)  # untrusted: an object, with a run's name and known stages (StoredPlanError)
    stored_plan.run_name(plan)
    stored_plan.stage_names(plan)
    summary = read_small_json(f"{url}/summary.json", 1024 * 1024, opts)
    summary = summary if isinstance(summary, dict) else {}
    progress, spend, events = read_progress(url, opts), read_spend(url, opts), read_restarts_or_none(url, opts)
    est = plan.get("estimate") if isinstance(plan.get("estimate"), dict) else {}
    spec = plan.get("spec") if isinstance(plan.get("spec"), dict) else {}
    state = {"completed": "succeeded", "stopped": "stopped"}.get(summary.get("status"))
    rows = (spend or {}).get("attempts") or []
    if state is None:
        last = parse_iso(rows[-1]["last"]) if rows else None
        alive = rows and rows[-1]["state"] == "running" and last and \
            (now - last).total_seconds() < 3 * HEARTBEAT_SECONDS
        state = "running" if alive else "interrupted" if rows else "not started"
    kept = progress.get("kept_seconds") if progress else None
    hours = summary.get("hours")
    if isinstance(hours, (int, float)) and not isinstance(hours, bool):
        kept = hours * 3600
    lost = lost_seconds(spend, kept)

    def num(d: dict, key: str):
        v = d.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return {"name": clean(plan.get("name") or url.rsplit("/", 1)[-1], limit=64), "storage": url, "state": state,
            "gpus": spec.get("gpus") if isinstance(spec.get("gpus"), int) else None,
            "gpu_type": clean(spec.get("gpu_type") or "?", limit=64), "progress": progress,
            "spend": (spend or {}).get("totals"), "spent_dollars": (spend or {}).get("totals", {}).get("dollars"),
            "attempts": counts(len(rows), events)["attempts"], "restarts": events,
            "lost_hours": None if lost is None else lost / 3600,
            "estimate_dollars": num(est, "total_dollars"), "estimate_hours": num(est, "total_hours"),
            "tracking": read_tracking(url, opts)}


def cmd_status_local(args) -> int:
    """`llmctl status RUN --local [--storage URL]`: print `local_summary` (table or JSON)."""
    import json

    from cli.errors import UsageError
    from trainer.storage import run_url

    url = run_url(args.run, args.storage or "file://~/.cache/llmctl")
    opts = None
    if url.startswith(("s3://", "s3a://")):
        from trainer.storage import storage_options_from_env

        opts = storage_options_from_env()
    try:
        s = local_summary(url, opts)
    except (ValueError, OSError) as e:
        raise UsageError(f"status: cannot read the run at {url}: {clean(e, limit=300)}") from None
    if not s:
        raise UsageError(f"status: no run at {url} (no plan.json there)")
    if args.output == "json":
        print(json.dumps(s, indent=2))
        return 0
    rows = [("run", f"{s['name']} ({url})"), ("state", s["state"])]
    prog = s["progress"] or {}
    if prog.get("step") is not None and prog.get("steps"):
        rows.append(("progress", f"{prog.get('stage', 'step')} step {prog['step']:,} / {prog['steps']:,} "
                                 f"({prog['step'] / prog['steps']:.0%})"
                     + (f", ETA {fmt_hours(prog['eta_seconds'] / 3600)}" if prog.get("eta_seconds") is not None
                        and s["state"] == "running" else "")))
    cost = []
    if s["spend"]:
        sp = s["spend"]
        cost.append(f"${sp['dollars']:,.2f} over {s['attempts']} attempt(s), {sp['gpu_seconds'] / 3600:,.2f} GPU-h"
                    + (f", {fmt_hours(s['lost_hours'])} not kept (restarts, start-up)"
                       if s["lost_hours"] is not None else ""))
    if s["estimate_dollars"] is not None:
        cost.append(f"estimate ${s['estimate_dollars']:,.2f}")
    if cost:
        rows.append(("cost", ", ".join(cost)))
    if s["restarts"] or s["attempts"] > 1:
        from trainer.restarts import describe

        rows.append(("restarts", f"{s['attempts']} attempt(s) ({s['attempts'] - 1} restart(s))"))
        rows += [("", f"{e['stage']}: {describe(e)}") for e in s["restarts"][-5:]]  # the latest few
    rows += [("tracking", line) for line in tracking_lines(s["tracking"])]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0

"""What a run's storage says about it, for `llmctl status`: progress (`<run>/progress.json`, written by rank 0
at each checkpoint, trainer/progress.py) and spend (`<run>/spend.json`, the launcher's ledger of attempts,
trainer/spend.py), both read as untrusted documents. Reading storage instead of the RayJob means no pod
needs a Kubernetes API token; reading the ledger means spend counts every attempt, where KubeRay's
`status.startTime` is reset by each retry.
"""

from __future__ import annotations

import datetime

from trainer.progress import clean_text as _clean


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
    spend = None
    try:
        s["progress"] = read_progress(url, opts)
        spend = read_spend(url, opts)
    except Exception as e:  # noqa: BLE001 - any storage failure is a warning here (auth, network, bad file)
        s["storage_error"] = _clean(f"{type(e).__name__}: {e}", 300)
    prog = s["progress"] or {}
    gpus, price = s["gpus"], s["price_per_gpu_hour"]
    candidates = [prog.get("spent_gpu_seconds") or 0.0]
    if s["elapsed_hours"] is not None:
        candidates.append(s["elapsed_hours"] * 3600 * gpus)  # this attempt's wall clock (KubeRay's startTime)
    if spend and spend["attempts"]:
        rows = spend["attempts"]
        candidates.append(spend["totals"]["gpu_seconds"])
        if rows[-1]["state"] == "running" and s["elapsed_hours"] is not None:  # earlier rows + the live clock
            earlier = sum(a["seconds"] * a["gpus"] for a in rows[:-1])
            candidates.append(earlier + s["elapsed_hours"] * 3600 * gpus)
        last = parse_iso(rows[-1]["last"])
        s["spend"] = dict(spend["totals"], last_heartbeat=rows[-1]["last"],
                          heartbeat_age_seconds=(now - last).total_seconds() if last else None)
        lost = lost_seconds(spend, prog.get("kept_seconds"))
        s["lost_hours"] = None if lost is None else lost / 3600
    spent = max(candidates)
    s["spent_gpu_seconds"] = spent if (spent or s["elapsed_hours"] is not None or spend) else None
    if s["spent_gpu_seconds"] is not None and price is not None:
        s["spent_dollars"] = s["spent_gpu_seconds"] / 3600 * price
    return s

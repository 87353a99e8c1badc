"""Serve soak: bounded concurrent load on loopback, hostile requests mixed in .

Serves a tiny freshly initialised run (tests/serve_app.py `tiny_run`: depth 2, context 128) through
trainer/serve/app.py `start_local` (what `llmctl serve --local` runs), one replica with --max-batch 16 and
--max-queue 64, then runs `--clients` asyncio clients back to back for `--seconds`. Each request is drawn from:

    good      55%  chat, 32 tokens, sampled               -> 200 (or 503 when busy)
    stream    15%  the same, streamed to [DONE]           -> 200
    abandon    5%  streamed, the connection closed after the first event
    badjson    5%  `{not json`                            -> 400
    deep       3%  JSON nested 100,000 deep               -> 400
    seed       3%  seed 2**64                             -> 400
    many       5%  20,001 chat messages (~580 KB)         -> 400
    huge       4%  a 1.1 MiB body                         -> 413
    plain      5%  text/plain body                        -> 415

Prints (JSON) p50/p99 latency of the good and streamed requests, generated tokens/s, answers by kind and status,
5xx answers to client errors (must be 0), the replica's restarts (the replica process changing: must be 0),
and the replica's resident memory at the start (after a warm-up) and at the end.

Run: .venv/bin/python bench/serve_soak.py [--clients 64] [--seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = [("good", 55), ("stream", 15), ("abandon", 5), ("badjson", 5), ("deep", 3), ("seed", 3), ("many", 5),
         ("huge", 4), ("plain", 5)]
CLIENT_ERRORS = {"badjson", "deep", "seed", "many", "huge", "plain"}


def body_of(kind: str, rng: random.Random) -> tuple[bytes, str]:
    chat = {"messages": [{"role": "user", "content": f"question {rng.randrange(10 ** 6)} about the fox"}],
            "max_tokens": 32, "temperature": 1.0}
    if kind in ("stream", "abandon"):
        chat["stream"] = True
    if kind == "badjson":
        return b"{not json", "application/json"
    if kind == "deep":
        return b"[" * 100_000 + b"]" * 100_000, "application/json"
    if kind == "seed":
        chat["seed"] = 2 ** 64
    if kind == "many":
        chat["messages"] = [{"role": ("user", "assistant")[i % 2], "content": ""} for i in range(20_001)]
        return json.dumps(chat, separators=(",", ":")).encode(), "application/json"
    if kind == "huge":
        chat["messages"][0]["content"] = "x" * (1 << 20) + "y" * 100_000
    return json.dumps(chat).encode(), "text/plain" if kind == "plain" else "application/json"


def replica():
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:llmctl:LLMServer" in part for part in (p.info["cmdline"] or [])):
            return p
    return None


async def soak(url: str, clients: int, seconds: float) -> dict:
    import aiohttp

    rng = random.Random(0)
    names, weights = zip(*KINDS)
    statuses: collections.Counter = collections.Counter()
    latency: list[float] = []
    tokens = 0
    stop_at = time.perf_counter() + seconds

    async def one(session, kind):
        nonlocal tokens
        body, ctype = body_of(kind, rng)
        t0 = time.perf_counter()
        try:
            async with session.post(url + "/v1/chat/completions", data=body,
                                    headers={"Content-Type": ctype}) as r:
                if kind == "abandon" and r.status == 200:
                    await r.content.readline()
                    r.close()  # the client goes away mid-stream
                    statuses[(kind, "closed")] += 1
                    return
                raw = await r.read()
                statuses[(kind, r.status)] += 1
                if r.status == 200 and kind == "good":
                    tokens += json.loads(raw)["usage"]["completion_tokens"]
                    latency.append(time.perf_counter() - t0)
                elif r.status == 200 and kind == "stream":
                    tokens += sum(1 for line in raw.split(b"\n\n") if b'"content"' in line)
                    latency.append(time.perf_counter() - t0)
                elif r.status >= 400:
                    json.loads(raw)["error"]  # every refusal in the API's shape
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as e:
            statuses[(kind, type(e).__name__)] += 1

    async def client():
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.perf_counter() < stop_at:
                await one(session, rng.choices(names, weights)[0])

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    lat = sorted(latency)
    return {"requests": sum(statuses.values()), "wall_s": round(wall, 1),
            "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
            "tokens_per_s": round(tokens / wall, 1),
            "answers": {f"{k} {s}": n for (k, s), n in sorted(statuses.items(), key=str)},
            "4xx": sum(n for (k, s), n in statuses.items() if isinstance(s, int) and 400 <= s < 500),
            "5xx": sum(n for (k, s), n in statuses.items() if isinstance(s, int) and s >= 500),
            "5xx_for_client_errors": sum(n for (k, s), n in statuses.items()
                                         if k in CLIENT_ERRORS and isinstance(s, int) and s >= 500)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=120)
    args = ap.parse_args()

    import torch
    from ray import serve

    from tests.serve_app import free_port, tiny_run
    from trainer.serve.app import start_local

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="llmctl-soak-")
    p = tiny_run(root)
    port = free_port()
    start_local({"run_url": p.urls["run"], "max_batch": 16, "max_queue": 64, "metrics_port": 0,
                 "cpus_per_replica": 1}, port=port, num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(soak(url, 8, 5))  # warm-up
        rep = replica()
        pids, rss_start = {rep.pid}, rep.memory_info().rss
        watch = {"stop": False}

        async def run():
            async def watcher():
                while not watch["stop"]:
                    r = replica()
                    if r is not None:
                        pids.add(r.pid)
                    await asyncio.sleep(2)
            w = asyncio.create_task(watcher())
            out = await soak(url, args.clients, args.seconds)
            watch["stop"] = True
            await w
            return out

        out = asyncio.run(run())
        end = replica()
        out |= {"clients": args.clients, "seconds": args.seconds, "replica_restarts": len(pids) - 1,
                "replica_rss_mb_start": round(rss_start / 2 ** 20), "replica_rss_mb_end":
                    round(end.memory_info().rss / 2 ** 20) if end else None}
        print(json.dumps(out, indent=1))
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

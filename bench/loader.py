"""Loader throughput vs raw tiktoken, measured in one run on the same text.

    .venv/bin/python bench/loader.py [--mb 16] [--vocab 32768] [--threads N] [--repeats 3]

1. builds a corpus offline (`build_sample_corpus`: Python's documentation text) and trains a tokenizer on it;
2. baseline: `tiktoken.Encoding.encode_ordinary_batch` over every train document, all in memory, with the same
   thread count the loader gets (tokens counted with one BOS per document, what a zero-waste packer would emit);
3. `PretrainLoader` over one epoch of the same shards (B=32, T=2048, one rank), read from local files and from
   S3 (moto's server in a separate process on loopback, through s3fs), from construction to the last batch.
Prints tokens/s of each, as a ratio to the baseline (goal >= 0.8), both for tokens yielded to the model and
for tokens processed (yielded + cropped), the medians of --repeats alternating runs, and what the rate per core
means against the per-GPU rate a d24 run needs (from trainer.plan).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.data import PretrainLoader, build_sample_corpus, list_shards  # noqa: E402
from trainer.plan import RunSpec, plan  # noqa: E402
from trainer.tokenizer import Tokenizer, iter_shard_texts  # noqa: E402

B, T = 32, 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):  # wait until it accepts connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("moto_server did not start")


def run_raw(tok: Tokenizer, texts: list[str], threads: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ids = tok.enc.encode_ordinary_batch(texts, num_threads=threads)
    dt = time.perf_counter() - t0
    return dt, sum(map(len, ids)) + len(texts)


def run_loader(url: str, tok: Tokenizer, threads: int, storage_options) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    with PretrainLoader(url, tok, batch_size=B, seq_len=T, epochs=1, tokenizer_threads=threads,
                        storage_options=storage_options) as loader:
        for _ in loader:
            pass
        dt = time.perf_counter() - t0
        return dt, loader.stats["tokens"], loader.stats["tokens"] + loader.stats["cropped_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=16.0, help="corpus size in MB of text")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="tokenizer threads (both sides)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    work = tempfile.mkdtemp(prefix="bench-loader-")
    proc = None
    try:
        local = os.path.join(work, "data")
        build_sample_corpus(local, mb=args.mb, shards=4)
        t0 = time.perf_counter()
        tok = Tokenizer.train_from_shards(local, args.vocab)
        print(f"corpus {args.mb:g} MB in {len(list_shards(local))} shards; tokenizer {tok.vocab_size} ids "
              f"trained in {time.perf_counter() - t0:.1f}s; {cores} cores, {args.threads} tokenizer threads")
        texts = list(iter_shard_texts(local))

        proc, endpoint = start_moto()
        opts = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
        import s3fs

        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("bench")
        for shard in list_shards(local):
            fs.put_file(shard, f"bench/data/{os.path.basename(shard)}")

        raw, loc, s3 = [], [], []
        for _ in range(args.repeats):  # alternate, so drift and noisy neighbours hit all three alike
            raw.append(run_raw(tok, texts, args.threads))
            loc.append(run_loader(local, tok, args.threads, None))
            s3.append(run_loader("s3://bench/data", tok, args.threads, opts))

        raw_rate = statistics.median(n / dt for dt, n in raw)
        print(f"\n{'source':<22}{'tokens/s':>12}{'ratio':>8}{'processed/s':>14}{'ratio':>8}{'per core':>12}")
        print(f"{'raw tiktoken batch':<22}{raw_rate:>12,.0f}{1:>8.2f}{raw_rate:>14,.0f}{1:>8.2f}{raw_rate / cores:>12,.0f}")
        rates = {}
        for name, runs in (("loader, local files", loc), ("loader, S3 (moto)", s3)):
            y = statistics.median(n / dt for dt, n, _ in runs)
            p = statistics.median(m / dt for dt, _, m in runs)
            rates[name] = y
            print(f"{name:<22}{y:>12,.0f}{y / raw_rate:>8.2f}{p:>14,.0f}{p / raw_rate:>8.2f}{y / cores:>12,.0f}")
        spread = [f"{min(n / dt for dt, n, *_ in r) / raw_rate:.2f}-{max(n / dt for dt, n, *_ in r) / raw_rate:.2f}"
                  for r in (loc, s3)]
        print(f"ratio spread over {args.repeats} runs: local {spread[0]}, S3 {spread[1]}")
        need = plan(RunSpec(depth=24, gpus=8)).estimate.tokens_per_second / 8
        worst = min(rates.values()) / cores
        print(f"\nd24 needs ~{need:,.0f} tokens/s per GPU (trainer.plan estimate); the slower loader gives "
              f"{worst:,.0f} tokens/s per core here, i.e. {worst / need:.1f}x a GPU's need per core")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

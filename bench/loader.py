"""Loader throughput vs raw tiktoken, measured in one run on the same text.

    .venv/bin/python bench/loader.py [--mb 16] [--vocab 32768] [--threads N] [--repeats 3]

1. builds a corpus offline (`build_sample_corpus`: Python's documentation text) and trains a tokenizer on it;
2. baseline: `tiktoken.Encoding.encode_ordinary_batch` over every train document, all in memory, with the same
   thread count the loader gets (tokens counted with one BOS per document, what a zero-waste packer would emit);
3. `PretrainLoader` over one epoch of the same shards (B=32, T=2048, one rank), read from local files and from
   S3 (moto's server in a separate process on loopback, through s3fs), from construction to the last batch.
Prints tokens/s of each as a ratio to the baseline run just before it (goal >= 0.8): for tokens yielded to the
model, for tokens processed (yielded + cropped by best-fit), and per CPU-second (less sensitive to a shared,
busy machine); medians of --repeats alternating runs, the spread, and what the rate per core means against
the per-GPU rate a d24 run needs (from trainer.plan).
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

from trainer.data.corpus import build_sample_corpus  # noqa: E402
from trainer.data.pretrain import PretrainLoader  # noqa: E402
from trainer.data.shards import list_shards  # noqa: E402
from trainer.plan import RunSpec, plan  # noqa: E402
from trainer.data.tokenizer import Tokenizer, iter_shard_texts  # noqa: E402

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


def run_raw(tok: Tokenizer, texts: list[str], threads: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    ids = tok.enc.encode_ordinary_batch(texts, num_threads=threads)
    n = sum(map(len, ids)) + len(texts)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "yielded": n, "processed": n}


def run_loader(url: str, tok: Tokenizer, threads: int, storage_options) -> dict:
    """One epoch from construction to the last batch. CPU time is this process's (all its threads); the
    S3 server's CPU is not counted, as a real object store runs elsewhere."""
    t0, c0 = time.perf_counter(), time.process_time()
    with PretrainLoader(url, tok, batch_size=B, seq_len=T, epochs=1, tokenizer_threads=threads,
                        storage_options=storage_options) as loader:
        for _ in loader:
            pass
        return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "yielded": loader.stats["tokens"],
                "processed": loader.stats["tokens"] + loader.stats["cropped_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=16.0, help="corpus size in MB of text")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="tokenizer threads (both sides)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    work = tempfile.mkdtemp(prefix="bench-loader-")
    moto = None
    try:
        local = os.path.join(work, "data")
        build_sample_corpus(local, mb=args.mb, shards=4)
        t0 = time.perf_counter()
        tok = Tokenizer.train_from_shards(local, args.vocab)
        print(f"corpus {args.mb:g} MB in {len(list_shards(local))} shards; tokenizer {tok.vocab_size} ids "
              f"trained in {time.perf_counter() - t0:.1f}s; {cores} cores, {args.threads} tokenizer threads")
        texts = list(iter_shard_texts(local))

        moto, endpoint = start_moto()
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

        def med(xs):
            return statistics.median(xs)

        raw_rate = med(r["yielded"] / r["wall"] for r in raw)
        print(f"\nmedians of {args.repeats} alternating runs; ratios are per run against the raw run just before it")
        print(f"{'source':<21}{'tokens/s':>11}{'ratio':>7}{'spread':>11}{'processed/s':>13}{'ratio':>7}"
              f"{'CPU ratio':>11}{'per core':>10}")
        print(f"{'raw tiktoken batch':<21}{raw_rate:>11,.0f}{1:>7.2f}{'':>11}{raw_rate:>13,.0f}{1:>7.2f}{1:>11.2f}"
              f"{raw_rate / cores:>10,.0f}")
        rates = {}
        for name, runs in (("loader, local files", loc), ("loader, S3 (moto)", s3)):
            wall = [(l["yielded"] / l["wall"]) / (r["yielded"] / r["wall"]) for l, r in zip(runs, raw)]
            prc = [(l["processed"] / l["wall"]) / (r["yielded"] / r["wall"]) for l, r in zip(runs, raw)]
            cpu = [(l["processed"] / l["cpu"]) / (r["yielded"] / r["cpu"]) for l, r in zip(runs, raw)]
            rate = med(l["yielded"] / l["wall"] for l in runs)
            rates[name] = rate
            print(f"{name:<21}{rate:>11,.0f}{med(wall):>7.2f}{f'{min(wall):.2f}-{max(wall):.2f}':>11}"
                  f"{med(l['processed'] / l['wall'] for l in runs):>13,.0f}{med(prc):>7.2f}{med(cpu):>11.2f}"
                  f"{rate / cores:>10,.0f}")
        waste = 1 - sum(l["yielded"] for l in loc) / sum(l["processed"] for l in loc)
        print(f"best-fit crop discarded {waste:.1%} of the tokens processed (T={T}; nanochat reports 34.6% on ClimbMix)")
        need = plan(RunSpec(depth=24, gpus=8)).estimate.tokens_per_second / 8
        worst = min(rates.values()) / cores
        print(f"\nd24 needs ~{need:,.0f} tokens/s per GPU (trainer.plan estimate); the slower loader gives "
              f"{worst:,.0f} tokens/s per core here, i.e. {worst / need:.1f}x a GPU's need per core")
    finally:
        if moto is not None:
            moto.kill()
            moto.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

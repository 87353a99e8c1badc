"""trainer/serve/batching.py: requests batched into shared decode steps give what each would get alone.

The reference is trainer/serve/engine.py's `Engine.generate` (itself tested against full recomputation in
tests/serve/test_engine.py), on the same random-weight GPT with 8-token sliding windows, so prompts of different
lengths sit at different positions and cross the window while they share steps.
Run: .venv/bin/pytest tests/serve/test_batching.py
"""

from __future__ import annotations

import threading

import pytest
import torch

from tests.serve.test_engine import prompt_of, random_model
from trainer.serve.batching import BatchEngine, QueueFull
from trainer.serve.engine import Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Collector:
    """Gathers one request's tokens and its finish reason; `done` is set when it finishes."""

    def __init__(self):
        self.tokens, self.finish, self.done = [], None, threading.Event()

    def __call__(self, token, finish):
        if token is not None:
            self.tokens.append(token)
        if finish is not None:
            self.finish = finish
            self.done.set()


def alone(model, prompt, n, stop=(), **kw):
    return Engine(model, stop_tokens=stop).generate_batch(prompt, max_tokens=n, **kw)[0]


@pytest.fixture(scope="module")
def model():
    return random_model(n_kv_head=2)


def run_together(engine, jobs):
    """Submit every job before the engine thread starts, so they all share steps from the first one."""
    outs = []
    for prompt, kw in jobs:
        c = Collector()
        engine.submit(prompt, emit=c, **kw)
        outs.append(c)
    engine.start()
    try:
        for c in outs:
            assert c.done.wait(120), "a request never finished"
    finally:
        engine.stop()
    return outs


def test_greedy_batched_equals_each_request_alone(model):
    jobs = [(prompt_of(n, seed=n), dict(max_tokens=m, temperature=0.0))
            for n, m in [(3, 30), (17, 12), (9, 25), (26, 20), (1, 8)]]
    engine = BatchEngine(model, max_len=128, max_batch=4)
    outs = run_together(engine, jobs)
    for (prompt, kw), c in zip(jobs, outs):
        assert c.tokens == alone(model, prompt, kw["max_tokens"], temperature=0.0)
        assert c.finish == "length"
    # 5 requests, 4 rows: the fifth joined when the first left; steps were shared, never one request at a time
    s = engine.stats
    assert s.prefills == 5 and s.max_rows == 4
    assert s.steps < sum(kw["max_tokens"] for _, kw in jobs) - 5
    assert s.rows == sum(kw["max_tokens"] - 1 for _, kw in jobs)  # every token but the prefill's, in a step


def test_sampling_with_seeds_matches_alone_and_stop_tokens_end_rows(model):
    prompt = prompt_of(12, seed=3)
    ref = alone(model, prompt, 40, temperature=1.0, top_k=20, seed=7)
    stop = ref[5]  # a token the sample produces: the row must stop just before it
    engine = BatchEngine(model, max_len=128, stop_tokens=[stop])
    outs = run_together(engine, [(prompt, dict(max_tokens=40, temperature=1.0, top_k=20, seed=7)),
                                 (prompt_of(5, seed=4), dict(max_tokens=40, temperature=0.0))])
    assert outs[0].tokens == ref[:ref.index(stop)] and outs[0].finish == "stop"
    assert stop not in outs[1].tokens


def test_bounds_and_queue(model):
    engine = BatchEngine(model, max_len=32, max_batch=2, max_queue=2)
    with pytest.raises(ValueError, match="exceed the context of 32"):
        engine.submit(prompt_of(30), max_tokens=3, emit=Collector())
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(prompt_of(3), max_tokens=0, emit=Collector())
    with pytest.raises(ValueError, match="prompt"):
        engine.submit([], max_tokens=3, emit=Collector())
    engine.submit(prompt_of(3), max_tokens=3, emit=Collector())
    engine.submit(prompt_of(3), max_tokens=3, emit=Collector())
    assert engine.queue_depth == 2
    with pytest.raises(QueueFull):
        engine.submit(prompt_of(3), max_tokens=3, emit=Collector())


def test_a_failing_step_fails_its_requests_and_the_engine_carries_on(model):
    engine = BatchEngine(model, max_len=64)
    bad = Collector()
    engine.submit([10**6], max_tokens=4, emit=bad)  # an id past the embedding table: the prefill raises
    engine.start()
    try:
        assert bad.done.wait(60) and bad.finish == "error"
        good = Collector()
        engine.submit(prompt_of(4), max_tokens=4, emit=good, temperature=0.0)
        assert good.done.wait(60) and good.finish == "length" and len(good.tokens) == 4
    finally:
        engine.stop()
    assert engine.stats.errors == 1


def test_cancelled_requests_leave_the_batch(model):
    engine = BatchEngine(model, max_len=128)
    gone, kept = Collector(), Collector()
    req = engine.submit(prompt_of(4), max_tokens=50, emit=gone, temperature=0.0)
    engine.submit(prompt_of(6), max_tokens=10, emit=kept, temperature=0.0)
    req.cancel()
    engine.start()
    try:
        assert kept.done.wait(60)
    finally:
        engine.stop()
    assert gone.tokens == [] and engine.stats.prefills == 1
    assert torch.is_tensor(engine.model.cos)


def test_a_consumer_that_raises_leaves_the_batch_alone(model):
    engine = BatchEngine(model, max_len=128)

    def broken(token, finish):
        raise RuntimeError("client gone")

    ok = Collector()
    engine.submit(prompt_of(5), max_tokens=10, emit=broken, temperature=0.0)
    engine.submit(prompt_of(7), max_tokens=10, emit=ok, temperature=0.0)
    engine.start()
    try:
        assert ok.done.wait(60)
    finally:
        engine.stop()
    assert ok.finish == "length" and len(ok.tokens) == 10 and engine.stats.errors == 0

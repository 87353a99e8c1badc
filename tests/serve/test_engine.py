"""trainer/serve/engine.py: KV-cache decoding equals full recomputation; sampling, seeds, limits and stop tokens.

The model is a small GPT whose every weight is drawn at random (the reference init zeroes the output
projections, which would leave attention out of the picture), with 8-token sliding windows on three of four
layers so that prompts of 20+ tokens cross the window boundary.
Run: .venv/bin/pytest tests/serve/test_engine.py
"""

import dataclasses

import pytest
import torch

from trainer.serve.engine import Engine, KVCache, sample_next, stream_text
from trainer.model import build_model
from trainer.plan.shape import architecture

VOCAB = 300
WINDOW = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_model(seed=0, *, n_kv_head=None, windows=(WINDOW, WINDOW, WINDOW, 128)):
    """A 4-layer GPT with random weights at unit-ish scale: logits spread far apart, every path contributes."""
    arch = architecture(4, vocab_size=VOCAB, seq_len=128, head_dim=32)
    arch = dataclasses.replace(arch, windows=windows, n_kv_head=n_kv_head or arch.n_kv_head)
    torch.manual_seed(seed)
    model = build_model(arch, "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # embeddings ~ N(0, 1); matrices ~ N(0, 1/fan_in)
                p.copy_(torch.randn_like(p) * (1.0 if "wte" in name or "value_embeds" in name else p.size(-1) ** -0.5))
            else:  # residual/x0/smear/backout scalars away from their init, so the smear and backout matter
                p.copy_(torch.rand_like(p) * 0.5 + 0.25)
    return model.eval()


def greedy_by_recompute(model, prompt, n):
    """The reference: run the whole sequence again for every new token."""
    seq, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([seq]))[0, -1]
            logits.append(last)
            seq.append(int(last.argmax()))
    return seq[len(prompt):], logits


def prompt_of(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


@pytest.mark.parametrize("n_kv_head", [None, 2], ids=["mha", "gqa"])
def test_greedy_with_cache_equals_full_recompute_across_the_window(n_kv_head):
    model = random_model(n_kv_head=n_kv_head)
    prompt = prompt_of(20)  # already past the 8-token window; 40 more tokens go far beyond it
    ref, ref_logits = greedy_by_recompute(model, prompt, 40)
    assert len(set(ref)) > 10, "a degenerate reference (one repeated token) would prove little"
    out = Engine(model).generate_batch(prompt, max_tokens=40, temperature=0.0)[0]
    assert out == ref
    # And the logits themselves, step by step through the cache.
    cache = KVCache.for_model(model, batch=1, max_len=60)
    with torch.no_grad():
        got = [model(torch.tensor([prompt]), kv_cache=cache)[0, -1]]
        got += [model(torch.tensor([[t]]), kv_cache=cache)[0, -1] for t in ref[:-1]]
    assert torch.allclose(torch.stack(got), torch.stack(ref_logits), atol=1e-4)
    assert cache.pos == 20 + 39


def test_the_cache_honours_sliding_windows_and_the_smear():
    """Negative controls: decoding with the windows ignored, or with the smear's previous embedding dropped,
    gives different logits, so the equality above is not vacuous."""
    model = random_model()
    prompt = prompt_of(24)
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0, -1]

        def last_logits(cache, drop_prev=False):
            model(torch.tensor([prompt[:-1]]), kv_cache=cache)
            if drop_prev:
                cache.prev_embedding = None
            return model(torch.tensor([prompt[-1:]]), kv_cache=cache)[0, -1]

        good = KVCache.for_model(model, batch=1, max_len=24)
        assert torch.allclose(last_logits(good), ref, atol=1e-4)
        wide = KVCache.for_model(model, batch=1, max_len=24)
        wide.windows = (128,) * 4
        assert not torch.allclose(last_logits(wide), ref, atol=1e-2)
        assert not torch.allclose(last_logits(KVCache.for_model(model, batch=1, max_len=24), drop_prev=True),
                                  ref, atol=1e-2)


def test_n_samples_come_from_one_prefill():
    model = random_model()
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(tuple(args[0].shape)), with_kwargs=True)
    prompt = prompt_of(16)
    rows = Engine(model).generate_batch(prompt, num_samples=6, max_tokens=10, temperature=1.0, seed=3)
    assert calls[0] == (1, 16)  # the prompt runs once, with batch 1 ...
    assert calls[1:] == [(6, 1)] * 9  # ... then one token per step for all six rows
    assert len(rows) == 6 and all(len(r) == 10 for r in rows)
    assert len({r[0] for r in rows}) > 1, "rows should differ from their very first token at T=1"
    greedy = Engine(model).generate_batch(prompt, num_samples=3, max_tokens=10, temperature=0.0)
    assert greedy[0] == greedy[1] == greedy[2] == greedy_by_recompute(model, prompt, 10)[0]


def test_seeds():
    model = random_model()
    engine, prompt = Engine(model), prompt_of(12)
    kw = dict(num_samples=2, max_tokens=24, temperature=1.0, top_k=50)
    assert engine.generate_batch(prompt, seed=7, **kw) == engine.generate_batch(prompt, seed=7, **kw)
    assert engine.generate_batch(prompt, seed=7, **kw) != engine.generate_batch(prompt, seed=8, **kw)
    # Temperature 0 ignores the seed entirely.
    kw0 = dict(max_tokens=24, temperature=0.0)
    assert engine.generate_batch(prompt, seed=1, **kw0) == engine.generate_batch(prompt, seed=2, **kw0)


def test_max_tokens_and_the_stop_token():
    model = random_model()
    prompt = prompt_of(12)
    ref, _ = greedy_by_recompute(model, prompt, 30)
    steps = list(Engine(model).generate(prompt, max_tokens=30, temperature=0.0))
    assert [c[0] for c in steps] == ref  # no stop token: exactly max_tokens steps
    stop = ref[6]
    first = ref.index(stop)  # the first time greedy decoding emits it
    engine = Engine(model, stop_tokens=[stop])
    streamed = [c[0] for c in engine.generate(prompt, max_tokens=30, temperature=0.0)]
    assert streamed == ref[:first + 1]  # the stop token is the last thing yielded
    assert engine.generate_batch(prompt, max_tokens=30, temperature=0.0) == [ref[:first]]
    # Generation never runs past the rotary table (10 x seq_len positions).
    limit = model.cos.size(1)
    assert len(Engine(model).generate_batch(prompt_of(limit - 3), max_tokens=50, temperature=0.0)[0]) == 3


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, g, temperature=0.0).tolist() == [1, 0]
    draws = torch.stack([sample_next(logits, g, temperature=1.0, top_k=2) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}  # only the two largest logits are ever drawn
    assert set(draws[:, 1].tolist()) <= {0, 1, 2, 3} and (draws[:, 1] == 0).sum() > 100
    assert sample_next(logits, g, temperature=1.0, top_k=1).tolist() == [1, 0]  # top-1 is argmax


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_samples=0), "num_samples"), (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        list(Engine(random_model()).generate(prompt_of(4), **kwargs))


def test_cache_capacity_and_replication():
    model = random_model()
    cache = KVCache.for_model(model, batch=1, max_len=5)
    with torch.no_grad():
        model(torch.tensor([prompt_of(5)]), kv_cache=cache)
        rep = cache.replicate(3)
        assert rep.batch == 3 and rep.pos == 5 and torch.equal(rep.k[:, 2], cache.k[:, 0])
        rep.k.zero_()
        assert cache.k.abs().sum() > 0  # a copy, not a view
        with pytest.raises(ValueError, match="exceed"):
            model(torch.tensor([[1]]), kv_cache=cache)


def test_stream_text_holds_back_split_characters():
    from trainer.data.tokenizer import Tokenizer

    text = "naïve café — 日本語のテキスト, ok? ünïcödé " * 20
    tok = Tokenizer.train([text, "plain ascii words here " * 50], 300)
    ids = tok.encode("日本語 café — naïve")
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)

"""trainer/eval_stage.py pieces that need no Ray: the unigram baseline's arithmetic, and the sample prompts per
dataset. (The eval stage itself runs in the session's finished run: tests/test_report.py, test_launch.py.)

Run: .venv/bin/pytest tests/test_eval_stage.py
"""

import math

import pytest
import torch

from tests.finished_run import tiny_plan
from trainer.eval_stage import BASE_PROMPTS, SAMPLE_BASE_PROMPTS, prompts_for, unigram_bpb


def test_unigram_bpb_is_the_entropy_of_the_tokens_own_frequencies_per_byte():
    token_bytes = torch.tensor([0, 1, 2, 3])  # id 0 is a special token: no bytes, not counted
    # Targets over two batches: id 1 x4, id 2 x2, id 3 x2; -1 (masked) and id 0 are skipped.
    batches = [(None, torch.tensor([[1, 1, 2, -1], [0, 3, 1, 2]])), (None, torch.tensor([[1, 3, 0, -1]]))]
    counts = {1: 4, 2: 2, 3: 2}
    n = sum(counts.values())
    bits = -sum(c * math.log2(c / n) for c in counts.values())
    nbytes = sum(c * int(token_bytes[t]) for t, c in counts.items())
    assert unigram_bpb(iter(batches), 2, token_bytes) == pytest.approx(bits / nbytes)
    assert math.isnan(unigram_bpb(iter([(None, torch.tensor([[-1, 0]]))]), 1, token_bytes))
    # One repeated token: nothing to learn, zero bits.
    assert unigram_bpb(iter([(None, torch.tensor([[2, 2, 2]]))]), 5, token_bytes) == 0


def test_sample_corpus_runs_get_prompts_from_its_domain():
    assert prompts_for(tiny_plan("file:///tmp/x"))[0] == SAMPLE_BASE_PROMPTS
    assert prompts_for(tiny_plan("file:///tmp/x", dataset="climbmix", sft_dataset="smoltalk"))[0] == BASE_PROMPTS

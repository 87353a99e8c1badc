"""trainer/run_loader.py and the readers behind it (stored plan, tokenizer, checkpoint): fuzzed with hypothesis
in a child whose address space is capped above what its imports took.

Run: .venv/bin/pytest tests/test_run_loader.py
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings, strategies as st

from cli.main import main
from tests.hostile import ESC, ROOT, plan_doc


READER_HEADROOM = 1 << 30  # address space a reader may add to the imports' own; a bomb needs far more


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=20)
                     | st.sampled_from(["../../x", "file:///etc", ESC, "s3://other/tokenizers/t"]),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=8)


def _mutate(doc, path: tuple, value):
    node = doc
    for k in path[:-1]:
        node = node[k] if isinstance(node, dict) and k in node else None
        if node is None:
            return doc
    if isinstance(node, dict):
        node[path[-1]] = value
    return doc


def test_hostile_fuzz_the_readers_with_bounded_memory():
    r = subprocess.run([sys.executable, "-c", "from tests.test_run_loader import fuzz_readers; fuzz_readers()"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0 and "readers fuzzed" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def fuzz_readers() -> None:  # runs in the capped child process (test_fuzz_the_readers_with_bounded_memory)
    import io
    import os
    import tempfile
    import contextlib

    import torch

    from trainer import checkpoint
    from trainer.plan import stored_plan as stored
    from trainer.plan import PlanError, RunPlan
    from trainer.data.tokenizer import BYTES_FILE, META_FILE, RANKS_FILE, Tokenizer, TokenizerError

    import resource

    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + READER_HEADROOM, vm + READER_HEADROOM))  # after the imports
    base = tempfile.mkdtemp()
    good = plan_doc(Path(base) / "root", "fz")
    plan_paths = [("arch", k) for k in good["arch"]] + [("spec", k) for k in good["spec"]] + [
        ("stages",), ("urls", "tokenizer"), ("name",), ("schema",), ("estimate", "mfu_source"), ("stages", 0)]

    @settings(max_examples=50, deadline=None, database=None)
    @given(path=st.sampled_from(plan_paths), value=_JSON)
    def plan_reader(path, value):
        doc = json.loads(json.dumps(good))
        if path == ("stages", 0):
            doc["stages"][0] = value
        else:
            _mutate(doc, path, value)
        text = json.dumps(doc)
        with contextlib.suppress(PlanError):
            RunPlan.from_json(text)
        for check in (stored.architecture, stored.stage_names,
                      lambda d: stored.tokenizer_url(d, f"file://{base}/root/runs/fz")):
            with contextlib.suppress(stored.StoredPlanError):
                check(doc)
        run = Path(base) / "root" / "runs" / "fz"
        run.mkdir(parents=True, exist_ok=True)
        (run / "plan.json").write_text(text)
        for argv in (["report", "fz", "--refresh"], ["chat", "fz", "--prompt", "hi"]):
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = main([*argv, "--storage", f"file://{base}/root"])
            assert rc in (0, 2) and "Traceback" not in err.getvalue(), (argv, path, value, err.getvalue())

    tok = Tokenizer.train([f"w{i} x{i % 7} the quick brown fox {i}" for i in range(300)], 300)
    tok_url = f"{base}/tok"
    tok.save(tok_url)
    files = {f: (Path(tok_url) / f).read_bytes() for f in (RANKS_FILE, BYTES_FILE, META_FILE)}
    lines = files[RANKS_FILE].splitlines()

    @settings(max_examples=60, deadline=None, database=None)
    @given(i=st.integers(0, len(lines) - 1), line=st.binary(max_size=40) | st.sampled_from(
        [b"AAA= 4000000000", b"AAA=", b"AAA= -1", b"AAA= 1 2", b"!!!! 3", b"QQ== 99999999999999999999"]),
        meta_key=st.sampled_from(["sha256", "pattern", "vocab_size", "special_tokens", "format", "name", None]),
        meta_value=_JSON, resum=st.booleans())
    def tokenizer_reader(i, line, meta_key, meta_value, resum):
        d = Path(tempfile.mkdtemp(dir=base))
        ranks = b"\n".join([*lines[:i], line, *lines[i + 1:]]) + b"\n"
        meta = json.loads(files[META_FILE])
        if resum:
            meta["sha256"][RANKS_FILE] = hashlib.sha256(ranks).hexdigest()
        if meta_key:
            meta[meta_key] = meta_value
        (d / RANKS_FILE).write_bytes(ranks)
        (d / BYTES_FILE).write_bytes(files[BYTES_FILE])
        (d / META_FILE).write_text(json.dumps(meta))
        with contextlib.suppress(TokenizerError):
            Tokenizer.load(str(d))

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    weights = buf.getvalue()
    good_meta = {"format": checkpoint.FORMAT, "step": 3, "stage": "sft", "world_size": 1, "run": "fz",
                 "loop_state": {}, "files": [checkpoint.MODEL_FILE]}

    @settings(max_examples=40, deadline=None, database=None)
    @given(key=st.sampled_from(sorted(good_meta) + [None]), value=_JSON | st.just(["../../../etc/passwd"]),
           model=st.sampled_from([weights, b"", b"PK\x03\x04junk", weights[: len(weights) // 2]]) | st.binary(max_size=64),
           raw=st.none() | st.text(max_size=40))
    def checkpoint_reader(key, value, model, raw):
        stage = Path(tempfile.mkdtemp(dir=base)) / "sft"
        d = stage / checkpoint.dir_name("sft", 3)
        d.mkdir(parents=True)
        meta = dict(good_meta, **({key: value} if key else {}))
        (d / checkpoint.META_FILE).write_text(raw if raw is not None else json.dumps(meta))
        (d / checkpoint.MODEL_FILE).write_bytes(model)
        found = checkpoint.latest(str(stage))
        if found is not None:
            with contextlib.suppress(checkpoint.CheckpointError):
                checkpoint.load_model_state(found)

    os.environ["KUBECONFIG"] = f"{base}/absent"
    plan_reader()
    tokenizer_reader()
    checkpoint_reader()
    print("readers fuzzed")


def test_a_tokenizer_smaller_than_the_model_vocabulary_bounds_what_the_model_emits():
    """A tokenizer trained on a small corpus holds fewer ids than the plan's vocabulary: the loaded model must
    never emit an id above the tokenizer's (chat would fail to decode it); a larger tokenizer is refused."""
    import pytest
    import torch

    from trainer.data.tokenizer import Tokenizer
    from trainer.model import build_model
    from trainer.plan.shape import architecture
    from trainer.run_loader import RunLoadError, match_vocabulary
    from trainer.serve.engine import Engine

    tok = Tokenizer.train(["the cat sat on the mat, " * 20, "def f(x):\n    return x * 2\n" * 20], vocab_size=300)
    torch.manual_seed(0)
    model = build_model(architecture(1, vocab_size=512, seq_len=64), "cpu", compile=False)
    with torch.no_grad():
        model.lm_head.weight[400].fill_(1.0)  # id 400, beyond the tokenizer, wins often
    prompt = tok.encode("the cat", prepend_bos=True)
    assert max(Engine(model).generate_batch(prompt, max_tokens=4, temperature=0.0)[0]) >= tok.vocab_size  # the failure
    match_vocabulary(model, tok)
    out = Engine(model).generate_batch(prompt, max_tokens=8, temperature=0.0)[0]
    assert max(out) < tok.vocab_size and isinstance(tok.decode(out), str)
    with pytest.raises(RunLoadError, match="not this run's tokenizer"):
        match_vocabulary(build_model(architecture(1, vocab_size=280, seq_len=64), "cpu", compile=False), tok)

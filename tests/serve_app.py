"""A served model for the serve tests: a tiny run built in-test, on Ray Serve on the local Ray cluster, once per session.

`tiny_run(root)` writes a run in the layout `llmctl serve` reads (plan.json, the tokenizer, one whole SFT and
one pretrain checkpoint) whose model is a freshly initialised depth-2 GPT: the API does not care what the
weights know. `served` (session scope; tests/serve/test_app.py and tests/serve/test_page.py share it, because
Ray Serve takes tens of seconds to start on two cores) serves it through `trainer.serve.start_local`, exactly
what `llmctl serve --local` runs, on a free port, with the metrics server on a free port as well.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import urllib.request

import pytest

from trainer.plan import RunSpec, plan

SPEC = dict(depth=2, gpus=1, gpu_type="cpu", vocab_size=512, seq_len=128, head_dim=64, device_batch_size=4,
            total_batch_size=4 * 128, num_iterations=4, sft_tokens=4 * 128 * 2, dataset="sample",
            sft_dataset="sample-sft", tokenizer="tiny-512")
TEXT = ("The quick brown fox jumps over the lazy dog. Kubernetes schedules pods onto nodes. "
        "Ray Serve routes requests to replicas. A small model still answers, if not wisely. ") * 40


@dataclasses.dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    model: str
    run_url: str

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(root, name: str = "tiny") -> "plan":
    import torch

    from trainer import checkpoint
    from trainer.launch import write_plan
    from trainer.model import build_model
    from trainer.data.tokenizer import Tokenizer

    p = plan(RunSpec(storage_root=f"file://{root}", name=name, stages=("pretrain", "sft"), **SPEC))
    write_plan(p, {})
    Tokenizer.train([TEXT], vocab_size=SPEC["vocab_size"]).save(p.urls["tokenizer"])
    torch.manual_seed(0)
    model = build_model(p.arch, "cpu", compile=False)
    for stage, step in (("pretrain", 4), ("sft", 2)):
        path = f"{p.urls['run'][len('file://'):]}/{stage}/{checkpoint.dir_name(stage, step)}"
        checkpoint.save(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                        loader_state={}, rank=0, world_size=1, step=step, stage=stage, run=p.name, loop_state={})
    return p


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from trainer.serve.app import start_local

    p = tiny_run(tmp_path_factory.mktemp("serve-runs"))
    port = free_port()
    started = not ray.is_initialized()
    # The replica reserves no CPU, so a Ray Train run later in the session (tests/finished_run.py, on this same
    # 2-CPU local cluster) still finds both CPUs free.
    start_local({"run_url": p.urls["run"], "max_batch": 4, "max_queue": 8, "metrics_port": 0,
                 "cpus_per_replica": 0}, port=port, num_cpus=2)
    try:
        yield Served(f"http://127.0.0.1:{port}", p.name, p.urls["run"])
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()

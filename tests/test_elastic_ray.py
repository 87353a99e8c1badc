"""An elastic run on a real local Ray cluster of two 1-CPU worker nodes (ray.cluster_utils.Cluster, gloo):
`min_gpus=1` of 2 gives Ray Train's `ScalingConfig(num_workers=(1, 2))`. One node is removed while the run
trains (its worker dies with it, as with a reclaimed spot node): the run restarts on the 1 worker that fits,
re-sharding the checkpoint 2 -> 1, and goes on. The node is then added back: at its next check the elastic
policy restarts the group on 2 workers (1 -> 2) and the run completes; its spend ledger prices each part at
the size it ran (fewer GPU-seconds than 2 x the wall time). Waiting is on conditions (the loop's
data trace and Ray's node table) with deadlines, never on fixed sleeps.

Run: .venv/bin/pytest tests/test_elastic_ray.py
"""

from __future__ import annotations

import json
import os
import threading
import time

from tests.finished_run import tiny_plan


def _wait(cond, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # polling a condition, not a synchronisation by time


def _stamps(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def test_elastic_run_shrinks_when_a_node_is_lost_and_grows_back(tiny_inputs, tmp_path):
    """In a child process: the test needs its own multi-node Ray cluster, and the session may already hold a
    driver connection to another (the served app's, tests/serve_app.py), which one process cannot have twice."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"from tests.test_elastic_ray import elastic_scenario; "
            f"elastic_scenario({tiny_inputs!r}, {str(tmp_path)!r}); print('elastic scenario passed')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "elastic scenario passed" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def elastic_scenario(tiny_inputs: str, tmp: str) -> None:
    """The scenario itself (module docstring), run in the child process; an assertion fails it."""
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    from trainer.launch import run

    # Ray Train first retries at the size the lost node still shows in the resource view and waits its worker
    # group start-up timeout (60 s by default) before trying the size that fits: 10 s here, set before the
    # cluster's processes start so its controller inherits it.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=True)
    try:
        p = tiny_plan(tiny_inputs, "elastic", stages=("pretrain",), min_gpus=1, num_iterations=60,
                      checkpoint_every=2, eval_every=60)
        trace = str(Path(tmp) / "trace.jsonl")
        out: dict = {}

        def go():
            try:
                out["summary"] = run(p, storage_options={}, checkpoint_upload="sync", trace=trace,
                                     elastic_monitor_s=2.0)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                out["error"] = e

        t = threading.Thread(target=go, daemon=True)
        t.start()
        _wait(lambda: any(s["rank"] == 1 and s["step"] >= 4 for s in _stamps(trace)), "2 workers training")
        cluster.remove_node(nodes[1])
        n = len(_stamps(trace))
        _wait(lambda: sum(1 for s in _stamps(trace)[n:] if s["rank"] == 0) >= 6 and not any(
            s["rank"] == 1 for s in _stamps(trace)[n:]) or "error" in out or "summary" in out, "1 worker training")
        assert "error" not in out, out.get("error")
        shrunk = _stamps(trace)[n:]
        assert shrunk and all(s["rank"] == 0 for s in shrunk)  # training went on, on 1 worker
        cluster.add_node(num_cpus=1)
        m = len(_stamps(trace))
        t.join(timeout=600)
        assert not t.is_alive(), "the run did not finish"
        assert "error" not in out, out.get("error")
        summary = out["summary"]["stages"]["pretrain"]
        assert summary["status"] == "completed" and summary["steps"] == 60
        grown = _stamps(trace)[m:]
        assert any(s["rank"] == 1 for s in grown), "the run did not grow back to 2 workers"
        # one attempt, priced at the size each worker group ran: 2, then 1, then 2 GPUs (trainer/spend.py)
        from trainer.spend import read_spend

        doc = read_spend(p.urls["run"])
        row, = doc["attempts"]
        assert [g for _, g in row["segments"]] == [2, 1, 2], row
        assert 1.0 * row["seconds"] < doc["totals"]["gpu_seconds"] < 2 * row["seconds"], doc["totals"]
    finally:
        ray.shutdown()
        cluster.shutdown()

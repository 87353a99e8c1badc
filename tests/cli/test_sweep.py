"""`llmctl sweep` (cli/sweep.py, cli/sweepstate.py) and `llmctl plan --sweep` (cli/plan.py): the grid table,
refusals that create nothing (bad flags, --max-cost, another definition under the same name), resume without
double submission, failed cells retried, status, cancel, the fit's wiring, and a tiny local sweep.

The RayJobs of `--dry-run -o yaml` come from the real renderer (cli/kube/sweep.py) and are validated strictly.
The state machine of submit/resume/status/cancel runs against a small in-memory cluster standing in for
cli/kube/sweep.py's API calls (`FakeSweepCluster`: RayJobs by name, a name created once, as the API server does;
cli/kube/sweep.py's own tests hold its calls to the real control plane). Storage is real: file:// under
tmp_path, through trainer/storage.py.

Run: .venv/bin/pytest tests/cli/test_sweep.py
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import yaml

from cli import sweepstate
from tests import schemas
from tests.hostile import llmctl, refused

GRID = ["--flops", "1e18,1e19", "--depths", "10,12", "--gpus", "8"]


class FakeSweepCluster:
    """RayJobs by name in one namespace; `posts` is every creation, in order."""

    namespace = "team"

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.posts: list[str] = []
        self.deleted: list[str] = []

    def module(self) -> types.ModuleType:
        m = types.ModuleType("cli.kube.sweep")

        def render_cells(sweep, cells, cfg, *, namespace):
            return [{"apiVersion": "ray.io/v1", "kind": "RayJob",
                     "metadata": {"name": p.name, "namespace": namespace,
                                  "labels": {"llmctl.dev/sweep": sweep, "llmctl.dev/sweep-cell": cid}},
                     "spec": {"entrypoint": f"python -m trainer.launch --plan-json '{p.to_json(indent=None)}'"}}
                    for cid, p in cells]

        def submit_cells(client, objs):
            created = []
            for o in objs:
                if (n := o["metadata"]["name"]) not in client.jobs:
                    client.jobs[n] = {"obj": o, "state": "queued"}
                    client.posts.append(n)
                    created.append(n)
            return created

        def cell_states(client, namespace, sweep):
            return {j["obj"]["metadata"]["labels"]["llmctl.dev/sweep-cell"]: j["state"] for j in client.jobs.values()
                    if j["obj"]["metadata"]["labels"]["llmctl.dev/sweep"] == sweep}

        def cancel_sweep(client, namespace, sweep):
            names = [n for n, j in client.jobs.items() if j["obj"]["metadata"]["labels"]["llmctl.dev/sweep"] == sweep]
            for n in names:
                client.jobs.pop(n)
            return names

        m.render_cells, m.submit_cells, m.cell_states, m.cancel_sweep = render_cells, submit_cells, cell_states, \
            cancel_sweep
        return m


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    from cli import sweep
    from cli.kube.config import ClusterConfig

    c = FakeSweepCluster()
    c.root = f"file://{tmp_path}"
    monkeypatch.setitem(sys.modules, "cli.kube.sweep", c.module())
    monkeypatch.setattr(sweep, "_cluster", lambda args: (c, ClusterConfig(storage_root=c.root), []))

    def delete(kube, name):
        kube.jobs.pop(name)
        kube.deleted.append(name)

    monkeypatch.setattr(sweepstate, "delete_and_wait", delete)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    return c


def _finish(root: str, run: str, val_bpb: float, dollars: float = 1.5) -> None:
    """A cell's run as the launcher leaves it when done: summary.json with the pretraining stage's val bpb."""
    from trainer.storage import write_json

    write_json(f"{root}/runs/{run}/summary.json", {
        "run": run, "status": "completed", "dollars": dollars, "tokens": 1, "hours": 0.1,
        "stages": {"pretrain": {"status": "completed", "val_bpb": val_bpb, "steps": 10, "tokens": 1, "seconds": 1,
                                "dollars": dollars}}})


def test_sweep_dry_run_shows_one_table_with_totals_and_dropped_cells(capsys, tmp_path):
    rc, out, err = llmctl(capsys, "sweep", "--flops", "1e17,1e18", "--depths", "10,20", "--gpus", "8", "--dry-run",
                          "--name", "iso", "--storage", f"file://{tmp_path}")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["cell", "depth", "params", "steps", "tokens", "ratio", "FLOPs", "hours", "$", "est"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:] if ln.startswith("f")}
    assert set(rows) == {"f1e17-d10", "f1e18-d10", "f1e18-d20"}  # d20 cannot spend 1e17 FLOPs in 80 steps
    assert rows["f1e18-d10"][3] == "3,850" and rows["f1e18-d20"][3] == "331"
    total = next(ln for ln in lines if ln.startswith("total:"))
    assert "total: 3 cells" in total and "on 8 x h100" in total
    assert "dropped (1):" in out and "f1e17-d20: 1e+17 FLOPs" in out and "under the 80 steps" in out
    assert "nothing was created" in err and not (tmp_path / "sweeps").exists()


def test_sweep_local_dry_run_shows_the_default_local_grid(capsys, tmp_path):
    rc, out, err = llmctl(capsys, "sweep", "--local", "--dry-run", "--storage", f"file://{tmp_path}")
    assert rc == 0, err
    assert "total: 9 cells" in out and "on 2 x cpu" in out and "dropped" not in out
    assert {ln.split()[0] for ln in out.splitlines() if ln.startswith("f")} >= {"f8e11-d1", "f3p2e12-d3"}
    assert "nothing was run" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["{not json", "[" * 100_000, " " * (2 << 20)])
def test_sweep_status_of_a_hostile_stored_definition_is_one_line(capsys, tmp_path, content):
    (tmp_path / "sweeps/iso").mkdir(parents=True)
    (tmp_path / "sweeps/iso/sweep.json").write_text(content)
    assert "sweep.json cannot be read" in refused_1(capsys, "sweep", "status", "iso", "--local", "--storage",
                                                    f"file://{tmp_path}")
    (tmp_path / "sweeps/iso/sweep.json").write_text(json.dumps({"schema": "llmctl.sweep/v1", "name": "iso",
                                                                "spec": {"gpus": "many"}}))
    err = refused_1(capsys, "sweep", "status", "iso", "--local", "--storage", f"file://{tmp_path}")
    assert "sweep.json is not a sweep this version plans: gpus: must be a positive integer" in err


def refused_1(capsys, *argv):
    """A known failure: one line on stderr, exit 1, no traceback."""
    rc, out, err = llmctl(capsys, *argv)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("llmctl: error: "), (rc, err)
    return err


@pytest.mark.parametrize("kuberay", [schemas.KUBERAY_RELEASES[0], schemas.KUBERAY_RELEASES[-1]])  # tests/cli/kube: each
def test_sweep_dry_run_yaml_renders_strictly_valid_rayjobs_with_label_queue_priority(capsys, monkeypatch, tmp_path,
                                                                                     kuberay):
    """The real renderer (cli/kube/sweep.py), no cluster: one RayJob per kept cell, each strictly valid for the
    KubeRay release, labelled with the sweep and its cell, in the queue, at the sweep's priority."""
    from cli.kube.config import SWEEP_PRIORITY_CLASS
    from cli.kube.rayjob import PRIORITY_LABEL, QUEUE_LABEL
    from cli.kube.sweep import CELL_LABEL, SWEEP_LABEL

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    rc, out, err = llmctl(capsys, "sweep", "--flops", "1e17,1e18", "--depths", "10,20", "--gpus", "8", "--name",
                          "iso", "--storage", "s3://runs", "--queue", "h100", "--kuberay-version", kuberay[:3],
                          "--dry-run", "-o", "yaml")
    assert rc == 0, err
    objs = list(yaml.safe_load_all(out))
    assert schemas.validate_all(objs, {"kuberay": kuberay}) == 3  # f1e17-d20 dropped: no RayJob
    assert [o["metadata"]["name"] for o in objs] == ["iso-f1e17-d10", "iso-f1e18-d10", "iso-f1e18-d20"]
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels[SWEEP_LABEL] == "iso" and labels[CELL_LABEL] == o["metadata"]["name"][4:]
        assert labels[QUEUE_LABEL] == "h100" and labels[PRIORITY_LABEL] == SWEEP_PRIORITY_CLASS
        assert o["spec"]["suspend"] is True and o["metadata"]["namespace"] == "default"
    assert "dropped (1):" in err and "nothing was sent" in err


def test_sweep_dry_run_yaml_prints_every_cells_rayjob_and_sends_nothing(capsys, cluster):
    rc, out, err = llmctl(capsys, "sweep", *GRID, "--name", "iso", "--dry-run", "-o", "yaml")
    assert rc == 0, err
    objs = list(yaml.safe_load_all(out))
    assert [o["metadata"]["name"] for o in objs] == ["iso-f1e18-d10", "iso-f1e18-d12", "iso-f1e19-d10",
                                                     "iso-f1e19-d12"]
    assert all(o["metadata"]["labels"]["llmctl.dev/sweep"] == "iso" for o in objs)
    plan = json.loads(objs[0]["spec"]["entrypoint"].split("'")[1])
    assert plan["spec"]["stages"] == ["pretrain"] and plan["spec"]["num_iterations"] == 3850
    assert "total: 4 cells" in err and cluster.posts == []


@pytest.mark.parametrize("argv, says", [
    (["--flops", "1e18,abc", "--depths", "10"], "--flops: a comma-separated list of numbers"),
    (["--depths", "10,12"], "give --flops (or --ratios) and --depths"),
    (["--flops", "1e18", "--ratios", "4", "--depths", "10"], "one of the two"),
    (["--flops", "1e18", "--depths", "10", "--name", "Bad_Name"], "sweep name"),
    (["--flops", "1e18,1e18", "--depths", "10"], "listed twice"),
    (["--flops", "1e18", "--depths", "10", "--gpus", "0"], "gpus"),
])
def test_sweep_refuses_bad_flags_in_one_line(capsys, cluster, argv, says):
    assert says in refused(capsys, "sweep", *argv, "--yes")
    assert cluster.posts == []


def test_sweep_over_max_cost_is_refused_and_creates_nothing(capsys, cluster, tmp_path):
    for extra in (["--dry-run"], ["--yes"], ["--yes", "--price", "2.5"]):
        err = refused(capsys, "sweep", *GRID, "--name", "iso", "--max-cost", "20", *extra)
        assert "over --max-cost $20.00; nothing was created" in err
    assert cluster.posts == [] and not (tmp_path / "sweeps").exists()


def test_sweep_resume_skips_done_retries_failed_and_never_submits_twice(capsys, cluster, tmp_path):
    rc, out, err = llmctl(capsys, "sweep", *GRID, "--name", "iso", "--yes")
    assert rc == 0, err
    assert "4 RayJobs created" in out and len(cluster.posts) == 4
    url = f"{cluster.root}/sweeps/iso"
    assert json.loads((tmp_path / "sweeps/iso/sweep.json").read_text())["depths"] == [10, 12]
    assert sweepstate.read_record(url, "f1e18-d10", None)["submissions"] == 1

    rc, out, err = llmctl(capsys, "sweep", *GRID, "--name", "iso", "--yes")  # the same command: a resume
    assert rc == 0 and len(cluster.posts) == 4 and "nothing to submit" in err

    cluster.jobs["iso-f1e18-d12"]["state"] = "failed"
    cluster.jobs.pop("iso-f1e19-d10")  # finished, and its RayJob cleaned away: storage says it is done
    _finish(cluster.root, "iso-f1e19-d10", 1.1)
    cluster.jobs.pop("iso-f1e19-d12")  # gone from the cluster without a result (deleted by hand): submitted again
    rc, out, err = llmctl(capsys, "sweep", *GRID, "--name", "iso", "--yes")
    assert rc == 0, err
    assert "1 failed to retry, 1 to submit" in err and cluster.deleted == ["iso-f1e18-d12"]
    assert cluster.posts[4:] == ["iso-f1e18-d12", "iso-f1e19-d12"]  # not the done one, nor the queued one
    assert sweepstate.read_record(url, "f1e18-d12", None)["submissions"] == 2
    assert sweepstate.read_record(url, "f1e18-d10", None)["submissions"] == 1


def test_sweep_with_another_definition_under_the_same_name_is_refused(capsys, cluster, tmp_path):
    assert llmctl(capsys, "sweep", *GRID, "--name", "iso", "--yes")[0] == 0
    before = (tmp_path / "sweeps/iso/sweep.json").read_text()
    err = refused(capsys, "sweep", "--flops", "1e18", "--depths", "10,12,14", "--gpus", "8", "--name", "iso", "--yes")
    assert "sweep iso exists" in err and "another definition (differs in depths, flops)" in err
    assert len(cluster.posts) == 4 and (tmp_path / "sweeps/iso/sweep.json").read_text() == before


def test_sweep_default_name_is_the_same_for_the_same_command(capsys, cluster):
    assert llmctl(capsys, "sweep", *GRID, "--yes")[0] == 0
    names = {n.rsplit("-", 2)[0] for n in cluster.posts}
    assert len(names) == 1 and names.pop().startswith("sweep-")
    assert llmctl(capsys, "sweep", *GRID, "--yes")[0] == 0 and len(cluster.posts) == 4


def test_sweep_status_shows_states_results_and_cost_so_far(capsys, cluster):
    assert llmctl(capsys, "sweep", *GRID, "--name", "iso", "--yes")[0] == 0
    cluster.jobs["iso-f1e18-d12"]["state"] = "running"
    cluster.jobs["iso-f1e19-d12"]["state"] = "failed"
    _finish(cluster.root, "iso-f1e18-d10", 1.2345, dollars=6.5)
    rc, out, err = llmctl(capsys, "sweep", "status", "iso", "--storage", cluster.root)
    assert rc == 0, err
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("f1")}
    assert "done" in rows["f1e18-d10"] and "1.2345" in rows["f1e18-d10"] and "6.50" in rows["f1e18-d10"]
    assert "running" in rows["f1e18-d12"] and "queued" in rows["f1e19-d10"] and "failed" in rows["f1e19-d12"]
    assert "state: 1 done, 1 running, 1 queued, 1 failed" in out and "$6.50 spent so far" in out
    assert "fit: after 6 done cells (1 so far)" in out
    rc, out, _ = llmctl(capsys, "sweep", "status", "iso", "--storage", cluster.root, "-o", "json")
    doc = json.loads(out)
    assert {c["cell"]: c["state"] for c in doc["cells"]} == {"f1e18-d10": "done", "f1e18-d12": "running",
                                                             "f1e19-d10": "queued", "f1e19-d12": "failed"}
    assert doc["cells"][0]["val_bpb"] == 1.2345 and doc["fit"] is None
    assert "no sweep nope" in llmctl(capsys, "sweep", "status", "nope", "--storage", cluster.root)[2]


def test_sweep_cancel_deletes_every_cell_and_keeps_storage(capsys, cluster, tmp_path):
    assert llmctl(capsys, "sweep", *GRID, "--name", "iso", "--yes")[0] == 0
    rc, out, err = llmctl(capsys, "sweep", "cancel", "iso", "--storage", cluster.root, "--yes")
    assert rc == 0, err
    assert "4 RayJobs of sweep iso deleted" in out and cluster.jobs == {}
    assert sweepstate.read_record(f"{cluster.root}/sweeps/iso", "f1e19-d12", None)["status"] == "cancelled"
    assert (tmp_path / "sweeps/iso/sweep.json").exists()
    rc, out, err = llmctl(capsys, "sweep", *GRID, "--name", "iso", "--yes")  # resumes: all four again
    assert rc == 0 and len(cluster.posts) == 8


def test_sweep_fit_hands_the_done_cells_to_the_fit_and_stores_it(capsys, cluster, monkeypatch, tmp_path):
    """The wiring to trainer/sweep/ (another module's work): which cells reach fit_sweep, and where the fit goes."""
    seen = {}
    fit_mod, report_mod = types.ModuleType("trainer.sweep.fit"), types.ModuleType("trainer.sweep.report")

    class FitError(ValueError):
        pass

    def fit_sweep(cells, **kw):
        seen["cells"] = cells
        return {"n_opt": {"coef": 0.1, "exponent": 0.5, "ci95": [0.45, 0.55]},
                "d_opt": {"coef": 1.0, "exponent": 0.5, "ci95": [0.45, 0.55]},
                "ratio": {"value": 10.5, "ci95": [8.0, 13.0]}, "budgets": [], "parametric": None, "dropped": []}

    def write_report(url, definition, cells, fit, *, storage_options=None):
        seen["report"] = (url, definition["name"])
        return [f"{url}/report.html"]

    fit_mod.FitError, fit_mod.fit_sweep, report_mod.write_report = FitError, fit_sweep, write_report
    monkeypatch.setitem(sys.modules, "trainer.sweep", types.ModuleType("trainer.sweep"))
    monkeypatch.setitem(sys.modules, "trainer.sweep.fit", fit_mod)
    monkeypatch.setitem(sys.modules, "trainer.sweep.report", report_mod)
    assert llmctl(capsys, "sweep", "--flops", "1e18,1e19", "--depths", "10,12,14", "--gpus", "8", "--name", "iso",
                  "--yes")[0] == 0
    for i, run in enumerate(sorted(cluster.jobs)):
        _finish(cluster.root, run, 1.0 + i / 10)
    rc, out, err = llmctl(capsys, "sweep", "status", "iso", "--storage", cluster.root)
    assert rc == 0, err
    assert "N_opt ∝ C^0.500 (95% CI 0.45-0.55)" in out and "ratio 10.5 (95% CI 8-13)" in out
    cells = {c["cell"]: c for c in seen["cells"]}
    assert len(cells) == 6 and cells["f1e18-d12"]["flops"] == 1e18  # the budget: the IsoFLOP group
    assert cells["f1e18-d12"]["flops_achieved"] > 1e18 and cells["f1e18-d12"]["params"] == 110100912
    assert seen["report"] == (f"{cluster.root}/sweeps/iso", "iso")
    stored = json.loads((tmp_path / "sweeps/iso/fit.json").read_text())
    assert stored["ratio"]["value"] == 10.5 and len(stored["cells_fitted"]) == 6
    seen.clear()
    assert llmctl(capsys, "sweep", "status", "iso", "--storage", cluster.root)[0] == 0
    assert "cells" not in seen  # fitted already for these cells: not again


# ---------------------------------------------------------------------------------------------
# plan --sweep


def _store_fit(tmp_path, name: str = "iso") -> str:
    from trainer.plan import RunSpec, plan

    n20 = plan(RunSpec(depth=20, gpus=8)).params.scaling
    (tmp_path / "sweeps" / name).mkdir(parents=True)
    (tmp_path / "sweeps" / name / "fit.json").write_text(json.dumps({
        "n_opt": {"coef": n20 / 3e19 ** 0.5, "exponent": 0.5, "ci95": [0.45, 0.55]},
        "d_opt": {"coef": 1.0, "exponent": 0.5, "ci95": [0.45, 0.55]},
        "ratio": {"value": 10.5, "ci95": [8.0, 13.0]}, "budgets": [], "parametric": None, "dropped": []}))
    return f"file://{tmp_path}"


def test_plan_sweep_chooses_depth_and_ratio_and_says_so_in_its_assumptions(capsys, tmp_path):
    root = _store_fit(tmp_path)
    rc, out, err = llmctl(capsys, "plan", "--sweep", "iso", "--flops", "3e19", "--gpus", "8", "--storage", root)
    assert rc == 0, err
    assert "d20: 1280 wide" in out
    assumption = next(ln for ln in out.splitlines() if "sweep iso's fit" in ln)
    assert "-> d20, ratio 23.9" in assumption and "the sweep's ratio 10.5 (95% CI 8-13)" in assumption
    rc, out, err = llmctl(capsys, "plan", "--sweep", "iso", "--budget", "400", "--gpus", "8", "--storage", root,
                          "-o", "json")
    assert rc == 0, err
    p = json.loads(out)
    assert p["estimate"]["total_dollars"] <= 400 and "at most $400.00" in err and "assumption:" in err


@pytest.mark.parametrize("argv, says", [
    (["--sweep", "iso", "--flops", "3e19", "--depth", "12"], "leave --depth out"),
    (["--sweep", "iso"], "needs --flops C or --budget USD"),
    (["--flops", "3e19"], "give --sweep NAME"),
    (["--sweep", "other", "--flops", "3e19"], "no fit at"),
    ([], "--depth"),
])
def test_plan_sweep_refuses_in_one_line(capsys, tmp_path, argv, says):
    root = _store_fit(tmp_path)
    assert says in refused(capsys, "plan", *argv, "--storage", root)


# ---------------------------------------------------------------------------------------------
# Locally


def test_sweep_local_runs_a_tiny_grid_and_records_each_cells_val_bpb(capsys, monkeypatch, tiny_inputs, ray_cluster):
    """One cell of the tests' tiny model (tests/finished_run.py TINY's shape, its inputs) through the local path
    on the module's Ray cluster, a second cell dropped. Re-running resumes: nothing runs again."""
    from cli import sweep
    from tests.finished_run import TINY

    shape = {k: TINY[k] for k in ("gpus", "gpu_type", "vocab_size", "seq_len", "head_dim", "device_batch_size",
                                  "total_batch_size", "dataset", "sft_dataset", "tokenizer")}
    monkeypatch.setattr(sweep, "LOCAL_SPEC", {**shape, "eval_tokens": 2 * 4 * 64 * 2})
    argv = ["sweep", "--local", "--flops", "6e9", "--depths", "1,2", "--min-steps", "4", "--storage",
            tiny_inputs, "--name", "tiny"]
    rc, out, err = llmctl(capsys, *argv)
    assert rc == 0, err
    assert "dropped (1):" in out and "f6e9-d2: 6e+09 FLOPs" in out  # d2 cannot spend it in 4 steps of 512 tokens
    assert "[1/1] f6e9-d1: d1, 22 steps" in err and "1 of 1 cells done" in err
    rec = sweepstate.read_record(f"{tiny_inputs}/sweeps/tiny", "f6e9-d1", None)
    assert rec["status"] == "done" and rec["run"] == "tiny-f6e9-d1" and 0 < rec["val_bpb"] < 20
    rc, out, err = llmctl(capsys, "sweep", "status", "tiny", "--local", "--storage", tiny_inputs, "-o", "json")
    cells = json.loads(out)["cells"]
    assert rc == 0 and [c["state"] for c in cells] == ["done", "dropped"] and cells[0]["val_bpb"] == rec["val_bpb"]
    rc, out, err = llmctl(capsys, *argv)
    assert rc == 0 and "1 of 1 cells done" in err and "[1/" not in err  # resumed: nothing ran again

"""cli/plan.py, cli/planning.py and cli/main.py: `llmctl plan` output, bad input, and a start-up free of torch and ray.

Run: .venv/bin/pytest tests/cli/test_plan.py
"""

import json
import subprocess
import sys

import pytest
import yaml

from cli.main import main
from tests.hostile import ESC, no_controls, refused
from tests.hostile import llmctl as in_process
from hypothesis import HealthCheck, given, settings, strategies as st


def llmctl(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)


def test_plan_table(capsys):
    assert main(["plan", "--depth", "26", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "918,423,532 scaling" in out and "1,048,576 tokens/step" in out
    assert "cost" in out and "$" in out and "MFU prior" in out


def test_plan_fp8_shows_fp8_hours_and_dollars_beside_bf16(capsys):
    assert main(["plan", "--depth", "24", "--ratio", "8", "--gpus", "8", "--fp8"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "h training" in rows["bf16"] and "$" in rows["bf16"] and "this plan" not in rows["bf16"]
    assert "(1.18x bf16 tok/s) <- this plan" in rows["fp8"]  # d24: between the d20 and d26 measurements
    assert rows["memory"].startswith("memory") and "GiB per GPU predicted" in rows["memory"] and "(fp8)" in rows["memory"]
    hours = {k: float(rows[k].split()[1]) for k in ("bf16", "fp8")}
    assert hours["fp8"] < hours["bf16"]
    assert main(["plan", "--depth", "24", "--ratio", "8", "--gpus", "8", "-o", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["spec"]["precision"] == "bf16" and d["memory"]["peak_gib"] > 0 and d["memory"]["fits"]


def test_plan_json_and_yaml(capsys):
    assert main(["plan", "--depth", "24", "--gpus", "8", "--ratio", "8", "--stages", "pretrain", "-o", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stages"][0]["steps"] == 5568 and d["total_batch_size"] == 2**20
    assert main(["plan", "--depth", "12", "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["params"]["scaling"] == 110_100_912


@pytest.mark.parametrize("args,needle", [
    (["--depth", "0"], "depth"),
    (["--depth", "12", "--gpus", "-2"], "gpus"),
    (["--depth", "12", "--gpu-type", "tpu9"], "gpu_type"),
    (["--depth", "12", "--ratio", "0"], "ratio"),
    (["--depth", "24", "--gpus", "6"], "cannot share"),
    (["--depth", "twelve"], "invalid int"),
    ([], "required"),
    (["--depth", "48", "--gpus", "8"], "does not fit on h100"),  # memory: says what would fit
    (["--depth", "26", "--gpus", "8", "--device-batch-size", "32"], "at most 16 fit"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    r = llmctl("plan", *args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_help_and_plan_import_neither_torch_nor_ray():
    code = ("import sys; from cli.main import main; import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['plan', '--depth', '26', '--gpus', '8'])\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'kubernetes', 'tiktoken', 'pyarrow') if m in sys.modules)\n"
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""



def test_help_imports_no_kube_module_and_not_the_whole_planner():
    """`llmctl --help` builds every command's parser from light modules (cli/flags.py): no cli/kube/ module, no
    helper that does the work, and of the planner only what the flags' help text names (the GPU catalog, the
    stage names); PlanError is recognised without importing it."""
    code = ("import sys, contextlib, io; from cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith(('cli', 'trainer', 'yaml', 'json')))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(r.stdout.strip().split(","))
    assert not {m for m in loaded if m.startswith("cli.kube") or m == "yaml"}, sorted(loaded)
    assert not loaded & {"cli.planning", "cli.runview", "cli.idle", "cli.local", "cli.netcheck",
                         "trainer.plan.runplan", "trainer.plan.spec", "trainer.spend", "trainer.progress"}, sorted(loaded)


def test_each_command_word_is_registered_by_the_module_main_names():
    """cli.main.OWNERS (build only the parser a command needs) agrees with what each module registers."""
    import argparse

    from cli.main import COMMANDS, OWNERS

    for module in COMMANDS:
        sub = argparse.ArgumentParser().add_subparsers()
        __import__(module, fromlist=["register"]).register(sub)
        assert {w for w, m in OWNERS.items() if m == module} == set(sub.choices), module

def test_console_script_help():
    r = llmctl("--help")
    assert r.returncode == 0 and "plan" in r.stdout


def test_a_local_cpu_plan_names_no_nvlink_and_every_table_figure_is_in_the_json(capsys):
    """A laptop has no NVLink: the local plan says what links its workers; and the interconnect figures the
    table shows for a multi-node run are the JSON plan's own."""
    assert main(["plan", "--depth", "4", "--gpus", "2", "--gpu-type", "cpu"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("interconnect"))
    assert "NVLink" not in row and "local" in row and "gloo" in row
    assert main(["plan", "--depth", "26", "--gpus", "32"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("interconnect"))
    assert main(["plan", "--depth", "26", "--gpus", "32", "-o", "json"]) == 0
    ic = json.loads(capsys.readouterr().out)["interconnect"]
    assert f"{ic['interconnect_share']:.1%} of each {ic['step_seconds'] * 1e3:.0f} ms step" in row
    assert f"{ic['busbw'] / 1e9:.0f} GB/s" in row and f"{ic['bytes_per_step'] / 1e9:.2f} GB" in row


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def test_hostile_plan_refuses_a_credential_url_too(capsys):
    err = refused(capsys, "plan", "--depth", "12", "--storage", "s3://AKIAIOSFODNN7EXAMPLE:x@bucket/llm")
    assert "storage" in err and "AKIAIOSFODNN7EXAMPLE" not in err


def test_hostile_plan_json_is_strict_json(capsys):
    rc, out, _ = in_process(capsys, "plan", "--depth", "12", "--price", "0", "-o", "json")
    assert rc == 0
    json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in -o json"))


_NUM = st.one_of(st.integers(-2, 2**70).map(str), st.sampled_from(["1e300", "nan", "inf", "-inf", "-0", "1e-320",
                                                                    "0x10", "", " 3", "1_000"]),
                 st.floats(allow_nan=True, allow_infinity=True).map(repr))


_TEXT = st.one_of(st.text(max_size=30), st.sampled_from([
    "s3://b/x", "file:///tmp/x", "https://u:p@h/x", "memory://x", "FILE:///x", "../../x", ESC, "AKIAIOSFODNN7EXAMPLE",
    "pretrain,sft,eval", "eval", "sft,pretrain", "h100", "cpu", "NCCL_DEBUG=INFO", "HOME=/", "A=B=C", "="]))


_FLAGS = {"--depth": _NUM, "--ratio": _NUM, "--gpus": _NUM, "--seq-len": _NUM, "--num-iterations": _NUM,
          "--device-batch-size": _NUM, "--total-batch-size": _NUM, "--price": _NUM, "--max-cost": _NUM,
          "--core-max-per-task": _NUM, "--stages": _TEXT, "--gpu-type": _TEXT, "--storage": _TEXT,
          "--core-bundle": _TEXT, "--name": _TEXT, "--precision": _TEXT, "--env": _TEXT, "--image": _TEXT,
          "--queue": _TEXT, "--lm-eval": _TEXT}


@st.composite
def _argv(draw):
    cmd = draw(st.sampled_from(["plan", "submit"]))
    argv = [cmd, "--depth", draw(st.sampled_from(["4", "12", "20", "64"]))]
    for flag in draw(st.lists(st.sampled_from(sorted(_FLAGS)), max_size=5)):
        argv += [flag, draw(_FLAGS[flag])]
    argv += ["-o", "json"] + (["--dry-run"] if cmd == "submit" else [])
    return argv


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(argv=_argv())
def test_hostile_fuzz_the_argument_parser(argv, tmp_path):
    import contextlib
    import io
    import os

    os.environ["KUBECONFIG"] = str(tmp_path / "absent")  # (the autouse fixture's value, kept per example)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc in (0, 2), (argv, rc, err.getvalue())
    if rc == 2:
        assert err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue(), (argv, err.getvalue())
        no_controls(err.getvalue())
    else:
        json.loads(out.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in -o json for {argv}"))

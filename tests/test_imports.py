"""Imports run one way: `cli` -> `trainer`, never back; no cycle among the modules of a package (trainer/,
trainer/plan/, trainer/serve/, trainer/data/, cli/, cli/kube/), imports inside functions included; the planner
imports only the standard library and itself; command modules never import `cli.main`, nor one another. The contracts live in pyproject.toml ([tool.importlinter]);
import-linter (grimp) checks them here, so a new cycle or a trainer -> cli import fails the suite.

Run: .venv/bin/pytest tests/test_imports.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = 6


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """import-linter on the packages under `cwd`, with `cwd`'s pyproject.toml, resolved from `cwd` only."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(cwd)})


def test_import_contracts_are_kept():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{CONTRACTS} kept, 0 broken" in r.stdout, r.stdout


BREAKS = [  # (module to edit, import added inside a function, what the report must name)
    ("trainer/storage.py", "from trainer import launch", "No cycles are allowed in trainer."),  # launch -> storage
    ("trainer/plan/shape.py", "from trainer.plan import runplan", "No cycles are allowed in trainer.plan."),
    ("trainer/plan/spec.py", "from trainer import fp8", "trainer.plan.spec -> trainer.fp8"),
    ("trainer/plan/memory.py", "import torch", "trainer.plan.memory -> torch"),  # the CLI would pull torch
    ("cli/console.py", "from cli import idle", "No cycles are allowed in cli."),  # idle -> console -> idle
    ("cli/kube/pods.py", "from cli.kube import rayjob", "No cycles are allowed in cli.kube."),  # rayjob -> pods
    ("cli/serve.py", "from cli.jobs import say", "cli.serve is not allowed to import cli.jobs"),  # commands apart
    ("cli/planning.py", "from cli import jobs", "cli.planning -> cli.jobs"),  # plan and submit reach jobs via a helper
    ("trainer/progress.py", "from cli import errors", "trainer.progress -> cli.errors"),  # a pod importing the CLI
    ("cli/data.py", "from cli.main import UsageError", "cli.data -> cli.main"),  # main loads data by name
    ("trainer/plan/shape.py", "import scipy", "trainer.plan.shape -> scipy"),  # the sweep fit's stack at start-up
    ("trainer/sweep/fit.py", "import torch", "trainer.sweep.fit -> torch"),  # the fit must run without the training stack
]


@pytest.mark.parametrize("path, statement, named", BREAKS, ids=[b[2] for b in BREAKS])
def test_a_deliberate_break_inside_a_function_fails(tmp_path, path, statement, named):
    """The same contracts on a copy of the packages with one bad import, hidden inside a function body."""
    for pkg in ("trainer", "cli"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    module = tmp_path / path
    module.write_text(module.read_text() + f"\n\ndef _deliberate():\n    {statement}  # noqa: F401\n")
    r = lint_imports(tmp_path)
    assert r.returncode == 1 and f"{CONTRACTS - 1} kept, 1 broken" in r.stdout, r.stdout + r.stderr
    assert named in r.stdout, r.stdout


def test_the_planner_contract_lists_every_other_part_of_trainer():
    """The forbidden list names trainer's other modules one by one: a module added later must be added there."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    planner = next(c for c in contracts if c.get("source_modules") == ["trainer.plan"])
    parts = {f"trainer.{p.stem if p.suffix == '.py' else p.name}" for p in (ROOT / "trainer").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert parts - {"trainer.plan"} <= set(planner["forbidden_modules"]), sorted(parts - set(planner["forbidden_modules"]))


def test_the_command_contract_lists_every_command():
    """Every module cli.main loads by name is in the independence contract (with local.py and netcheck.py,
    the two modules that are one flag of a command each), so a new command cannot import another unnoticed."""
    import tomllib

    from cli.main import COMMANDS

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    commands = next(c for c in contracts if c["type"] == "independence")
    assert set(commands["modules"]) == set(COMMANDS) | {"cli.local", "cli.netcheck"}

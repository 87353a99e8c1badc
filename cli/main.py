"""Entry point of `llmctl`: builds the argument parser from one module per noun and maps errors to one line.

Each command module exposes `register(subparsers)`, which adds its sub-commands and sets `func` on them.
Start-up must stay fast: this module and every `register` import nothing heavy (no torch, ray, kubernetes);
the commands import what they need inside their function body.

Errors (cli/errors.py): `UsageError` and the plan's `PlanError` (bad input) print one line on stderr and exit 2;
`CLIError` (a known failure: cluster unreachable, run missing) prints one line and exits 1. Set
LLMCTL_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cli.errors import CLIError, UsageError

# Command modules, in the order they appear in --help.
COMMANDS = ("cli.plan", "cli.top", "cli.data", "cli.tokenizer", "cli.submit", "cli.jobs", "cli.doctor", "cli.chat",
            "cli.serve", "cli.export", "cli.lmeval", "cli.report", "cli.cost", "cli.sweep")
# Which module registers each command word: `llmctl plan ...` builds only cli.plan's parser (start-up time);
# `llmctl --help`, or a word not here, builds them all. tests/cli/test_plan.py checks this against register().
OWNERS = {"plan": "cli.plan", "top": "cli.top", "data": "cli.data", "tokenizer": "cli.tokenizer",
          "submit": "cli.submit", "status": "cli.jobs", "list": "cli.jobs", "logs": "cli.jobs", "cancel": "cli.jobs",
          "doctor": "cli.doctor", "chat": "cli.chat", "serve": "cli.serve", "export": "cli.export", "eval": "cli.lmeval", "report": "cli.report", "cost": "cli.cost",
          "sweep": "cli.sweep"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage + message, exit 2
        raise UsageError(f"{self.prog}: {message}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `argv` whose first word is a command, only that command's module registers."""
    parser = _Parser(
        prog="llmctl",
        description="Train nanochat-recipe GPT models on Kubernetes with Ray Train. "
        "One dial, --depth, sets every hyperparameter; every run shows its price before launch.",
        epilog="Examples:\n  llmctl plan --depth 26 --gpus 8\n  llmctl submit --depth 26 --gpus 8 --dry-run -o yaml\n"
        "  llmctl submit --local\n\nSet LLMCTL_DEBUG=1 to see tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    word = argv[0] if argv else None
    for name in (OWNERS[word],) if word in OWNERS else COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def _refuse_credentials(args: argparse.Namespace) -> None:
    """Every URL flag of every command (--storage, --core-bundle, --data, --out, --source, RUN ...): a URL with
    a user:password part is refused before anything runs; it would land in a manifest, a log or shell history."""
    from trainer.plan.credentials import HOW, url_has_user

    for dest, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and url_has_user(v):
                raise UsageError(f"--{dest.replace('_', '-')}: a URL with a user:password part; {HOW}")


def _plan_error(e: BaseException) -> bool:
    """Whether `e` is the planner's PlanError, without importing the planner: a command that raised one has
    imported it (so `--help` never pays for it)."""
    spec = sys.modules.get("trainer.plan.spec")
    return spec is not None and isinstance(e, spec.PlanError)


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        # A command's optional positional given after its options (`export RUN --format hf OUT`): argparse before
        # Python 3.12.8 matches it, empty, with the positional before it and leaves the word over.
        late = getattr(args, "trailing_positional", None)
        if late and getattr(args, late) is None and len(extra) == 1 and not extra[0].startswith("-"):
            setattr(args, late, extra.pop())
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        _refuse_credentials(args)
        if not hasattr(args, "func"):
            parser.print_help()
            return 0
        return args.func(args) or 0
    except Exception as e:
        if not (isinstance(e, CLIError) or _plan_error(e)):
            raise
        if os.environ.get("LLMCTL_DEBUG"):
            raise
        from cli.console import clean

        code = e.exit_code if isinstance(e, CLIError) else 2
        # one line, and no terminal escapes: messages quote names and fields from the cluster and from storage
        print(f"llmctl: error: {clean(e)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("llmctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

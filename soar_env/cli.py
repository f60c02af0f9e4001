"""The `soar` command line.

    soar hardset --source generator:addition@4#200 --k 8 --out hard.jsonl
    soar train --teacher rloo --preset cpu        (from agents)
    soar bench --quick                            (from benchmarks)

Subcommands are found through the ``soar.commands`` entry-point group (pyproject.toml), so
that packages above the library (``agents``, ``benchmarks``, or a user's own) add commands
without ``soar_env`` naming them: dependencies point one way. An entry point names a function
``add_command(commands)`` that adds its subparser and sets ``run`` (a function of the parsed
namespace returning the exit code). Options come from the dataclass configs
(``soar_env.options``); values are checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Any

from soar_env import __version__
from soar_env.options import add_dataclass_arguments, dataclass_from_args

COMMAND_GROUP = "soar.commands"
"""Entry-point group of ``soar`` subcommands."""


def _run_hardset(args: argparse.Namespace) -> int:
    from soar_env.data.hardset import HardSetConfig, build_hardset  # loads torch: only when the command runs

    config = dataclass_from_args(HardSetConfig, args)
    result = build_hardset(config)
    print(
        f"hard set: kept {result.kept}/{result.pool} problems that failed {config.k}/{config.k} samples "
        f"(train {result.train}, test {result.test}); accuracy over all samples drawn "
        f"{result.pool_accuracy:.3f}; {result.seconds:.0f} s; wrote {result.out} and {result.out}.meta.json"
    )
    return 0


def add_hardset_command(commands: Any) -> None:
    """``soar hardset``: the fail@K filter of the paper, on any problem source."""
    from soar_env.data.hardset import HardSetConfig

    hardset = commands.add_parser(
        "hardset", help="build a fail@K hard set for a student model",
        description="Sample each problem K times with the student prompt and keep those with 0/K correct.")
    add_dataclass_arguments(hardset, HardSetConfig)
    hardset.set_defaults(run=_run_hardset)


def build_parser() -> argparse.ArgumentParser:
    """The ``soar`` parser with every registered subcommand; one that fails to import is skipped with a note."""
    parser = argparse.ArgumentParser(prog="soar", description="SOAR teacher-student curricula for math reasoning.")
    parser.add_argument("--version", action="version", version=f"soar-gym {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            add_command = entry.load()
        except (ImportError, AttributeError) as error:  # e.g. installed without the benchmarks folder
            print(f"soar: command {entry.name!r} unavailable: {error}", file=sys.stderr)
            continue
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as error:
        # Configuration and environment problems: one line, no traceback.
        print(f"soar {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

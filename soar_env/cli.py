"""The `soar` command line.

    soar hardset --source generator:addition@4#200 --k 8 --out hard.jsonl

Options are generated from the dataclass configs: each field's docstring is its help
text, so it is written once. Values are checked (types, choices, ranges in the
configs' ``__post_init__``) before any model is loaded.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Callable


def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the string literal written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _parser_for(annotation: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(type converter, is_bool) for a dataclass field annotation."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"float": float, "int": int, "str": str, "bool": bool})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    if annotation is bool:
        return None, True
    if annotation in (int, float, str):
        return annotation, False
    return str, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                            required: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` options for every field of ``cls`` (help text from its docstring)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        convert, is_bool = _parser_for(hints.get(field.name, str))
        flag = "--" + field.name.replace("_", "-")
        default = None if field.default is dataclasses.MISSING else field.default
        help_text = docs.get(field.name, "")
        if is_bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            is_required = field.name in required or (
                field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING)
            parser.add_argument(flag, dest=field.name, type=convert, default=default, required=is_required,
                                help=f"{help_text} (default: {default})" if not is_required else help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def _cmd_hardset(args: argparse.Namespace) -> int:
    from soar_env.data.hardset import HardSetConfig, build_hardset

    config = dataclass_from_args(HardSetConfig, args)
    result = build_hardset(config)
    print(
        f"hard set: kept {result.kept}/{result.pool} problems that failed {config.k}/{config.k} samples "
        f"(train {result.train}, test {result.test}); accuracy over all samples drawn "
        f"{result.pool_accuracy:.3f}; {result.seconds:.0f} s; wrote {result.out} and {result.out}.meta.json"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    # Lazy: soar_env never imports agents at module level (agents depends on soar_env).
    from agents.train import run_from_args

    return run_from_args(args)


def _add_train_command(commands: Any) -> None:
    """``soar train``: its options come from agents.train's configs, imported only when the parser is built."""
    try:
        from agents.train import add_train_arguments
    except ImportError:  # soar_env used without the agents package
        return
    train = commands.add_parser(
        "train", help="meta-train a teacher against SOAR-MATH-v0 (SOAR, baselines or module:Class)",
        description="Meta-train a teacher: progress bar, TensorBoard, checkpoints, PQ file and a summary. "
                    "Every value is checked before a model loads; --resume DIR continues a killed run.",
        allow_abbrev=False)
    add_train_arguments(train)
    train.set_defaults(run=_cmd_train)


def _cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.compare_teachers import run_from_args

    return run_from_args(args)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from soar_env.analysis import run_from_args

    return run_from_args(args)


def _add_bench_commands(commands: Any) -> None:
    """``soar bench`` (benchmarks.compare_teachers) and ``soar analyze`` (soar_env.analysis), imported lazily."""
    try:
        from benchmarks.compare_teachers import add_arguments as add_bench_arguments
    except ImportError:  # installed without the benchmarks folder
        add_bench_arguments = None
    if add_bench_arguments is not None:
        bench = commands.add_parser(
            "bench", help="compare teachers the paper's way (PQ, PS, baselines; pass@k with CIs)",
            description="Run Hard-Only, Base-T, Random, Intrinsic-T, SOAR (PQ, PS, Grounded-T) and the SB3 teacher "
                        "on a preset with N seeds; writes results.json, results.md and plots. --quick: a smoke test.")
        add_bench_arguments(bench)
        bench.set_defaults(run=_cmd_bench)
    try:
        from soar_env.analysis import add_arguments as add_analyze_arguments
    except ImportError:  # a checkout without the analysis module
        return
    analyze = commands.add_parser(
        "analyze", help="question analysis of run dirs: diversity, well-posedness, contamination, style",
        description="Analyse 128 sampled questions per run dir (questions.jsonl, else pq.jsonl) without an LLM judge.")
    add_analyze_arguments(analyze)
    analyze.set_defaults(run=_cmd_analyze)


def build_parser() -> argparse.ArgumentParser:
    from soar_env import __version__
    from soar_env.data.hardset import HardSetConfig

    parser = argparse.ArgumentParser(prog="soar", description="SOAR teacher-student curricula for math reasoning.")
    parser.add_argument("--version", action="version", version=f"soar-gym {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    hardset = commands.add_parser(
        "hardset", help="build a fail@K hard set for a student model",
        description="Sample each problem K times with the student prompt and keep those with 0/K correct.")
    add_dataclass_arguments(hardset, HardSetConfig)
    hardset.set_defaults(run=_cmd_hardset)
    _add_train_command(commands)
    _add_bench_commands(commands)
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

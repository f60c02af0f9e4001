"""The shared mechanisms every layer relies on: atomic writes, dataclass options, the CLI registry,
and the one-way layering of the packages."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from soar_env import cli
from soar_env.atomic import atomic_torch_save, atomic_write, atomic_write_text
from soar_env.options import add_dataclass_arguments, dataclass_from_args, field_docs, replace_checked

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["soar_env", "agents", "benchmarks"]
"""Lowest first: a package may import only itself and the packages before it."""


# --- atomic writes --------------------------------------------------------------------------------

def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "file.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]  # no temporary left behind


def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def half_then_crash(stream) -> None:
        stream.write(b"new but incomplete")
        raise KeyboardInterrupt  # a killed run

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_torch_save_round_trips(tmp_path: Path) -> None:
    import torch

    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt")["w"].tolist() == [0, 1, 2]


# --- dataclass options ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Inner:
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""


@dataclasses.dataclass
class _Outer:
    lr: float = 2e-4
    """{doc:tests.test_foundations._Inner.lr} Here: the student's."""
    steps: int = 10
    """Inner RLOO steps."""
    greedy: bool = True
    """Greedy evaluation."""
    name: str | None = None
    """A name."""


def test_field_docs_resolve_references_so_a_setting_is_documented_once() -> None:
    docs = field_docs(_Outer)
    assert docs["lr"] == "Peak learning rate (paper: 1e-5). Here: the student's."
    assert docs["steps"] == "Inner RLOO steps."


def test_dataclass_options_round_trip_with_types() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Outer)
    config = dataclass_from_args(_Outer, parser.parse_args(["--lr", "0.5", "--no-greedy", "--name", "x"]))
    assert config == _Outer(lr=0.5, steps=10, greedy=False, name="x")
    assert "Peak learning rate" in parser.format_help()


def test_absent_unless_given_leaves_unset_options_out() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Outer, prefix="teacher-", dest_prefix="teacher_", absent_unless_given=True)
    args = parser.parse_args(["--teacher-steps", "3"])
    assert vars(args) == {"teacher_steps": 3}


def test_replace_checked_names_the_close_match() -> None:
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        replace_checked(_Outer(), {"step": 3})
    assert replace_checked(_Outer(), {"steps": 3}).steps == 3


# --- the CLI registry -----------------------------------------------------------------------------

def test_soar_finds_every_subcommand_through_entry_points() -> None:
    choices = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"hardset", "train", "bench", "analyze"} <= set(choices)


def test_a_broken_command_is_skipped_with_a_note(monkeypatch, capsys) -> None:
    class Broken:
        name = "broken"

        def load(self):
            raise ImportError("needs an extra")

    real = cli.entry_points
    monkeypatch.setattr(cli, "entry_points", lambda group: [*real(group=group), Broken()])
    parser = cli.build_parser()
    assert "command 'broken' unavailable: needs an extra" in capsys.readouterr().err
    assert parser.parse_args(["hardset", "--source", "x", "--out", "y"]).command == "hardset"


# --- one-way layers -------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    """Every module a file imports, function-level imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", LAYERS)
def test_no_package_imports_a_layer_above_it(package: str) -> None:
    above = LAYERS[LAYERS.index(package) + 1:]
    offenders = sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in above
    )
    assert offenders == []

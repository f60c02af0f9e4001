"""The grading worker: a child process that runs Math-Verify on JSON-line requests.

:mod:`soar_env.verify.pool` starts it as ``python -c BOOT path/to/worker.py``: the boot code
loads this file by path, without importing the ``soar_env`` package (which could pull in
torch), so a worker's start-up costs only Math-Verify's import (~0.5 s). Hence this module
imports nothing from ``soar_env`` and only the standard library at its top.

Protocol: one JSON object a line on stdin, ``{"op": "grade", "gold", "pred", "id", "timeout"}``
or ``{"op": "parses", "answer", "id", "timeout"}``; one reply a line on stdout with the same
``id``. The first line sent is ``{"ready": true}``, once Math-Verify is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any

BACKSTOP_SLACK = 5.0
"""A worker kills itself this long after its own deadline, in case its parent is gone."""

MEMORY_LIMIT = 4 << 30
"""Address-space cap of a worker (bytes): one absurd answer must not exhaust the host."""

GOLD_CACHE_SIZE = 4096
"""Parsed gold answers kept; the cache is emptied when it is full."""


def math_verify_tools() -> tuple[Any, Any, Any]:
    """``parse(text)``, ``verify(gold, pred)`` and ``has_expr(parsed)``, set up once."""
    # Imported here, not at the top: the parent imports this module only to find its path and
    # must never load Math-Verify or sympy (~100 MB, seconds on a slow file system).
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # With the signal timeouts off, Math-Verify warns once that we must time it ourselves: we do.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Boxed first: both sides arrive as one \boxed{...}. The expression config reads plain
    # numbers and "1/2" that the LaTeX grammar misses.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def parse_answer(answer: str) -> list[Any]:
        # parsing_timeout=None turns off signal.alarm; the parent enforces the limit.
        return parse("\\boxed{" + answer + "}", config, parsing_timeout=None)

    def verify_parsed(gold: list[Any], pred: list[Any]) -> bool:
        # Gold first: Math-Verify is asymmetric (e.g. "x=3" gold accepts "3").
        return bool(verify(gold, pred, timeout_seconds=None))

    def has_expr(parsed: list[Any]) -> bool:
        # parse() returns [sympy object, source string] or just [string] when parsing failed.
        return any(not isinstance(item, str) for item in parsed)

    return parse_answer, verify_parsed, has_expr


def handle(request: dict[str, Any], tools: tuple[Any, Any, Any], gold_cache: dict[str, list[Any]]) -> dict[str, Any]:
    """The reply to one request (without its ``id``); may raise on hostile input."""
    parse_answer, verify_parsed, has_expr = tools
    if request["op"] == "parses":
        return {"parses": has_expr(parse_answer(request["answer"]))}
    # The same gold is graded against many samples (32 per problem in the paper), so its
    # parse is kept; responses are mostly distinct and are parsed every time.
    gold = gold_cache.get(request["gold"])
    if gold is None:
        if len(gold_cache) >= GOLD_CACHE_SIZE:
            gold_cache.clear()
        gold = gold_cache[request["gold"]] = parse_answer(request["gold"])
    pred = parse_answer(request["pred"])
    if gold and pred and verify_parsed(gold, pred):
        return {"status": "correct"}
    if not has_expr(pred) and (has_expr(gold) or not pred):
        return {"status": "unparsable"}
    return {"status": "wrong"}


def main() -> None:
    """Serve JSON-line requests on stdin until it closes (or the parent goes away)."""
    try:
        _serve()
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the parent closed the pipes or exited while we were busy: nothing to report


def _cap_memory() -> None:
    try:
        import resource  # POSIX only

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(hard, MEMORY_LIMIT)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):
        pass


def _serve() -> None:
    # Keep the protocol channel private: anything a library prints goes to stderr instead.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _cap_memory()

    def send(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message).encode("ascii") + b"\n")
        channel.flush()

    tools = math_verify_tools()
    gold_cache: dict[str, list[Any]] = {}
    handle({"op": "grade", "gold": "\\frac{1}{2}", "pred": "0.5"}, tools, {})  # compile regexes now
    send({"ready": True})
    backstop = hasattr(signal, "setitimer")
    for line in sys.stdin.buffer:
        request = json.loads(line)
        if backstop:
            # SIGALRM's default action ends the process even inside C code: if the parent died
            # and cannot kill us, a hung request still does not run forever.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_REAL, float(request["timeout"]) + BACKSTOP_SLACK)
        try:
            reply = handle(request, tools, gold_cache)
        except Exception as error:  # noqa: BLE001 - RecursionError, MemoryError, sympy bugs
            reply = {"status": "unparsable", "parses": False, "error": repr(error)[:200]}
        finally:
            if backstop:
                signal.setitimer(signal.ITIMER_REAL, 0)
        reply["id"] = request["id"]
        send(reply)

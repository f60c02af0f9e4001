r"""Answer extraction and grading with a hard time limit.

    >>> from soar_env.verify import grade
    >>> grade(r"... so the answer is $\boxed{\frac{1}{2}}$.", "0.5").correct
    True

The student's reward, the hard-set filter and every evaluation go through :func:`grade`, so it
must (a) agree with Math-Verify, which the paper uses, and (b) never hang a training run.
Math-Verify's own time limit uses ``signal.alarm``, which only works on the main thread and
cannot interrupt a long C-level computation (``9^{9^{9}}`` spends minutes inside Python's
integer power). So the symbolic work runs in a small pool of persistent worker processes: the
caller waits on a deadline and, when it passes, kills the worker and starts a fresh one. A
grade that ran out of time has status ``"timeout"``, is never correct, and is counted in
:func:`grading_stats`.

Workers are plain ``subprocess`` children (not ``multiprocessing``) because that works from any
thread, from inside daemonic ``multiprocessing`` workers (which may not have children of their
own), and never forks a parent that holds torch threads. They load this file by path, without
importing the ``soar_env`` package, so their start-up costs only Math-Verify's import (~0.5 s).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FOUND_BY", "GRADE_STATUSES", "Grade", "answer_parses", "extract_answer", "extract_boxed", "grade",
    "grade_many", "grading_stats", "normalize_answer", "reset_grading_stats", "shutdown_grading_pool", "warm_up",
]

GRADE_STATUSES = ("correct", "wrong", "no_answer", "unparsable", "timeout")
"""Every value :attr:`Grade.status` can take."""

FOUND_BY = ("boxed", "fallback", "none")
"""How the answer was found: in a ``\\boxed{}``, by the plain-text fallback, or not at all."""

MAX_ANSWER_CHARS = 10_000
"""Longer extracted answers are ``"unparsable"`` at once: sympy would only burn the time limit."""

DEFAULT_PROCESSES = 8
"""Upper bound on :func:`grade_many`'s default pool size; each worker holds ~100 MB of sympy."""

_STARTUP_TIMEOUT = 120.0
"""Seconds a new worker may take to import Math-Verify (slow shared file systems)."""

_BACKSTOP_SLACK = 5.0
"""A worker kills itself this long after its own deadline, in case its parent is gone."""

_WORKER_MEMORY_LIMIT = 4 << 30
"""Address-space cap of a worker (bytes): one absurd answer must not exhaust the host."""


@dataclass(frozen=True)
class Grade:
    """The verdict on one response."""

    status: str
    """One of :data:`GRADE_STATUSES`."""
    extracted: str | None = None
    """The answer string taken from the response (``None`` when nothing was found)."""
    found_by: str = "none"
    """One of :data:`FOUND_BY`."""

    @property
    def correct(self) -> bool:
        return self.status == "correct"


# --------------------------------------------------------------------------------------------
# Extraction (pure string work, linear time, safe to run in the caller)
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_TOKEN_RE = re.compile(r"[^\s${}]+")


def _brace_matches(text: str) -> dict[int, int]:
    """Map each ``{`` position to its matching ``}``; escaped ``\\{``/``\\}`` are literal."""
    matches: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            matches[stack.pop()] = i
        i += 1
    return matches


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), else None.

    Also reads ``\\fbox{...}`` and the brace-less ``\\boxed 5``. A box whose braces never close
    is skipped in favour of the previous one. Runs in linear time, so a megabyte of
    ``\\boxed{`` cannot stall the caller.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    matches: dict[int, int] | None = None
    for i in reversed(starts):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            continue
        if text[i] == "{":
            if matches is None:
                matches = _brace_matches(text)
            close = matches.get(i)
            if close is not None:
                return text[i + 1 : close]
        else:
            token = _BARE_TOKEN_RE.match(text, i)
            if token:
                return token.group(0).rstrip(".,;")
    return None


_ANSWER_IS_RE = re.compile(r"(?:answer\s+is|answer\s*:|####)", re.IGNORECASE)
# Bounded spans keep the scan linear on adversarial input; real inline answers are short.
_MATH_SPAN_RE = re.compile(r"\$\$(.{1,500}?)\$\$|\$([^$]{1,500}?)\$|\\\((.{1,500}?)\\\)|\\\[(.{1,500}?)\\\]", re.DOTALL)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_FALLBACK_TAIL = 5_000
"""The ``= X`` and last-number fallbacks only look this far from the end: answers come last."""


_CURRENCY = "$€£¥"


def _cut_trailing_words(candidate: str) -> str:
    """Drop prose after the value: "26 total glasses" -> "26", but keep ``\\text{ cm}`` whole.

    Cuts at the first space, outside braces, that is followed by a plain word of two or more
    letters or by the article "a"/"an" (a LaTeX command starts with a backslash, so it is not a
    word; a lone letter may be a variable).
    """
    depth = 0
    for i, c in enumerate(candidate):
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        elif c.isspace() and depth == 0 and i > 0:
            rest = candidate[i:].lstrip()
            if re.match(r"[A-Za-z]{2}|an?\s+[A-Za-z]", rest):
                return candidate[:i]
    return candidate


def _clean_fallback(candidate: str) -> str:
    """Trim a plain-text answer to its value: one line, one sentence, no prose or delimiters."""
    candidate = candidate.strip().split("\n", 1)[0]
    sentence_end = re.search(r"\.(?:\s|$)", candidate)
    if sentence_end:
        candidate = candidate[: sentence_end.start()]
    candidate = candidate.strip().strip("*").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if candidate.startswith(left) and candidate.endswith(right) and len(candidate) > len(left) + len(right):
            candidate = candidate[len(left) : -len(right)]
            break
    # A lone "$" is either currency ("$10") or half of a delimiter cut by the sentence split.
    candidate = candidate.strip().strip("$").strip()
    value = _cut_trailing_words(candidate)
    if value != candidate and value.isalpha():
        return ""  # "the answer is we need to ..." is prose, not a one-word answer
    candidate = value
    if len(candidate) > 1 and candidate[0] in _CURRENCY and (candidate[1].isdigit() or candidate[1] == "-"):
        candidate = candidate[1:]
    return candidate.strip().rstrip(".,;:").strip()


def extract_answer(response: str, *, require_box: bool = True) -> tuple[str | None, str]:
    """The final answer in ``response`` and how it was found (one of :data:`FOUND_BY`).

    Without ``require_box`` a reply with no box falls back, in order, to "the answer is X" /
    "Answer: X" / "#### X", then "= X" on the last line, then the last maths span or number,
    whichever comes later; small models rarely box.
    """
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed, "boxed"
    if require_box:
        return None, "none"
    anchors = list(_ANSWER_IS_RE.finditer(response))
    if anchors:
        candidate = _clean_fallback(response[anchors[-1].end() :].lstrip(" :"))
        if candidate:
            return candidate, "fallback"
    tail = response[-_FALLBACK_TAIL:].rstrip()
    last_line = tail.rsplit("\n", 1)[-1]
    if "=" in last_line:
        candidate = _clean_fallback(last_line.rsplit("=", 1)[1])
        if candidate:
            return candidate, "fallback"
    # Whichever ends last: a maths span ("... is $\\frac{1}{9}$") or a bare number ("... 42").
    numbers = list(_NUMBER_RE.finditer(tail))
    spans = list(_MATH_SPAN_RE.finditer(tail))
    if spans and (not numbers or spans[-1].end() >= numbers[-1].end()):
        content = next(group for group in spans[-1].groups() if group is not None).strip()
        if content:
            return content, "fallback"
    if numbers:
        return numbers[-1].group(0), "fallback"
    return None, "none"


# Cosmetic LaTeX that never changes a value; removing it lets identical answers skip sympy.
_COSMETIC_RE = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;: ]|~|\$|\s+")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(answer: str) -> str:
    """A canonical spelling of ``answer`` for exact comparison (no maths, linear time)."""
    s = _TEXT_WRAPPER_RE.sub(r"\1", answer)
    s = _COSMETIC_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _clean_gold(gold: str) -> str:
    """Gold answers are stored without a box, but tolerate one, and ``$...$`` delimiters.

    Unescaped dollars are dropped so that a list such as ``$(-6,6)$, $(2,6)$`` (OlympiadBench)
    reads as one answer; ``\\$`` (a literal dollar sign) is kept.
    """
    if "\\boxed" in gold or "\\fbox" in gold:
        boxed = extract_boxed(gold)
        gold = boxed if boxed is not None else gold
    return _UNESCAPED_DOLLAR_RE.sub("", gold).strip()


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

_STATS_LOCK = threading.Lock()
_STATS: dict[str, int] = {}
_STAT_KEYS = ("graded", "fast_path", "worker_calls", "timeouts", "worker_crashes", "workers_started")


def reset_grading_stats() -> None:
    """Zero the counters reported by :func:`grading_stats`."""
    with _STATS_LOCK:
        _STATS.clear()
        _STATS.update({key: 0 for key in _STAT_KEYS})


def grading_stats() -> dict[str, int]:
    """Counters since start (or the last reset), for run logs.

    ``graded`` grades returned; ``fast_path`` of them settled by string equality alone;
    ``worker_calls`` requests sent to a worker; ``timeouts`` requests that hit the time limit;
    ``worker_crashes`` workers that died mid-request; ``workers_started`` processes launched.
    """
    with _STATS_LOCK:
        return dict(_STATS)


def _count(key: str, n: int = 1) -> None:
    with _STATS_LOCK:
        _STATS[key] = _STATS.get(key, 0) + n


reset_grading_stats()


# --------------------------------------------------------------------------------------------
# Worker side: runs in the child process, imports Math-Verify lazily
# --------------------------------------------------------------------------------------------


def _math_verify_tools() -> tuple[Any, Any, Any]:
    """``parse(text)``, ``verify(gold, pred)`` and ``has_expr(parsed)``, set up once."""
    import logging

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


def _worker_handle(
    request: dict[str, Any], tools: tuple[Any, Any, Any], gold_cache: dict[str, list[Any]]
) -> dict[str, Any]:
    parse_answer, verify_parsed, has_expr = tools
    if request["op"] == "parses":
        return {"parses": has_expr(parse_answer(request["answer"]))}
    # The same gold is graded against many samples (32 per problem in the paper), so its
    # parse is kept; responses are mostly distinct and are parsed every time.
    gold = gold_cache.get(request["gold"])
    if gold is None:
        if len(gold_cache) >= 4096:
            gold_cache.clear()
        gold = gold_cache[request["gold"]] = parse_answer(request["gold"])
    pred = parse_answer(request["pred"])
    if gold and pred and verify_parsed(gold, pred):
        return {"status": "correct"}
    if not has_expr(pred) and (has_expr(gold) or not pred):
        return {"status": "unparsable"}
    return {"status": "wrong"}


def _worker_main() -> None:
    """Serve JSON-line requests on stdin until it closes (or the parent goes away)."""
    try:
        _serve()
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the parent closed the pipes or exited while we were busy: nothing to report


def _serve() -> None:
    import signal

    # Keep the protocol channel private: anything a library prints goes to stderr instead.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _WORKER_MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(hard, _WORKER_MEMORY_LIMIT)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):
        pass

    def send(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message).encode("ascii") + b"\n")
        channel.flush()

    tools = _math_verify_tools()
    gold_cache: dict[str, list[Any]] = {}
    _worker_handle({"op": "grade", "gold": "\\frac{1}{2}", "pred": "0.5"}, tools, {})  # compile regexes now
    send({"ready": True})
    backstop = hasattr(signal, "setitimer")
    for line in sys.stdin.buffer:
        request = json.loads(line)
        if backstop:
            # SIGALRM's default action ends the process even inside C code: if the parent died
            # and cannot kill us, a hung request still does not run forever.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_REAL, float(request["timeout"]) + _BACKSTOP_SLACK)
        try:
            reply = _worker_handle(request, tools, gold_cache)
        except Exception as error:  # noqa: BLE001 - RecursionError, MemoryError, sympy bugs
            reply = {"status": "unparsable", "parses": False, "error": repr(error)[:200]}
        finally:
            if backstop:
                signal.setitimer(signal.ITIMER_REAL, 0)
        reply["id"] = request["id"]
        send(reply)


# Loads this file as a stand-alone module: importing the soar_env package could pull in torch.
_WORKER_BOOT = (
    "import sys\n"
    "sys.path = [p for p in sys.path if p not in ('', '.')]  # the caller's cwd must not shadow modules\n"
    "import importlib.util\n"
    "spec = importlib.util.spec_from_file_location('_soar_grading_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module._worker_main()\n"
)


# --------------------------------------------------------------------------------------------
# Parent side: worker handles and the pool
# --------------------------------------------------------------------------------------------


class _Worker:
    """One grading process, used by one thread at a time."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # Same imports as the parent, even when it extended sys.path at run time.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        self.replies: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.ready = False
        self.next_id = 0
        # A reader thread turns the pipe into a queue, so waiting can have a deadline.
        threading.Thread(target=self._read, daemon=True, name="soar-grader-reader").start()
        _count("workers_started")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.replies.put(line)
        except (OSError, ValueError):
            pass
        self.replies.put(None)
        self.proc.stdout.close()  # only this thread reads it, so only this thread closes it

    def _get(self, deadline: float) -> dict[str, Any] | str:
        """Next message, or ``"timeout"`` when the deadline passed, ``"crashed"`` at EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        try:
            line = self.replies.get(timeout=remaining)
        except queue.Empty:
            return "timeout"
        return "crashed" if line is None else json.loads(line)

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not isinstance(self._get(time.monotonic() + _STARTUP_TIMEOUT), dict):
            self.kill()
            raise RuntimeError("soar_env.verify: a grading worker failed to start (is math-verify installed?)")
        self.ready = True

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        """Send one request: the reply, ``"timeout"`` (still busy at the deadline) or ``"crashed"``."""
        self.wait_ready()  # start-up time is not the request's fault, so it is not on its clock
        self.next_id += 1
        request = {**request, "id": self.next_id, "timeout": timeout}
        deadline = time.monotonic() + timeout
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(request).encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return "crashed"
        while True:
            reply = self._get(deadline)
            if not isinstance(reply, dict) or reply.get("id") == self.next_id:
                return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.hang_up()

    def hang_up(self) -> None:
        """Close the request pipe: an idle worker exits on the EOF."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass

    def close(self, wait: float = 1.0) -> None:
        """Ask politely, then kill."""
        self.hang_up()
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class _Pool:
    """Idle workers, started on first use and reused; a timed-out worker is replaced."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.closed = False

    def acquire(self) -> _Worker:
        with self.lock:
            while self.idle:
                worker = self.idle.pop()
                if worker.alive():
                    return worker
                worker.kill()
        return _Worker()

    def release(self, worker: _Worker) -> None:
        with self.lock:
            if not self.closed and worker.alive():
                self.idle.append(worker)
                return
        worker.close()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            workers, self.idle = self.idle, []
        for worker in workers:
            worker.hang_up()  # all at once, so they exit in parallel
        for worker in workers:
            worker.close()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        # After os.fork the inherited pipes belong to the parent's workers: start our own.
        if _POOL is None or _POOL.pid != os.getpid() or _POOL.closed:
            _POOL = _Pool()
        return _POOL


def shutdown_grading_pool() -> None:
    """Stop all idle workers now (also runs at interpreter exit); the next grade restarts them."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(shutdown_grading_pool)


def warm_up(processes: int = 1) -> None:
    """Start ``processes`` workers and wait until they are ready, so first grades are not slow."""
    pool = _pool()
    workers = [pool.acquire() for _ in range(max(1, processes))]
    try:
        for worker in workers:
            worker.wait_ready()
    finally:
        for worker in workers:
            pool.release(worker)


def _run_requests(requests: list[dict[str, Any]], timeout: float, processes: int) -> list[dict[str, Any] | None]:
    """Run requests on up to ``processes`` workers, one driving thread each; replies in order."""
    results: list[dict[str, Any] | None] = [None] * len(requests)
    if not requests:
        return results
    pool = _pool()
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(requests)):
        todo.put(index)
    errors: list[BaseException] = []

    def drive() -> None:
        worker = pool.acquire()
        busy = False
        try:
            while True:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                for _attempt in range(2):
                    _count("worker_calls")
                    busy = True
                    reply = worker.call(requests[index], timeout)
                    busy = False
                    if isinstance(reply, dict):
                        results[index] = reply
                        break
                    worker.kill()
                    if reply == "timeout":
                        _count("timeouts")
                        results[index] = {"status": "timeout"}
                        worker = pool.acquire()  # an idle one, or a new one importing already
                        break
                    # A crash may be the worker's fault (killed while idle) rather than the
                    # input's, so try once more on a brand-new worker; a second crash (e.g. a C
                    # stack overflow on this input) reads as an answer that cannot be parsed.
                    _count("worker_crashes")
                    results[index] = {"status": "unparsable"}
                    worker = _Worker()
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(error)
        finally:
            # Interrupted mid-request (Ctrl-C): the worker is still computing, so it cannot
            # serve anyone else.
            if busy:
                worker.kill()
            else:
                pool.release(worker)

    n_threads = max(1, min(processes, len(requests)))
    if n_threads == 1:
        drive()  # the common single grade: no extra thread
    else:
        threads = [threading.Thread(target=drive, daemon=True, name="soar-grader") for _ in range(n_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_timeout(timeout: float) -> float:
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def grade_many(
    responses: list[str],
    golds: list[str],
    *,
    require_box: bool = True,
    timeout: float = 5.0,
    processes: int | None = None,
    fast_path: bool = True,
) -> list[Grade]:
    """Grade ``responses[i]`` against ``golds[i]`` in parallel worker processes, order kept.

    ``processes`` defaults to ``min(cpu count, DEFAULT_PROCESSES)``. Workers are shared by all
    threads and kept between calls (the pool grows to the most used at once; see
    :func:`shutdown_grading_pool`). ``fast_path=False`` sends even string-identical answers to
    Math-Verify (for benchmarks and tests of the symbolic path). Each grade's symbolic work is
    limited to ``timeout`` seconds; a call can take longer only while a replacement worker
    starts (~0.5 s) after a time-out.
    """
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    timeout = _check_timeout(timeout)
    if processes is None:
        processes = min(os.cpu_count() or 1, DEFAULT_PROCESSES)
    grades: list[Grade | None] = [None] * len(responses)
    found: list[tuple[str | None, str]] = []
    pending: list[int] = []
    requests: list[dict[str, Any]] = []
    for i, (response, gold) in enumerate(zip(responses, golds)):
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)  # loaders often keep GSM8K-style answers as numbers
        if not isinstance(gold, str):
            raise TypeError(f"gold answer {i} is {type(gold).__name__}, not str")
        # A failed generation may arrive as None: it answered nothing.
        extracted, found_by = (None, "none")
        if isinstance(response, str):
            extracted, found_by = extract_answer(response, require_box=require_box)
        found.append((extracted, found_by))
        if extracted is None or not extracted.strip():
            grades[i] = Grade("no_answer", extracted, found_by)
            continue
        gold = _clean_gold(gold)
        gold_key = normalize_answer(gold)
        if fast_path and gold_key and normalize_answer(extracted) == gold_key:
            _count("fast_path")
            grades[i] = Grade("correct", extracted, found_by)
            continue
        if len(extracted) > MAX_ANSWER_CHARS:
            grades[i] = Grade("unparsable", extracted, found_by)
            continue
        pending.append(i)
        pred = _UNESCAPED_DOLLAR_RE.sub("", extracted).strip()  # "\\boxed{$5$}" means 5
        requests.append({"op": "grade", "gold": gold, "pred": pred})
    replies = _run_requests(requests, timeout, processes)
    for i, reply in zip(pending, replies):
        extracted, found_by = found[i]
        status = reply["status"] if reply and reply.get("status") in GRADE_STATUSES else "unparsable"
        grades[i] = Grade(status, extracted, found_by)
    _count("graded", len(grades))
    return [g for g in grades if g is not None]


def grade(response: str, gold: str, *, require_box: bool = True, timeout: float = 5.0, fast_path: bool = True) -> Grade:
    """Grade one response against one gold answer (no ``\\boxed{}`` needed around ``gold``).

    The answer is the last ``\\boxed{}`` of ``response``; with ``require_box=False`` a reply
    without one falls back to its plain-text final answer (see :func:`extract_answer`).
    Equivalence is Math-Verify's, within ``timeout`` seconds of wall-clock time, hard.
    """
    return grade_many([response], [gold], require_box=require_box, timeout=timeout, processes=1, fast_path=fast_path)[0]


def answer_parses(answer: str, timeout: float = 5.0) -> bool:
    """Whether Math-Verify reads ``answer`` (a box's content, or text with a box) as maths.

    Used to reject teacher problems whose answer no student could ever be graded against.
    A time-out counts as "does not parse".
    """
    timeout = _check_timeout(timeout)
    if "\\boxed" in answer or "\\fbox" in answer:
        boxed = extract_boxed(answer)
        answer = boxed if boxed is not None else answer
    answer = answer.strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    reply = _run_requests([{"op": "parses", "answer": answer}], timeout, 1)[0]
    return bool(reply and reply.get("parses"))

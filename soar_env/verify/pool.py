"""The pool of grading workers: start, reuse, time out, kill and replace.

Math-Verify's own time limit uses ``signal.alarm``, which only works on the main thread and
cannot interrupt a long C-level computation (``9^{9^{9}}`` spends minutes inside Python's
integer power). So the symbolic work runs in a small pool of persistent worker processes
(:mod:`soar_env.verify.worker`): the caller waits on a deadline and, when it passes, kills
the worker and starts a fresh one.

Workers are plain ``subprocess`` children (not ``multiprocessing``) because that works from any
thread, from inside daemonic ``multiprocessing`` workers (which may not have children of their
own), and never forks a parent that holds torch threads.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from soar_env.verify import worker as worker_module
from soar_env.verify.stats import count

__all__ = ["GradingWorker", "WorkerPool", "current_pool", "run_requests", "shutdown_grading_pool", "warm_up"]

STARTUP_TIMEOUT = 120.0
"""Seconds a new worker may take to import Math-Verify (slow shared file systems)."""

# Loads worker.py as a stand-alone module: importing the soar_env package could pull in torch.
_WORKER_BOOT = (
    "import sys\n"
    "sys.path = [p for p in sys.path if p not in ('', '.')]  # the caller's cwd must not shadow modules\n"
    "import importlib.util\n"
    "spec = importlib.util.spec_from_file_location('_soar_grading_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module.main()\n"
)


class GradingWorker:
    """One grading process, used by one thread at a time."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # Same imports as the parent, even when it extended sys.path at run time.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(worker_module.__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        self.replies: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.ready = False
        self.next_id = 0
        # A reader thread turns the pipe into a queue, so waiting can have a deadline.
        threading.Thread(target=self._read, daemon=True, name="soar-grader-reader").start()
        count("workers_started")

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
        if not isinstance(self._get(time.monotonic() + STARTUP_TIMEOUT), dict):
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


class WorkerPool:
    """Idle workers, started on first use and reused; a timed-out worker is replaced."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.idle: list[GradingWorker] = []
        self.closed = False

    def acquire(self) -> GradingWorker:
        with self.lock:
            while self.idle:
                worker = self.idle.pop()
                if worker.alive():
                    return worker
                worker.kill()
        return GradingWorker()

    def release(self, worker: GradingWorker) -> None:
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


_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def current_pool() -> WorkerPool:
    """This process's pool, made on first use (and again after a fork or a shutdown)."""
    global _POOL
    with _POOL_LOCK:
        # After os.fork the inherited pipes belong to the parent's workers: start our own.
        if _POOL is None or _POOL.pid != os.getpid() or _POOL.closed:
            _POOL = WorkerPool()
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
    pool = current_pool()
    workers = [pool.acquire() for _ in range(max(1, processes))]
    try:
        for worker in workers:
            worker.wait_ready()
    finally:
        for worker in workers:
            pool.release(worker)


def run_requests(requests: list[dict[str, Any]], timeout: float, processes: int) -> list[dict[str, Any] | None]:
    """Run requests on up to ``processes`` workers, one driving thread each; replies in order.

    A request that times out gets ``{"status": "timeout"}``; one whose worker crashed twice
    (on two fresh workers) gets ``{"status": "unparsable"}``.
    """
    results: list[dict[str, Any] | None] = [None] * len(requests)
    if not requests:
        return results
    pool = current_pool()
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
                    count("worker_calls")
                    busy = True
                    reply = worker.call(requests[index], timeout)
                    busy = False
                    if isinstance(reply, dict):
                        results[index] = reply
                        break
                    worker.kill()
                    if reply == "timeout":
                        count("timeouts")
                        results[index] = {"status": "timeout"}
                        worker = pool.acquire()  # an idle one, or a new one importing already
                        break
                    # A crash may be the worker's fault (killed while idle) rather than the
                    # input's, so try once more on a brand-new worker; a second crash (e.g. a C
                    # stack overflow on this input) reads as an answer that cannot be parsed.
                    count("worker_crashes")
                    results[index] = {"status": "unparsable"}
                    worker = GradingWorker()
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

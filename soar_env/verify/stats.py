"""Grading counters for run logs: how many grades, how many reached a worker, timed out, crashed."""

from __future__ import annotations

import threading

__all__ = ["count", "grading_stats", "reset_grading_stats"]

_LOCK = threading.Lock()
_STATS: dict[str, int] = {}
_KEYS = ("graded", "fast_path", "worker_calls", "timeouts", "worker_crashes", "workers_started")


def reset_grading_stats() -> None:
    """Zero the counters reported by :func:`grading_stats`."""
    with _LOCK:
        _STATS.clear()
        _STATS.update({key: 0 for key in _KEYS})


def grading_stats() -> dict[str, int]:
    """Counters since start (or the last reset), for run logs.

    ``graded`` grades returned; ``fast_path`` of them settled by string equality alone;
    ``worker_calls`` requests sent to a worker; ``timeouts`` requests that hit the time limit;
    ``worker_crashes`` workers that died mid-request; ``workers_started`` processes launched.
    """
    with _LOCK:
        return dict(_STATS)


def count(key: str, n: int = 1) -> None:
    """Add ``n`` to counter ``key`` (thread-safe)."""
    with _LOCK:
        _STATS[key] = _STATS.get(key, 0) + n


reset_grading_stats()

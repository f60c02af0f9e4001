"""Student runs on Ray (``backend="ray"``): the g x r runs of a teacher step on a cluster.

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=4, preset="paper", backend="ray", ray_address="auto")

Each worker is a Ray actor holding one student replica, built once from the env's config
(pinned to a GPU when the cluster has GPUs). A step sends every worker the baseline weights
(once per baseline, through the object store) and a stream of `RunSpec`s; each run comes back
as a `RunRecord` without its trained weights, which stay on the worker until the env asks
for the one run it promotes. The baseline, Q_R, the baseline's cached evaluation, the
promotion rule and PQ stay in the env's process, and every seed is drawn there before the
runs start, so a step computes what ``backend="local"`` computes for the same seed.

Faults: a run whose worker dies (or raises) is resubmitted, up to ``ray_max_retries`` times,
and every failure is recorded in the dataset's ``info["backend_events"]``. A run that still
fails is reported in ``info["errors"]`` and counts as a run that learned nothing (gain 0),
the same rule as a local run stopped by a non-finite loss; it is never left out of the mean.
"""

from __future__ import annotations

import collections
import importlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from soar_env.config import EnvConfig
from soar_env.batched_runs import BatchedLocalRunner
from soar_env.runs import LocalRunner, RunRecord, RunSpec
from soar_env.student import build_student

RESTART_POLL_SECONDS = 0.5
"""Pause between pings of a worker that Ray is restarting."""

FORWARDED_ENV_PREFIXES = ("SOAR_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
"""Environment variables a worker inherits from the driver: offline mode and our own switches."""


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("backend='ray' needs Ray: pip install 'soar-gym[ray]'") from None
    return ray


def load_student_factory(spec: str | None) -> Callable[[EnvConfig], Any]:
    """``"module:function"`` -> the callable; None -> `soar_env.student.build_student`, as the env's own."""
    if spec is None:
        return build_student
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"ray_student_factory must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


class StudentWorker:
    """A Ray actor: one student replica that executes run specs against a baseline it caches."""

    def __init__(self, config: EnvConfig, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.student = load_student_factory(config.ray_student_factory)(config)
        self.runner = BatchedLocalRunner(self.student) if config.batch_runs else LocalRunner(self.student)
        """Runs a share: as one batch when ``batch_runs`` and the student allow it, else one by one."""
        self.baseline_id: int | None = None
        self.baseline: Any = None
        self.step = -1
        self.states: dict[int, Any] = {}
        """Trained weights of this step's runs, by run index, until the env picks one."""

    def run(self, spec: RunSpec, baseline_id: int, baseline_box: list[Any], step: int) -> RunRecord:
        return self.run_many((spec,), baseline_id, baseline_box, step)[0]

    def run_many(self, specs: Sequence[RunSpec], baseline_id: int, baseline_box: list[Any],
                 step: int) -> list[RunRecord]:
        """This worker's share of a step: one batch when ``batch_runs`` and the student allow it."""
        import ray  # the optional extra: only ever imported inside a Ray worker

        if step != self.step:
            self.step, self.states = step, {}
        if baseline_id != self.baseline_id:
            # The list keeps Ray from resolving the ref for calls that already hold this baseline.
            self.student.promote(ray.get(baseline_box[0]))
            # Compared with trained states by `execute_run`, so read it back as the student holds it.
            self.baseline, self.baseline_id = self.student.baseline_state(), baseline_id
        records = self.runner.run(specs, baseline_id=baseline_id, baseline=self.baseline)
        for spec, record in zip(specs, records):
            if record.state is not None:
                self.states[spec.index] = record.state
                record.state = True  # "kept here": the driver wraps it in a RemoteState
            record.worker = f"pid {os.getpid()}"
        return records

    def keep_only(self, step: int, index: int | None) -> None:
        """Free every trained state of ``step`` but run ``index``'s (the one that may be promoted)."""
        if step == self.step:
            self.states = {index: self.states[index]} if index in self.states else {}

    def fetch(self, step: int, index: int) -> Any:
        """The trained weights of run ``index`` of ``step``; None if this worker no longer has them."""
        return _to_cpu(self.states.get(index)) if step == self.step else None

    def pid(self) -> int:
        return os.getpid()


class RemoteState:
    """The weights of one run that are still on its worker; `SOARCore.promote` calls ``fetch``."""

    def __init__(self, runner: "RayRunner", spec: RunSpec, worker: int, step: int) -> None:
        self.runner, self.spec, self.worker, self.step = runner, spec, worker, step

    def fetch(self) -> Any:
        return self.runner.fetch_state(self)


class RayRunner:
    """Spreads run specs over Ray actors; ``parallel``: the env hands it a whole step at once."""

    parallel = True

    def __init__(self, config: EnvConfig) -> None:
        ray = require_ray()
        self.config = config
        self.ray = ray
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        if not ray.is_initialized():
            # address None starts a one-machine cluster here; "auto" or "host:port" joins one.
            ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True)
        resources = ray.cluster_resources()
        gpus = config.ray_gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        cpus = float(config.ray_cpus_per_worker)
        workers = config.ray_workers
        if workers is None:
            # One replica per run of a step, as many as the cluster can hold at once.
            runs = config.num_datasets * config.repeats
            fit = int(resources.get("CPU", 1) // cpus) if cpus > 0 else runs
            if gpus > 0:
                fit = min(fit, int(resources.get("GPU", 0) // gpus))
            if fit < 1:
                raise ValueError(f"no Ray worker fits this cluster ({resources.get('CPU', 0)} CPUs, "
                                 f"{resources.get('GPU', 0)} GPUs) with {cpus} CPUs and {gpus} GPUs per worker")
            workers = min(runs, fit)
        actor = ray.remote(StudentWorker).options(
            num_cpus=cpus, num_gpus=gpus,
            max_restarts=-1,  # a dead worker comes back with a fresh replica; retries below stay bounded
            max_task_retries=0,  # we retry ourselves, so every failure is seen and recorded
            runtime_env={"env_vars": forwarded} if forwarded else None,
        )
        self._actor, self._threads = actor, max(1, int(cpus))
        self.workers = [actor.remote(config, self._threads) for _ in range(workers)]
        self._recovering: dict[int, Any] = {}
        """Workers starting or restarting, with the ping that tells when they are up."""
        self._recovering_since: dict[int, float] = {}
        self._replacements: collections.Counter[int] = collections.Counter()
        self._dropped: set[int] = set()
        """Workers given up on: they failed to come back ``ray_max_retries`` times, or timed out."""
        for worker in range(len(self.workers)):
            self._recover(worker)  # a new worker gets work once its student is built
        self._baseline_id: int | None = None
        self._baseline_ref: Any = None
        self._step = 0
        self._events: list[dict[str, Any]] = []

    # -- a step ----------------------------------------------------------------------------------

    def run(self, specs: Sequence[RunSpec], *, baseline_id: int, baseline: Any) -> list[RunRecord]:
        ray = self.ray
        if baseline_id != self._baseline_id or self._baseline_ref is None:
            self._baseline_ref = ray.put(_to_cpu(baseline))
            self._baseline_id = baseline_id
        self._step += 1
        records: dict[int, RunRecord] = {}
        attempts: collections.Counter[int] = collections.Counter()
        idle = [w for w in self._live() if w not in self._recovering]
        # A unit of work goes to one worker: one run, or with batch_runs a worker's share of the
        # step (specs w, w + W, ...), which it trains as one batch; a failed share is retried whole.
        shares = max(1, len(self._live())) if self.config.batch_runs else len(specs)
        pending = collections.deque(tuple(specs[w::shares]) for w in range(shares) if specs[w::shares])
        runs: dict[Any, tuple[tuple[RunSpec, ...], int]] = {}
        while pending or runs:
            while pending and idle:
                unit, worker = pending.popleft(), idle.pop(0)
                for spec in unit:
                    attempts[spec.index] += 1
                ref = self.workers[worker].run_many.remote(unit, baseline_id, [self._baseline_ref], self._step)
                runs[ref] = (unit, worker)
            if not runs and not self._recovering:  # every worker was dropped: nothing can run these
                for unit in pending:
                    for spec in unit:
                        records[spec.index] = self._failed(spec, attempts[spec.index], "no Ray worker is left")
                pending.clear()
                break
            ready, _ = ray.wait([*runs, *self._recovering.values()], num_returns=1, timeout=RESTART_POLL_SECONDS)
            if not ready:
                self._drop_stalled()
                continue
            ref = ready[0]
            if ref not in runs:
                worker = next(w for w, ping in self._recovering.items() if ping == ref)
                if self._answered(worker, ref):
                    idle.append(worker)
                continue
            unit, worker = runs.pop(ref)
            try:
                done = ray.get(ref)
            except ray.exceptions.RayError as exc:
                failure = _describe(exc)
                retry = attempts[unit[0].index] <= self.config.ray_max_retries
                for spec in unit:
                    self._events.append({"run": spec.index, "attempt": attempts[spec.index], "worker": worker,
                                         "error": failure, "action": "retried" if retry else "gave up"})
                self._recover(worker)  # it restarts with a fresh replica; work again once it answers
                if retry:
                    pending.appendleft(unit)
                else:
                    for spec in unit:
                        records[spec.index] = self._failed(spec, attempts[spec.index], failure)
                continue
            idle.append(worker)
            for spec, record in zip(unit, done):
                record.attempts = attempts[spec.index]
                if record.state is True:
                    record.state = RemoteState(self, spec, worker, self._step)
                records[spec.index] = record
        return [records[spec.index] for spec in specs]

    def keep_only(self, keep: Any) -> None:
        """Drop this step's trained weights on every worker except ``keep``'s (a RemoteState or None)."""
        for worker in self._live():
            index = keep.spec.index if isinstance(keep, RemoteState) and keep.worker == worker else None
            self.workers[worker].keep_only.remote(self._step, index)  # ordered before any later fetch

    # -- worker health -----------------------------------------------------------------------------

    def _live(self) -> list[int]:
        return [w for w in range(len(self.workers)) if w not in self._dropped]

    def _recover(self, worker: int) -> None:
        """Wait for ``worker`` to answer a ping before it gets work again (Ray is restarting it)."""
        self._recovering[worker] = self.workers[worker].pid.remote()
        self._recovering_since.setdefault(worker, time.monotonic())

    def _answered(self, worker: int, ping: Any) -> bool:
        """Whether a recovering worker answered its ping; if not, ping it again (or replace it)."""
        ray = self.ray
        try:
            ray.get(ping)
        except ray.exceptions.ActorUnavailableError:  # still restarting
            time.sleep(RESTART_POLL_SECONDS)
            self._recovering[worker] = self.workers[worker].pid.remote()
            return False
        except ray.exceptions.RayError as exc:  # gone for good (its node left, or it cannot start)
            self._replacements[worker] += 1
            if self._replacements[worker] > self.config.ray_max_retries:
                self._drop(worker, f"replaced {self._replacements[worker] - 1} times, last: {_describe(exc)}")
                return False
            self._events.append({"worker": worker, "error": _describe(exc), "action": "replaced"})
            self.workers[worker] = self._actor.remote(self.config, self._threads)
            self._recovering[worker] = self.workers[worker].pid.remote()
            return False
        del self._recovering[worker]
        self._recovering_since.pop(worker, None)
        return True

    def _drop_stalled(self) -> None:
        """Drop workers that have not come up within ``ray_worker_timeout`` (e.g. cannot be placed)."""
        now = time.monotonic()
        for worker, since in list(self._recovering_since.items()):
            if now - since > self.config.ray_worker_timeout:
                self._drop(worker, f"did not start within {self.config.ray_worker_timeout:.0f} s")

    def _drop(self, worker: int, why: str) -> None:
        self._dropped.add(worker)
        self._recovering.pop(worker, None)
        self._recovering_since.pop(worker, None)
        self._events.append({"worker": worker, "error": why, "action": "dropped"})
        try:
            self.ray.kill(self.workers[worker])
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _failed(self, spec: RunSpec, attempts: int, why: str) -> RunRecord:
        return RunRecord(index=spec.index, attempts=attempts, worker="ray",
                         error=f"ray: run {spec.index} failed after {attempts} attempt(s), last: {why}")

    # -- promotion -----------------------------------------------------------------------------------

    def fetch_state(self, remote: RemoteState) -> Any:
        """The weights of one run; if its worker died since, the run is redone (it is deterministic)."""
        ray = self.ray
        if remote.step != self._step:
            raise RuntimeError("a RemoteState can only be fetched during the step that produced it")
        live = self._live()
        candidates = [remote.worker] + [w for w in live if w != remote.worker]
        for attempt, worker in enumerate(candidates[: self.config.ray_max_retries + 1], start=1):
            if worker in self._dropped:
                continue
            try:
                state = ray.get(self.workers[worker].fetch.remote(remote.step, remote.spec.index))
                if state is None:  # the worker restarted and lost it: train that run again there
                    ray.get(self.workers[worker].run.remote(
                        remote.spec, self._baseline_id, [self._baseline_ref], remote.step))
                    state = ray.get(self.workers[worker].fetch.remote(remote.step, remote.spec.index))
                    self._events.append({"run": remote.spec.index, "attempt": attempt, "worker": worker,
                                         "error": "trained weights lost with their worker", "action": "re-ran"})
                if state is not None:
                    return state
            except ray.exceptions.RayError as exc:
                self._events.append({"run": remote.spec.index, "attempt": attempt, "worker": worker,
                                     "error": _describe(exc), "action": "fetch retried"})
                self._recover(worker)
        raise RuntimeError(f"could not fetch the weights of run {remote.spec.index} to promote them")

    def events(self) -> list[dict[str, Any]]:
        """Worker failures since the last call (runs, fetches, replacements), then forgotten."""
        events, self._events = self._events, []
        return events

    def worker_pids(self) -> list[int]:
        return [self.ray.get(w.pid.remote()) for w in self.workers]

    def close(self) -> None:
        for worker in self.workers:
            try:
                self.ray.kill(worker)
            except Exception:  # noqa: BLE001 - Ray already shut down, or the actor is gone
                pass
        self.workers = []


def _to_cpu(state: Any) -> Any:
    """Tensors of a state dict on the CPU: what crosses between processes must not name a GPU."""
    if not isinstance(state, dict):
        return state
    return {k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in state.items()}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


__all__ = ["RayRunner", "RemoteState", "StudentWorker", "load_student_factory", "require_ray"]

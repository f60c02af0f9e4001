"""The student runs of one SOAR step as one batch: shared base weights, one LoRA adapter per run.

    runner = BatchedLocalRunner(student)           # EnvConfig.batch_runs=True picks it
    records = runner.run(specs, baseline_id=0, baseline=student.baseline_state())

The same records as `soar_env.runs.LocalRunner` for the same specs, up to float round-off
(tests bound it): each inner step samples the rows of every run in one decode batch, each row
with its own run's adapters and random stream (`soar_env.models.multi_lora.sample_runs`),
grades them in one call, and makes every run's RLOO update in one forward/backward
(`BatchedRLOO`). Each run keeps its own `RLOOUpdater` (AdamW, cosine, step count) over its own
adapter tensors, so per-run semantics stay: its loss is its own token mean, its gradient norm
is clipped on its own, a run whose advantages are all zero skips alone, and a non-finite loss or
gradient fails only its run. The Q_R evaluations run batched the same way.

Needs a LoRA student on the ``"llama"`` decode engine (`multi_lora.can_sample_runs`); any other
student runs sequentially through the same runner (`batch_unsupported` says why).

Ray backend: each worker batches its share. The driver hands worker w the specs
``specs[w::workers]`` in one call and the worker runs ``execute_runs(student, share, baseline)``
instead of ``execute_run`` per spec; a failed worker retries its whole share.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from soar_env.estimators import QRScores, sampling_for, score_qr
from soar_env.models.multi_lora import MultiLora, can_sample_runs, run_logprobs, sample_runs
from soar_env.problems import Problem
from soar_env.rl.rloo import NonFiniteLossError, RLOOConfig, RLOOUpdater, rloo_advantages, rloo_loss
from soar_env.runs import LocalRunner, ProgressEvent, ProgressFn, RunRecord, RunSpec, same_state
from soar_env.student import Student, TrainResult, checked_problems, shuffled_cycle

Outcome = dict[str, float] | NonFiniteLossError
"""One run's update: its stats, or why it failed (its weights and moments untouched)."""


class BatchedRLOO:
    """R `RLOOUpdater`s, one per run's adapters, whose updates share one forward/backward.

    Equal to R sequential ``RLOOUpdater.update`` calls: in the summed loss only run k's own
    term (its own token mean) depends on run k's adapters, so each adapter's gradient is its
    run's alone; clipping, the finite checks and the optimizer steps then run per run.
    ``rows_per_pass`` replaces the config's ``micro_batch_size`` (rows of all runs together).
    """

    def __init__(self, bank: MultiLora, config: RLOOConfig, total_steps: Sequence[int], *,
                 rows_per_pass: int | None = 64) -> None:
        self.bank = bank
        self.config = config
        self.rows_per_pass = rows_per_pass
        self.updaters = [RLOOUpdater(bank.parameters_of(k), config, total_steps=max(int(s), 1))
                         for k, s in enumerate(total_steps)]

    def update(self, policy: Any, rollouts: Sequence[Any], rewards: Sequence[Sequence[float]], group_size: int,
               *, temperature: float = 1.0, runs: Sequence[int] | None = None) -> list[Outcome]:
        """One RLOO step of each run in ``runs`` (default: all) on its prompt-major rollout.

        Call with the bank detached: the KL reference pass, the same for every run (they start
        from one baseline), runs on the policy's own layers.
        """
        config = self.config
        runs = list(range(len(rollouts))) if runs is None else list(runs)
        results: list[Outcome] = []
        live: list[tuple[int, int, torch.Tensor, float]] = []  # (position, run, advantages, normalizer)
        for position, (k, rollout, run_rewards) in enumerate(zip(runs, rollouts, rewards)):
            updater = self.updaters[k]
            n = len(rollout.completion_ids)
            if len(run_rewards) != n or group_size < 1 or n % group_size:
                raise ValueError(f"run {k}: {len(run_rewards)} rewards for {n} completions, groups of {group_size}")
            reward_tensor = torch.tensor(list(run_rewards), dtype=torch.float32).view(n // group_size, group_size)
            advantages = rloo_advantages(reward_tensor).view(-1)  # (B_k,)
            tokens = sum(len(c) for c in rollout.completion_ids)
            stats = {"reward_mean": float(reward_tensor.mean().item()),
                     "reward_std": float(reward_tensor.std(unbiased=False).item()),
                     "advantage_abs_mean": float(advantages.abs().mean().item()),
                     "tokens": float(tokens), "lr": updater.lr, "skipped": 0.0}
            results.append(stats)
            if (config.skip_zero_advantage and bool((advantages == 0).all())) or tokens == 0:
                stats.update(loss=0.0, pg_loss=0.0, kl=0.0, advantage_mean=0.0, grad_norm=0.0, skipped=1.0)
                updater._advance_schedule_only()
            else:
                normalizer = float(tokens) if config.loss_normalization == "tokens" else float(n)
                live.append((position, k, advantages, normalizer))
        if live:
            stepping = self._backward(policy, rollouts, live, results, float(temperature))
            self._step(stepping, results)
        return results

    def _backward(self, policy: Any, rollouts: Sequence[Any], live: list[tuple[int, int, torch.Tensor, float]],
                  results: list[Outcome], temperature: float) -> list[tuple[int, int]]:
        """Accumulate every live run's gradient; returns (position, run) of the runs still finite.

        Rows of all live runs, run-major, go in passes of at most ``rows_per_pass`` (a pass may hold
        several runs, a run may span passes); each piece is normalised by its run's whole count,
        so run k's accumulated gradient is its full-batch one, as RLOOUpdater's micro-batches.
        """
        config = self.config
        prompt_ids = [p for position, *_ in live for p in rollouts[position].prompt_ids]
        completion_ids = [c for position, *_ in live for c in rollouts[position].completion_ids]
        row_runs = [k for position, k, *_ in live for _ in rollouts[position].completion_ids]
        owner = [j for j, (position, *_) in enumerate(live) for _ in rollouts[position].completion_ids]
        first = [owner.index(j) for j in range(len(live))]  # first row of each live run
        step = self.rows_per_pass or len(row_runs)
        scoring = {} if temperature == 1.0 else {"temperature": temperature}
        # A run still holding the policy's adapters, which are its KL reference (every run's first
        # update), scores what the reference pass would: its own log-probs serve, as in RLOOUpdater.
        at_reference: set[int] = set()
        if config.kl_coef > 0 and bool(getattr(policy, "reference_is_current", lambda: False)()):
            at_reference = {j for j, (_, k, *_) in enumerate(live) if self.bank.holds_policy_adapters(k)}
        for updater in self.updaters:
            updater.optimizer.zero_grad(set_to_none=True)
        sums = [dict(loss=0.0, pg_loss=0.0, kl=0.0, advantage=0.0) for _ in live]
        failed: dict[int, float] = {}  # live index -> the non-finite loss
        for lo in range(0, len(row_runs), step):
            hi = min(lo + step, len(row_runs))
            ref_logprobs = None
            reuse = set(owner[lo:hi]) <= at_reference
            if config.kl_coef > 0 and not reuse:
                with torch.no_grad():
                    ref_logprobs, _ = policy.token_logprobs(prompt_ids[lo:hi], completion_ids[lo:hi],
                                                            reference=True, **scoring)
            with self.bank.attached():
                logprobs, mask = run_logprobs(policy, self.bank, prompt_ids[lo:hi], completion_ids[lo:hi],
                                              row_runs[lo:hi], temperature=temperature)  # (b, T)
                if config.kl_coef > 0 and reuse:
                    ref_logprobs = logprobs.detach()
                total = None
                for j in sorted(set(owner[lo:hi])):
                    a, b = max(first[j], lo) - lo, min(first[j] + len(live[j][2]), hi) - lo  # run j's rows here
                    _, _, advantages, normalizer = live[j]
                    loss, piece = rloo_loss(logprobs[a:b], None if ref_logprobs is None else ref_logprobs[a:b],
                                            mask[a:b], advantages[a + lo - first[j] : b + lo - first[j]],
                                            config.kl_coef, normalizer=normalizer,
                                            normalization=config.loss_normalization)
                    if j in failed:
                        continue
                    if not math.isfinite(piece["loss"]):
                        failed[j] = piece["loss"]
                        continue
                    sums[j]["loss"] += piece["loss"]
                    sums[j]["pg_loss"] += piece["pg_loss"]
                    sums[j]["kl"] += piece["kl"] * piece["tokens"]
                    sums[j]["advantage"] += piece["advantage_mean"] * (b - a)
                    total = loss if total is None else total + loss
                if total is not None:
                    total.backward()
        stepping = []
        for j, (position, k, advantages, _) in enumerate(live):
            stats = results[position]
            assert isinstance(stats, dict)
            if j in failed:
                self.updaters[k].optimizer.zero_grad(set_to_none=True)
                stats.update(loss=failed[j], pg_loss=sums[j]["pg_loss"], kl=float("nan"), grad_norm=float("nan"))
                results[position] = NonFiniteLossError(f"non-finite RLOO loss {failed[j]}", stats)
                continue
            stats.update(loss=sums[j]["loss"], pg_loss=sums[j]["pg_loss"], kl=sums[j]["kl"] / max(stats["tokens"], 1.0),
                         advantage_mean=sums[j]["advantage"] / len(advantages))
            stepping.append((position, k))
        return stepping

    def _step(self, stepping: list[tuple[int, int]], results: list[Outcome]) -> None:
        """Per run: clip its own global norm, check, step (as ``RLOOUpdater.update`` does)."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        for position, k in stepping:
            updater = self.updaters[k]
            stats = results[position]
            assert isinstance(stats, dict)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(updater.params, max_norm).item())
            stats["grad_norm"] = grad_norm
            if not math.isfinite(grad_norm):
                updater.optimizer.zero_grad(set_to_none=True)
                results[position] = NonFiniteLossError(f"non-finite gradient norm {grad_norm}", stats)
                continue
            updater.optimizer.step()
            updater.optimizer.zero_grad(set_to_none=True)
            updater.scheduler.step()
            updater.steps_done += 1


def _grade(student: Student, rollouts: Sequence[Any], problem_lists: Sequence[Sequence[Problem]]) -> list[list[Any]]:
    """All runs' rows graded in one call (`Student.grade_replies`); per run, its grades."""
    texts = [t for r in rollouts for t in r.texts]
    stopped = [s for r in rollouts for s in r.stopped]
    golds = [problems[i].answer for r, problems in zip(rollouts, problem_lists) for i in r.prompt_index]
    grades = student.grade_replies(texts, stopped, golds)
    out, start = [], 0
    for r in rollouts:
        out.append(grades[start : start + len(r)])
        start += len(r)
    return out


def train_runs(student: Student, specs: Sequence[RunSpec], bank: MultiLora | None = None, *,
               rows_per_pass: int | None = 64, rows_per_decode: int = 128,
               on_step: Callable[[list[int], int], None] | None = None) -> list[TrainResult]:
    """``student.train(spec.problems, spec.steps, spec.batch_size, spec.group_size, seed=spec.seed)``
    for every spec, batched; bank run k ends holding spec k's trained adapters.

    Problem order and sampling seeds come from each run's own ``random.Random(seed)``, as in
    ``Student.train``. The policy holds the baseline before and after. ``on_step(runs, done)``
    hears, after each batched inner step, which runs (positions in ``specs``) took it.
    """
    config = student.config
    group_sizes = {s.group_size for s in specs}
    if len(group_sizes) > 1:
        raise ValueError(f"batched runs need one group size, got {sorted(group_sizes)}")
    group_size = group_sizes.pop() if group_sizes else 1
    bank = bank or MultiLora(student.policy, runs=len(specs))
    student.reset()
    student.sync_reference()
    baseline = student.policy.state_dict_trainable()
    results, problems, orders, rngs = [], [], [], []
    for k, spec in enumerate(specs):
        bank.load_state(k, baseline)
        valid, skipped = checked_problems(spec.problems)
        result = TrainResult(steps_done=0, num_problems=len(valid), skipped=skipped)
        if not valid:
            result.error = f"no_valid_problems: all {len(skipped)} entries were skipped"
        results.append(result)
        problems.append(valid)
        rngs.append(random.Random(spec.seed))
        orders.append(shuffled_cycle(len(valid), rngs[-1]) if valid else None)
    updater = BatchedRLOO(bank, config.rloo_config(), [s.steps for s in specs], rows_per_pass=rows_per_pass)
    start = time.perf_counter()
    try:
        for step in range(max((s.steps for s in specs), default=0)):
            active = [k for k, s in enumerate(specs) if step < s.steps and results[k].error is None]
            if not active:
                break
            _inner_step(student, specs, bank, updater, step, active, problems, orders, rngs, results, group_size,
                        rows_per_decode)
            if on_step is not None:
                on_step(active, step + 1)
    finally:
        student.reset()
    seconds = time.perf_counter() - start
    for k, result in enumerate(results):
        result.seconds = seconds / max(len(specs), 1)  # the batch's wall clock, shared out
        if result.error is None:
            result.state = bank.state_of(k)
    return results


def _inner_step(student: Student, specs: Sequence[RunSpec], bank: MultiLora, updater: BatchedRLOO, step: int,
                active: list[int], problems: list[list[Problem]], orders: list[Any], rngs: list[random.Random],
                results: list[TrainResult], group_size: int, rows_per_decode: int) -> None:
    """One RLOO step of every active run: sample together, grade together, update together."""
    config = student.config
    t0 = time.perf_counter()
    batches = {k: [problems[k][next(orders[k])] for _ in range(specs[k].batch_size)] for k in active}
    seeds = {k: rngs[k].randrange(2**31) for k in active}  # drawn after the batch, as Student.rloo_steps does
    # Adapters are addressed by run index: an inactive run gets no prompts (no rows, no draws).
    sampled = sample_runs(student.policy, bank, [student._prompts(batches[k]) if k in batches else []
                                                 for k in range(len(specs))],
                          num_samples=group_size, temperature=config.temperature,
                          max_new_tokens=config.max_new_tokens, seeds=[seeds.get(k, 0) for k in range(len(specs))],
                          rows_per_batch=rows_per_decode)
    rollouts = [sampled[k] for k in active]
    t1 = time.perf_counter()
    grades = _grade(student, rollouts, [batches[k] for k in active])
    rewards = [[1.0 if g.correct else 0.0 for g in run_grades] for run_grades in grades]
    t2 = time.perf_counter()
    outcomes = updater.update(student.policy, rollouts, rewards, group_size, temperature=config.temperature,
                              runs=active)
    t3 = time.perf_counter()
    for k, rollout, run_rewards, outcome in zip(active, rollouts, rewards, outcomes):
        result = results[k]
        tokens = sum(len(c) for c in rollout.completion_ids)
        result.tokens += tokens
        if isinstance(outcome, NonFiniteLossError):
            result.error = f"non_finite_loss at step {step}: {outcome}"
            result.stats.append({"step": float(step), **outcome.stats})
            continue
        outcome.update(step=float(step), sampled_tokens=float(tokens), sample_seconds=t1 - t0,
                       grade_seconds=t2 - t1, update_seconds=t3 - t2, batched_runs=float(len(active)))
        result.stats.append(outcome)
        result.rewards.append(sum(run_rewards) / len(run_rewards))
        result.steps_done += 1


def evaluate_runs(student: Student, specs: Sequence[RunSpec], states: Sequence[Any], bank: MultiLora, *,
                  rows_per_decode: int = 128) -> list[QRScores]:
    """`score_qr` of each (spec, state) on its eval problems; a state of None is the baseline.

    Greedy and sampled estimators decode together (`Student.evaluate` of every run in one batch,
    specs with the same estimator, samples and token limit sharing a decode); the likelihood
    estimator, one teacher-forced pass without generation, runs per state.
    """
    config = student.config
    baseline = student.policy.state_dict_trainable()
    out: list[QRScores | None] = [None] * len(specs)
    kinds: dict[tuple[str, int, int], list[int]] = {}
    for k, spec in enumerate(specs):
        if spec.estimator == "likelihood":
            out[k] = score_qr(student, list(spec.eval_problems), spec.estimator, samples=spec.eval_samples,
                              max_new_tokens=spec.eval_tokens, state=states[k])
            continue
        samples, _ = sampling_for(spec.estimator, spec.eval_samples)
        kinds.setdefault((spec.estimator, samples, spec.eval_tokens), []).append(k)
    for (estimator, samples, eval_tokens), members in kinds.items():
        start = time.perf_counter()
        for slot, k in enumerate(members):
            bank.load_state(slot, states[k] if states[k] is not None else baseline)
        problem_lists = [list(specs[k].eval_problems) for k in members]
        seeds = [specs[k].seed if specs[k].eval_seed is None else specs[k].eval_seed for k in members]
        rollouts = sample_runs(student.policy, bank, [student._prompts(p) for p in problem_lists],
                               num_samples=samples, temperature=config.temperature, max_new_tokens=eval_tokens,
                               greedy=estimator == "greedy", seeds=seeds, rows_per_batch=rows_per_decode)
        grades = _grade(student, rollouts, problem_lists)
        seconds = (time.perf_counter() - start) / len(members)
        for k, problems, rollout, run_grades in zip(members, problem_lists, rollouts, grades):
            correct = [0] * len(problems)
            for i, g in zip(rollout.prompt_index, run_grades):
                correct[i] += int(bool(g.correct))
            out[k] = QRScores(estimator, correct, samples, seconds=seconds, tokens=rollout.num_tokens)
    return [scores for scores in out if scores is not None]


def execute_runs(student: Student, specs: Sequence[RunSpec], baseline: Any, *, rows_per_pass: int | None = 64,
                 rows_per_decode: int = 128,
                 on_event: Callable[[str, int, int], None] | None = None) -> list[RunRecord]:
    """`soar_env.runs.execute_run` for every spec, trained and evaluated as one batch.

    ``on_event(kind, position, inner_steps_done)`` hears ``"inner_step"`` per run after each
    batched step and ``"run_eval"`` per evaluated run before the batched evaluation. Seconds are
    the batch's, shared out evenly among its runs.
    """
    if not specs:
        return []
    bank = MultiLora(student.policy, runs=len(specs))
    records = [RunRecord(index=s.index) for s in specs]
    t0 = time.perf_counter()
    training = [k for k, s in enumerate(specs) if s.steps > 0]
    states: list[Any] = [None] * len(specs)
    evaluate = [k for k, s in enumerate(specs) if s.steps == 0]
    if training:
        def on_step(active: list[int], done: int) -> None:
            for j in active:
                on_event("inner_step", training[j], done)  # type: ignore[misc]

        trained = train_runs(student, [specs[k] for k in training], bank, rows_per_pass=rows_per_pass,
                             rows_per_decode=rows_per_decode, on_step=None if on_event is None else on_step)
        for k, result in zip(training, trained):
            record = records[k]
            record.tokens += int(result.tokens)
            record.train_rewards = [float(r) for r in result.rewards]
            record.error = result.error
            if result.state is not None and not (specs[k].deterministic_eval and same_state(result.state, baseline)):
                states[k] = result.state
                evaluate.append(k)
    t1 = time.perf_counter()
    for record in records:
        record.train_seconds = (t1 - t0) / len(specs)
    if evaluate:
        evaluate.sort()
        for k in evaluate if on_event is not None else []:
            on_event("run_eval", k, specs[k].steps)  # type: ignore[misc]
        scored = evaluate_runs(student, [specs[k] for k in evaluate], [states[k] for k in evaluate], bank,
                               rows_per_decode=rows_per_decode)
        for k, scores in zip(evaluate, scored):
            records[k].scores = scores
            records[k].tokens += scores.tokens
            records[k].state = states[k]
            records[k].eval_seconds = scores.seconds
    return records


def batch_unsupported(student: Any) -> str | None:
    """None when `BatchedLocalRunner` can batch this student's runs, else why it runs them one by one."""
    if not isinstance(student, Student):
        return f"{type(student).__name__} is not a Student"
    return can_sample_runs(student.policy)


class BatchedLocalRunner(LocalRunner):
    """`LocalRunner` with the specs of a step trained and evaluated as one batch (``batch_runs=True``).

    ``parallel`` (when the student can be batched): `SOARCore` hands it the whole step (g x r
    specs) at once, so all g x r trained states are alive together (a few MB each with LoRA).
    A student that cannot be batched (`batch_unsupported`) runs as under `LocalRunner`.
    """

    def __init__(self, student: Any, progress: ProgressFn | None = None, *, rows_per_pass: int | None = 64,
                 rows_per_decode: int = 128) -> None:
        super().__init__(student, progress)
        self.rows_per_pass = rows_per_pass
        """Completions per update forward/backward, all runs together (None: all at once); bounds memory."""
        self.rows_per_decode = rows_per_decode
        """Rows decoded together, all runs together; the KV cache grows with it."""
        self.unsupported = batch_unsupported(student)
        """Why this runner runs specs one by one (None: it batches them)."""

    @property
    def parallel(self) -> bool:  # type: ignore[override]
        return self.unsupported is None

    def run(self, specs: Sequence[RunSpec], *, baseline_id: int, baseline: Any) -> list[RunRecord]:
        if self.unsupported is not None:
            return super().run(specs, baseline_id=baseline_id, baseline=baseline)
        options = dict(rows_per_pass=self.rows_per_pass, rows_per_decode=self.rows_per_decode)
        progress, context = self.progress, self.progress_context
        if progress is None:
            return execute_runs(self.student, specs, baseline, **options)
        runs, inner = context["runs"] or len(specs), context["inner_steps"]

        def event(kind: Any, position: int, done: int) -> None:
            progress(ProgressEvent(kind, runs=runs, inner_steps=inner, run=specs[position].index, inner_step=done,
                                   runs_done=context["runs_done"]))

        for position in range(len(specs)):
            event("run_start", position, 0)
        records = execute_runs(self.student, specs, baseline, on_event=event, **options)
        for position, spec in enumerate(specs):
            context["runs_done"] += 1
            event("run_end", position, spec.steps)
        return records


__all__ = ["BatchedLocalRunner", "BatchedRLOO", "batch_unsupported", "evaluate_runs", "execute_runs", "train_runs"]

"""Does RLOO teach the embedded student? A learning curve, the 0/K premise, and determinism.

    python benchmarks/student_learning.py --threads 1 [--steps 30 --eval-at 5 10 20 30 --heldout 50]

Three checks, all with the library's own inner loop (``Student.train``) on the embedded
SmolLM2-135M-Instruct with LoRA (r=16, alpha=32, every linear layer):

1. **Learning curve.** RLOO on two-digit addition (generator ``addition@2``): 4 problems x 8
   samples per step, 24 new tokens, lr 2e-4 (cosine over the run, no warm-up), KL 0.001,
   graded with ``require_box=False`` (a reply without ``\\boxed{}`` is read by its last number).
   Greedy accuracy on ``--heldout`` problems of the same family that are not in the training
   pool, before training and after the steps in ``--eval-at``. The evaluations are made from
   inside the run (the policy holds the trained weights while ``Student.train`` runs; a greedy,
   seeded evaluation does not touch the run's random streams), so one 30-step run gives the
   whole curve. Wall and CPU time exclude the evaluations.
   Reference measured with a plain script on this machine type: 6% -> 44% after 10 steps ->
   52% after 30, about 12 s a step on 2 idle cores.
2. **0/K premise.** RLOO on problems the student fails every time (the bundled hard set, or
   ``--hard mul5``: 5-digit by 5-digit products) gives all-zero rewards, hence all-zero
   advantages, and must leave the trainable weights *bitwise* unchanged: once with the
   default shortcut (the update is skipped) and once with ``skip_zero_advantage=False`` (the
   forward, backward and AdamW step run, and the gradient is exactly zero).
3. **Determinism.** Two ``Student.train`` runs with the same seed in one process give the same
   samples (token ids), the same rewards and bitwise the same trained weights.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import torch

from benchmarks.timing import finish_run
from soar_env.data.generators import sample_problems
from soar_env.data.hardset import bundled_hardset_path, load_hardset
from soar_env.models import LMPolicy, LoraSettings, Rollout
from soar_env.problems import Problem
from soar_env.student import Student, StudentConfig
from soar_env.verify import shutdown_grading_pool, warm_up


def student_config(args: argparse.Namespace, **overrides: Any) -> StudentConfig:
    """The issue's settings: 4 problems x 8 samples, 24 tokens, lr 2e-4, last-number grading."""
    settings: dict[str, Any] = dict(
        steps=args.steps, batch_size=args.batch_size, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, eval_max_new_tokens=args.max_new_tokens,
        require_box=False, lr=args.lr, kl_coef=args.kl_coef, seed=args.seed,
    )
    settings.update(overrides)
    return StudentConfig(**settings)


def addition_pools(args: argparse.Namespace) -> tuple[list[Problem], list[Problem]]:
    """Training pool and held-out set of two-digit additions, disjoint by question."""
    family, _, level = args.family.partition("@")
    heldout = sample_problems(args.heldout, 10_000 + args.seed, families=(family,), difficulty=int(level), unique=True)
    taken = {p.question for p in heldout}
    pool = [p for p in sample_problems(args.pool + args.heldout, args.seed, families=(family,), difficulty=int(level),
                                       unique=True) if p.question not in taken]
    return pool[: args.pool], heldout


class RecordingSampler:
    """Wraps ``policy.sample``: records training rollouts and runs a callback before chosen calls."""

    def __init__(self, policy: LMPolicy, before_call: Any = None) -> None:
        self.policy = policy
        self.original = policy.sample
        self.before_call = before_call
        self.rollouts: list[Rollout] = []
        self.inside = False

    def __enter__(self) -> "RecordingSampler":
        self.policy.sample = self  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.policy.sample  # back to the class method

    def __call__(self, *args: Any, **kwargs: Any) -> Rollout:
        if self.inside or kwargs.get("greedy"):
            return self.original(*args, **kwargs)  # an evaluation
        if self.before_call is not None:
            self.inside = True
            try:
                self.before_call(len(self.rollouts))  # = optimizer steps done so far
            finally:
                self.inside = False
        rollout = self.original(*args, **kwargs)
        self.rollouts.append(rollout)
        return rollout


# ---------------------------------------------------------------------------------------------
# 1. learning curve


def learning_curve(args: argparse.Namespace, policy: LMPolicy) -> dict[str, Any]:
    pool, heldout = addition_pools(args)
    student = Student(policy, student_config(args))
    curve: list[dict[str, Any]] = []
    eval_clock = {"wall": 0.0, "cpu": 0.0}

    def evaluate(step: int) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        result = student.evaluate(heldout, greedy=True)  # the weights the policy holds right now
        eval_clock["wall"] += time.perf_counter() - wall
        eval_clock["cpu"] += time.process_time() - cpu
        curve.append({"step": step, "accuracy": result.accuracy, "correct": sum(result.correct),
                      "statuses": result.statuses})

    print(f"\n[1] learning curve: {args.family}, pool {len(pool)}, held-out {len(heldout)}, {args.steps} steps of "
          f"{args.batch_size} problems x {args.group_size} samples, {args.max_new_tokens} tokens, lr {args.lr}", flush=True)
    evaluate(0)
    print(f"  step  0: held-out greedy accuracy {curve[-1]['accuracy']:.0%}", flush=True)
    eval_clock.update(wall=0.0, cpu=0.0)  # only evaluations made inside the run are subtracted from its time
    checkpoints = set(args.eval_at)

    def before_sample(steps_done: int) -> None:
        if steps_done in checkpoints and steps_done > 0:
            evaluate(steps_done)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    with RecordingSampler(policy, before_sample):
        result = student.train(pool)
    train_wall = time.perf_counter() - wall0 - eval_clock["wall"]
    train_cpu = time.process_time() - cpu0 - eval_clock["cpu"]
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    if args.steps in checkpoints:
        wall, cpu = time.perf_counter(), time.process_time()
        final = student.evaluate(heldout, greedy=True, state=result.state)
        eval_clock["wall"] += time.perf_counter() - wall
        eval_clock["cpu"] += time.process_time() - cpu
        curve.append({"step": args.steps, "accuracy": final.accuracy, "correct": sum(final.correct),
                      "statuses": final.statuses})

    per_step = result.stats
    cumulative, elapsed = {}, 0.0
    for stats in per_step:
        elapsed += stats["sample_seconds"] + stats["grade_seconds"] + stats["update_seconds"]
        cumulative[int(stats["step"]) + 1] = elapsed
    print("\n| step | held-out greedy accuracy | train reward (that step) | cumulative train wall s |")
    print("|-----:|-------------------------:|-------------------------:|------------------------:|")
    for point in curve:
        step = point["step"]
        reward = f"{result.rewards[step - 1]:.2f}" if step > 0 else "-"
        print(f"| {step:4d} | {point['accuracy']:>18.0%} ({point['correct']:2d}/{len(heldout)}) | {reward:>24} "
              f"| {cumulative.get(step, 0.0):>23.0f} |")
    sample_s = sum(s["sample_seconds"] for s in per_step) / len(per_step)
    grade_s = sum(s["grade_seconds"] for s in per_step) / len(per_step)
    update_s = sum(s["update_seconds"] for s in per_step) / len(per_step)
    print(f"  per step: {train_wall / args.steps:.1f} s wall ({sample_s:.1f} sample + {grade_s:.1f} grade + "
          f"{update_s:.1f} update), {train_cpu / args.steps:.1f} s CPU of this process; "
          f"{result.tokens / args.steps:.0f} sampled tokens; skipped updates {sum(int(s['skipped']) for s in per_step)}")
    print(f"  training rewards per step: {' '.join(f'{r:.2f}' for r in result.rewards)}")
    print(f"  evaluations after step 0 took {eval_clock['wall']:.0f} s wall (not counted above)")
    return {"curve": curve, "rewards": result.rewards, "train_wall_s": train_wall, "train_cpu_s": train_cpu,
            "per_step_s": {"sample": sample_s, "grade": grade_s, "update": update_s}, "tokens": result.tokens,
            "heldout": len(heldout), "pool": len(pool)}


# ---------------------------------------------------------------------------------------------
# 2. the 0/K premise


def hard_problems(args: argparse.Namespace) -> tuple[list[Problem], str]:
    if args.hard == "bundled":
        if bundled_hardset_path().exists():
            return load_hardset("bundled", split="train"), f"bundled hard set ({bundled_hardset_path().name}, train split)"
        print("  (no bundled hard set yet: using 5-digit products)")
    rng = random.Random(args.seed)
    problems = []
    for _ in range(4 * args.hard_steps):
        a, b = rng.randint(10_000, 99_999), rng.randint(10_000, 99_999)
        problems.append(Problem(question=f"What is {a} × {b}?", answer=str(a * b), source="benchmark:mul5"))
    return problems, "5-digit x 5-digit products"


def zero_k_premise(args: argparse.Namespace, policy: LMPolicy) -> dict[str, Any]:
    problems, name = hard_problems(args)
    print(f"\n[2] 0/K premise on the {name}: {len(problems)} problems, {args.hard_steps} steps of "
          f"{args.batch_size} x {args.group_size} samples", flush=True)
    out: dict[str, Any] = {"source": name}
    for skip in (True, False):
        student = Student(policy, student_config(args, steps=args.hard_steps, skip_zero_advantage=skip))
        baseline = student.baseline_state()
        start = time.perf_counter()
        result = student.train(problems)
        seconds = time.perf_counter() - start
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
        assert result.state is not None
        unchanged = all(torch.equal(result.state[n], baseline[n]) for n in baseline)
        changed = [n for n in baseline if not torch.equal(result.state[n], baseline[n])]
        all_zero = all(r == 0.0 for r in result.rewards)
        grad_norms = [s.get("grad_norm", 0.0) for s in result.stats]
        label = "skip_zero_advantage=True (default)" if skip else "skip_zero_advantage=False (passes run)"
        print(f"  {label}: rewards per step {result.rewards}, skipped {[int(s['skipped']) for s in result.stats]}, "
              f"grad norms {grad_norms}, {seconds:.0f} s")
        print(f"    trainable tensors bitwise unchanged: {unchanged} ({len(baseline)} tensors, "
              f"{sum(t.numel() for t in baseline.values()):,} values; {len(changed)} changed)")
        if not all_zero:
            print("    NOTE: some sample was correct, so these problems were not 0/K for this run; a changed weight is "
                  "then expected")
        out["skip" if skip else "no_skip"] = {"rewards": result.rewards, "unchanged": unchanged,
                                              "all_zero_rewards": all_zero, "grad_norms": grad_norms}
    return out


# ---------------------------------------------------------------------------------------------
# 3. determinism


def determinism(args: argparse.Namespace, policy: LMPolicy) -> dict[str, Any]:
    pool, _ = addition_pools(args)
    print(f"\n[3] determinism: two Student.train runs, seed {args.seed}, {args.det_steps} steps each", flush=True)
    runs = []
    for _ in range(2):
        student = Student(policy, student_config(args, steps=args.det_steps))
        with RecordingSampler(policy) as recorder:
            result = student.train(pool)
        runs.append((recorder.rollouts, result))
    (rollouts_a, a), (rollouts_b, b) = runs
    same_ids = [ra.completion_ids == rb.completion_ids for ra, rb in zip(rollouts_a, rollouts_b)]
    same_texts = [ra.texts == rb.texts for ra, rb in zip(rollouts_a, rollouts_b)]
    assert a.state is not None and b.state is not None
    same_state = all(torch.equal(a.state[n], b.state[n]) for n in a.state)
    baseline = Student(policy).baseline_state()
    changed_from_baseline = any(not torch.equal(a.state[n], baseline[n]) for n in a.state)
    print(f"  same sampled token ids per step: {same_ids}; same texts: {same_texts}")
    print(f"  rewards run 1: {a.rewards}\n  rewards run 2: {b.rewards}; equal: {a.rewards == b.rewards}")
    print(f"  trained weights bitwise equal: {same_state} (and they moved from the baseline: {changed_from_baseline})")
    return {"same_ids": same_ids, "same_texts": same_texts, "rewards": [a.rewards, b.rewards],
            "same_rewards": a.rewards == b.rewards, "same_state": same_state, "moved": changed_from_baseline}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="student model (tiny: a smoke run)")
    parser.add_argument("--family", default="addition@2", help="generator family@difficulty of the learning curve")
    parser.add_argument("--steps", type=int, default=30, help="RLOO steps of the learning-curve run")
    parser.add_argument("--eval-at", type=int, nargs="+", default=[10, 30], help="steps after which to evaluate")
    parser.add_argument("--heldout", type=int, default=50, help="held-out problems for greedy accuracy")
    parser.add_argument("--pool", type=int, default=200, help="training problems (cycled in a seeded shuffle)")
    parser.add_argument("--batch-size", type=int, default=4, help="problems per RLOO step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens per sample and per evaluation reply")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    parser.add_argument("--kl-coef", type=float, default=0.001, help="KL coefficient towards the base model")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--hard", choices=("bundled", "mul5"), default="bundled", help="problems for the 0/K check")
    parser.add_argument("--hard-steps", type=int, default=3, help="steps of each 0/K run")
    parser.add_argument("--det-steps", type=int, default=2, help="steps of each determinism run")
    parser.add_argument("--skip", nargs="*", default=[], choices=("curve", "premise", "determinism"), help="parts to skip")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; 1 when the cores are shared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                        help="dtype of the student's sampling and update products (EnvConfig.compute_dtype)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"model {args.model}, LoRA r={args.lora_r}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    policy = LMPolicy.from_name(args.model, lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
                                compute_dtype=args.compute_dtype)
    print(f"compute dtype {policy.compute_dtype}", flush=True)
    warm_up(1)
    results: dict[str, Any] = {"settings": vars(args), "load_start": load}
    try:
        if "curve" not in args.skip:
            results["curve"] = learning_curve(args, policy)
        if "premise" not in args.skip:
            results["premise"] = zero_k_premise(args, policy)
        if "determinism" not in args.skip:
            results["determinism"] = determinism(args, policy)
    finally:
        shutdown_grading_pool()
    return finish_run(results, args.json)


if __name__ == "__main__":
    main()

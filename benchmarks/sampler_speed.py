"""Sampler tokens/s against this CPU's own GEMM roofline: LMPolicy.sample (generate) and the own decode loop.

    python benchmarks/sampler_speed.py --runs 3 --threads 1 [--sides hf,fp32,bf16 --model smollm2-135m-instruct]

The workload of issue 19: the embedded SmolLM2-135M with LoRA r=16 (alpha 32, every linear
layer), 4 problems x 8 samples x 48 new tokens at temperature 1, one torch thread. Sides:

- ``hf``: today's ``LMPolicy.sample`` (``generate``, one prefill per prompt, LoRA merged);
- ``fp32`` / ``bf16``: ``soar_env.models.fast_decode.sample_rollout`` on the same policy model
  (the llama engine, prepacked weights) in float32 / bfloat16;
- optional ``fp32-unpacked``, ``bf16-unpacked`` (plain ``F.linear``) and ``hf-loop`` (the own
  loop over the model's own ``forward``), to see where the time goes.

The roofline is the one-thread fp32 GEMM rate (2048^3, best of 4) over 2N flops a token, N the
weights a token multiplies (every linear layer and the tied output head; the embedding lookup
is free); the bf16 GEMM rate is measured in the same run. Runs are interleaved (the order of
the sides rotates every run), each side gets the same prompts and seed in a run, and every run
records the 1-minute load average: on shared cores, read the load next to the numbers. Tokens
are the kept completion tokens (cut after eos), as everywhere in ``benchmarks``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.timing import machine_info
from soar_env.data.generators import sample_problems
from soar_env.models import LMPolicy, LoraSettings
from soar_env.models.decoding import SampleOptions
from soar_env.models.decode_engines import FastDecodeSettings
from soar_env.models.fast_decode import sample_rollout
from soar_env.models.multi_lora import MultiLora, sample_runs
from soar_env.models.precision import native_bf16
from soar_env.prompts import student_prompt

SIDES: dict[str, FastDecodeSettings | None] = {
    "hf": None,
    "fp32": FastDecodeSettings(engine="llama", dtype="float32"),
    "bf16": FastDecodeSettings(engine="llama", dtype="bfloat16"),
    "fp32-unpacked": FastDecodeSettings(engine="llama", dtype="float32", prepack=False),
    "bf16-unpacked": FastDecodeSettings(engine="llama", dtype="bfloat16", prepack=False),
    "hf-loop": FastDecodeSettings(engine="hf"),
}
"""Side name -> fast_decode settings (None: LMPolicy.sample as it is)."""

RUN_SIDES = {"fp32-runs4": ("fp32", 4), "bf16-runs4": ("bf16", 4)}
"""Sides that decode the prompts as R student runs at once, each run with its own copy of the LoRA
adapters (`soar_env.models.multi_lora.sample_runs`, what ``batch_runs`` does in a step): R times the
rows per decode batch. Tokens are counted over all runs; the LoRA deltas' extra flops are not."""


def gemm_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 4) -> float:
    """Best-of-``repeats`` GFLOP/s of one (size x size) @ (size x size) product on the current threads."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    a @ b  # warm-up: first-touch of the output, oneDNN/MKL kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def flops_weights(model: nn.Module) -> int:
    """N: weights a generated token multiplies (linear layers incl. the output head; not the embedding lookup)."""
    return sum(module.weight.numel() for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and "lora_" not in name)


def machine() -> dict[str, Any]:
    return {**machine_info(), "bf16_supported": native_bf16("cpu")}


def make_sampler(policy: LMPolicy, side: str, args: argparse.Namespace) -> Callable[[list[str], int], int]:
    """A function (prompts, seed) -> kept tokens for one side."""
    if side in RUN_SIDES:
        return make_runs_sampler(policy, *RUN_SIDES[side], args)
    settings = SIDES[side]

    def run(prompts: list[str], seed: int) -> int:
        if settings is None:
            rollout = policy.sample(prompts, num_samples=args.samples, max_new_tokens=args.max_new_tokens, seed=seed)
        else:
            options = SampleOptions(args.samples, 1.0, args.max_new_tokens, None, False, seed, args.batch_size)
            encoded = [policy.encode(p) for p in prompts]
            rollout = sample_rollout(policy.model, policy.tokenizer, encoded, options,
                                     eos_token_ids=policy.eos_token_ids, settings=settings)
        return rollout.num_tokens

    return run


def make_runs_sampler(policy: LMPolicy, side: str, runs: int, args: argparse.Namespace) -> Callable[[list[str], int], int]:
    """The prompts as ``runs`` student runs decoded together (run k seeded seed + k)."""
    bank = MultiLora(policy, runs=runs)

    def run(prompts: list[str], seed: int) -> int:
        kept = policy.fast_decode
        policy.fast_decode = SIDES[side]
        try:
            rollouts = sample_runs(policy, bank, [prompts] * runs, num_samples=args.samples,
                                   max_new_tokens=args.max_new_tokens, seeds=[seed + k for k in range(runs)],
                                   rows_per_batch=runs * args.batch_size)
        finally:
            policy.fast_decode = kept
        return sum(r.num_tokens for r in rollouts)

    return run


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES and s not in RUN_SIDES]
    if unknown:
        raise SystemExit(f"unknown sides {unknown}; choose from {list(SIDES) + list(RUN_SIDES)}")
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r) if args.lora_r else None
    policy = LMPolicy.from_name(args.model, lora=lora)
    n = flops_weights(policy.model)
    family, _, level = args.family.partition("@")
    total = args.warmup + args.runs
    problems = sample_problems(args.problems * total, args.seed, families=(family,), difficulty=int(level or 2))
    runners = {side: make_sampler(policy, side, args) for side in sides}

    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    results: dict[str, dict[str, list[float]]] = {s: {"seconds": [], "tokens": [], "cpu_seconds": [], "load1": []}
                                                 for s in sides}
    for k in range(total):
        rates["fp32"].append(gemm_rate(torch.float32))
        rates["bf16"].append(gemm_rate(torch.bfloat16))
        batch = problems[k * args.problems : (k + 1) * args.problems]
        prompts = [policy.chat_prompt(student_prompt(p.question)) for p in batch]
        order = sides[k % len(sides) :] + sides[: k % len(sides)]
        line = []
        for side in order:
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = runners[side](prompts, args.seed + k)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            load = os.getloadavg()[0]
            if k >= args.warmup:
                for key, value in (("seconds", wall), ("tokens", tokens), ("cpu_seconds", cpu), ("load1", load)):
                    results[side][key].append(value)
            line.append(f"{side} {wall:.2f}s {tokens} tok ({tokens / wall:.0f}/s)")
        tag = "warm-up" if k < args.warmup else "run"
        print(f"  {tag} {k}: " + " | ".join(line) + f" | load {os.getloadavg()[0]:.2f}"
              f" | gemm fp32 {rates['fp32'][-1]:.0f} bf16 {rates['bf16'][-1]:.0f} GFLOP/s", flush=True)

    fp32_rate, bf16_rate = max(rates["fp32"]), max(rates["bf16"])
    roofline = fp32_rate * 1e9 / (2 * n)
    print(f"\nN = {n / 1e6:.1f}M weights a token; one-thread GEMM 2048^3 best: fp32 {fp32_rate:.0f} GFLOP/s, "
          f"bf16 {bf16_rate:.0f} GFLOP/s ({bf16_rate / fp32_rate:.2f}x); fp32 roofline {roofline:.0f} tokens/s")
    print(f"workload: {args.model}, LoRA r={args.lora_r}, {args.problems} problems x {args.samples} samples x "
          f"{args.max_new_tokens} new tokens, {args.runs} runs after {args.warmup} warm-up, "
          f"threads {torch.get_num_threads()}")
    print(f"| {'side':14} | {'s / run':>12} | {'tokens / run':>12} | {'tokens/s':>12} | {'of fp32 roofline':>16} "
          f"| {'x hf':>5} | {'load1':>9} |")
    print(f"|{'-' * 16}|{'-' * 13}:|{'-' * 13}:|{'-' * 13}:|{'-' * 17}:|{'-' * 6}:|{'-' * 10}:|")
    summary: dict[str, Any] = {}
    hf_rate = None
    if "hf" in results and results["hf"]["seconds"]:
        hf_rate = statistics.fmean(t / s for t, s in zip(results["hf"]["tokens"], results["hf"]["seconds"]))
    for side in sides:
        r = results[side]
        side_rates = [t / s for t, s in zip(r["tokens"], r["seconds"])]
        mean_rate = statistics.fmean(side_rates) if side_rates else float("nan")
        versus = f"{mean_rate / hf_rate:.2f}" if hf_rate else "-"
        print(f"| {side:14} | {mean_std(r['seconds']):>12} | {mean_std(r['tokens']):>12} | {mean_std(side_rates):>12} "
              f"| {mean_rate / roofline:>15.0%} | {versus:>5} | {mean_std(r['load1']):>9} |")
        summary[side] = {**r, "tokens_per_s": side_rates, "fraction_of_roofline": mean_rate / roofline}
    output = {
        "machine": info,
        "args": vars(args),
        "n_weights": n,
        "gemm_gflops": rates,
        "roofline_tokens_per_s": roofline,
        "sides": summary,
        "load_end": os.getloadavg(),
    }
    print("load average at end " + " ".join(f"{x:.2f}" for x in output["load_end"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(output, handle, indent=2, default=str)
    return output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="tiny | smollm2-135m-instruct | a local folder")
    parser.add_argument("--sides", default="hf,fp32,bf16", help=f"comma-separated, from {', '.join([*SIDES, *RUN_SIDES])}")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first runs per side")
    parser.add_argument("--problems", type=int, default=4, help="distinct prompts per call")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64, help="rows decoded together (as LMPolicy.sample)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r); 0 for no adapters")
    parser.add_argument("--family", default="addition@2", help="generator family@difficulty of the prompts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()

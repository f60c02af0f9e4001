"""SOAR's teacher: an LLM that writes problems and learns with RLOO from the student's progress.

    envs = gym.make_vec("SOAR-MATH-v0", num_envs=4, preset="paper")
    RLOOTeacher(make_teacher_config("paper")).learn(envs, total_steps=200, run_dir="runs/soar")

One teacher step (SOAR_SPEC.md, "The bi-level loop"):

1. Sample g·n outputs of the fixed teacher prompt (no seed problems) and keep those that
   `parse_teacher_output` accepts; resample until g·n are valid (rejection sampling,
   `agents.teacher_sampling`) or the attempt budget is spent. The acceptance rate is logged.
2. Split them into g datasets X_1..X_g of n problems: the g actions of the vector env.
3. The env trains r students per dataset and returns R_k. Every output of X_k gets the
   advantage A_k = R_k - mean(R_j, j != k), and one RLOO step (`RLOOUpdater`: AdamW, warm-up,
   cosine, KL to the initial teacher) follows. The rollout is laid out as n groups of g rows,
   row k of group i being problem i of X_k, so the updater's leave-one-out over each group of g
   is exactly A_k.

When the budget runs out with fewer than g·n valid outputs, the datasets are filled with the
rejected outputs (sent nowhere: the env sees only valid problems, a dataset with none gets the
env's invalid-action penalty) and those outputs share their dataset's advantage, so a teacher
that cannot yet write the format is pushed towards the datasets that trained the student.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agents.base import Teacher
from agents.driver import env_config
from agents.teacher_config import TINY_FORMAT_MODEL, TeacherConfig, make_teacher_config
from agents.teacher_sampling import Draft, TeacherSampler, rejection_sample, split_datasets
from agents.tiny_format import tiny_format_model
from soar_env.problems import Problem, Rejection
from soar_env.rng import rng_from_state, rng_state

STATE_FORMAT = "soar-gym-teacher/1"


class RLOOTeacher(Teacher):
    """SOAR's Grounded-T: an LLM teacher trained with RLOO on the env's rewards (see module doc).

    ``RLOOTeacher(config, policy=None)``: without a policy, the model named by ``config.model``
    (default: the env's student model) is loaded when ``learn`` starts (``setup``), so
    constructing a teacher is cheap. Use the vector env: with one dataset per step every RLOO
    advantage is 0 and the teacher cannot learn.
    """

    learns = True
    """Whether ``update`` changes the weights (False for the untrained Base-T)."""

    def __init__(self, config: TeacherConfig | None = None, *, policy: Any = None, **overrides: Any) -> None:
        super().__init__()
        self.config = make_teacher_config(config if config is not None else TeacherConfig(), **overrides)
        self.policy = policy
        self.updater: Any = None
        self.model_name: str | None = getattr(policy, "name_or_path", None)
        self._env_config: Any = None
        self._total_steps: int | None = None
        self._rng = np.random.default_rng(self.config.seed if self.config.seed is not None else 0)
        self._seeded = self.config.seed is not None
        self._sampler: TeacherSampler | None = None
        self._pending: list[list[Draft]] | None = None
        self._acceptance_estimate = 1.0
        self.totals = {"drawn": 0, "accepted": 0, "bound_hits": 0, "updates": 0, "tokens": 0}
        """Counts over the whole run: raw outputs drawn, valid ones, budget exhaustions, updates, tokens."""

    # -- model -----------------------------------------------------------------------------------

    def setup(self, env: Any, total_steps: int) -> None:
        self._env_config = env_config(env)
        self._total_steps = total_steps
        if not self._seeded and self._env_config is not None and self._env_config.seed is not None:
            self._rng = np.random.default_rng(self._env_config.seed)
            self._seeded = True
        self._ensure_policy()
        if self.learns:
            self._ensure_updater()

    def check_env(self, config: Any) -> None:
        if config is not None and config.num_datasets < 2 and self.learns:
            warnings.warn(f"{type(self).__name__} on a single dataset per step: every RLOO advantage is 0, so it "
                          "will not learn; use gym.make_vec('SOAR-MATH-v0', num_envs=g)", stacklevel=3)

    def _resolve(self, name: str, default: Any) -> Any:
        value = getattr(self.config, name)
        return default if value is None else value

    def _ensure_policy(self) -> Any:
        if self.policy is not None:
            return self.policy
        # Lazy: torch and the model code load when the teacher first needs its model, not on import.
        import torch

        from soar_env.models import LMPolicy, LoraSettings, resolve_device

        env = self._env_config
        model = self._resolve("model", env.student_model if env is not None else "tiny")
        use_lora = self._resolve("lora", env.lora if env is not None else True)
        rank = self._resolve("lora_rank", env.lora_rank if env is not None else 16)
        alpha = self._resolve("lora_alpha", env.lora_alpha if env is not None else 32)
        device = resolve_device(self._resolve("device", env.device if env is not None else "auto"))
        dtype = getattr(torch, self._resolve("dtype", env.dtype if env is not None else "float32"))
        lora = LoraSettings(r=rank, alpha=alpha) if use_lora else None
        if model == TINY_FORMAT_MODEL:
            base, tokenizer = tiny_format_model(self.config.topics)
            self.policy = LMPolicy(base, tokenizer, lora=lora, device=device)
        else:
            self.policy = LMPolicy.from_name(model, lora=lora, device=device, dtype=dtype)
        self.model_name = model
        return self.policy

    def _ensure_updater(self, total_steps: int | None = None) -> Any:
        if self.updater is not None:
            return self.updater
        from soar_env.rl import RLOOConfig, RLOOUpdater  # lazy: imports torch

        policy = self._ensure_policy()
        config = self.config
        steps = config.schedule_steps or total_steps or self._total_steps or 1
        rloo = RLOOConfig(lr=config.lr, kl_coef=config.kl_coef, warmup_steps=config.warmup_steps,
                          weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                          min_lr_ratio=config.min_lr_ratio, skip_zero_advantage=config.skip_zero_advantage,
                          micro_batch_size=config.micro_batch_size)
        if policy.lora is None and config.kl_coef > 0:
            # Full fine-tuning: the KL reference is a frozen copy taken at the first reference
            # pass; take it now, while the weights are still the initial teacher's (a resumed
            # run loads trained weights right after this).
            ids = policy.tokenizer("0", add_special_tokens=False)["input_ids"][:1] or [0]
            policy.token_logprobs([ids], [ids], reference=True)
        self.updater = RLOOUpdater(policy.trainable_parameters(), rloo, total_steps=max(1, steps))
        return self.updater

    @property
    def sampler(self) -> TeacherSampler:
        if self._sampler is None:
            self._sampler = TeacherSampler(self._ensure_policy(), self.config)
        return self._sampler

    # -- acting ----------------------------------------------------------------------------------

    def propose(self, num_datasets: int, problems_per_dataset: int) -> list[list[Problem]]:
        """g datasets of up to n valid problems, by rejection sampling within the attempt budget."""
        need = num_datasets * problems_per_dataset
        budget = math.ceil(self.config.max_attempts * need)
        sampled = rejection_sample(self.sampler, need, budget, self._rng, self._acceptance_estimate)
        self._acceptance_estimate = sampled.acceptance_estimate
        bound_hit = len(sampled.valid) < need
        datasets = split_datasets(sampled, num_datasets, problems_per_dataset, self._rng)
        self._pending = datasets
        self.totals["drawn"] += sampled.drawn
        self.totals["accepted"] += len(sampled.valid)
        self.totals["bound_hits"] += int(bound_hit)
        self.totals["tokens"] += sampled.tokens
        self.record("teacher/acceptance_rate", len(sampled.valid) / max(sampled.drawn, 1))
        self.record("teacher/acceptance_rate_run", self.totals["accepted"] / max(self.totals["drawn"], 1))
        self.record("teacher/samples_drawn", sampled.drawn)
        self.record("teacher/bound_hit", float(bound_hit))
        self.record("teacher/filled_with_rejected", float(sum(not d.ok for dataset in datasets for d in dataset)))
        self.record("teacher/tokens", sampled.tokens)
        for reason, count in sampled.reasons.items():
            self.record(f"teacher/rejected/{reason}", count)
        step = self.num_steps
        return [[_tag(d.result, step, k) for d in dataset if d.ok] for k, dataset in enumerate(datasets)]

    def last_drafts(self) -> list[list[Draft]] | None:
        """The drafts behind the last proposal (valid and filled-in), per dataset."""
        return self._pending

    # -- learning --------------------------------------------------------------------------------

    def update(self, rewards: np.ndarray, infos: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
        """One RLOO step: every sampled token of X_k gets A_k = R_k - mean of the other rewards."""
        datasets, self._pending = self._pending, None
        if not self.learns:
            return {}
        if datasets is None:
            raise RuntimeError("update() needs a propose() first: there is nothing to credit the rewards to")
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        g = len(datasets)
        if len(rewards) != g:
            raise ValueError(f"{len(rewards)} rewards for {g} datasets")
        from soar_env.rl import NonFiniteLossError  # lazy: imports torch

        updater = self._ensure_updater()
        rollout, row_rewards = build_rollout(datasets, rewards)
        if len(rollout) == 0:
            return {"update_skipped": 1.0}
        try:
            stats = updater.update(self.policy, rollout, row_rewards, group_size=g)
        except NonFiniteLossError:
            # The updater left weights and optimizer untouched; the run goes on.
            return {"update_skipped": 1.0, "nonfinite": 1.0}
        self.totals["updates"] += int(not stats.get("skipped", 0.0))
        return {"loss": stats.get("loss", 0.0), "pg_loss": stats.get("pg_loss", 0.0), "kl": stats.get("kl", 0.0),
                "lr": stats.get("lr", 0.0), "grad_norm": stats.get("grad_norm", 0.0),
                "advantage_abs_mean": stats.get("advantage_abs_mean", 0.0),
                "update_skipped": stats.get("skipped", 0.0), "update_tokens": stats.get("tokens", 0.0)}

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "class": type(self).__name__,
            "config": self.config.to_dict(),
            "model": self.model_name,
            "rng": rng_state(self._rng),
            "acceptance_estimate": self._acceptance_estimate,
            "totals": dict(self.totals),
            "num_steps": self.num_steps,
        }
        if self.learns:
            state["policy"] = self._ensure_policy().state_dict_trainable()
            state["updater"] = self._ensure_updater().state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} teacher state")
        if state.get("class") != type(self).__name__:
            warnings.warn(f"loading a {state.get('class')} state into a {type(self).__name__}", stacklevel=2)
        if self.learns and "policy" in state:
            updater = self._ensure_updater(state["updater"].get("total_steps"))
            self.policy.load_state_dict_trainable(state["policy"])
            updater.load_state_dict(state["updater"])
        self._rng = rng_from_state(state["rng"])
        self._seeded = True
        self._acceptance_estimate = float(state.get("acceptance_estimate", 1.0))
        self.totals.update({k: int(v) for k, v in state.get("totals", {}).items()})
        self.num_steps = int(state.get("num_steps", self.num_steps))
        self._pending = None


def build_rollout(datasets: Sequence[Sequence[Draft]], rewards: np.ndarray) -> tuple[Any, list[float]]:
    """The teacher's RLOO batch: groups of g rows, row k from dataset k, reward R_k.

    Group (i, s) holds stage s of problem i of each dataset, so the leave-one-out mean inside a
    group is the mean of the other datasets' rewards: A_k for every row of X_k. A draft with
    fewer stages than the mode (a question cut before stage 2) gets an empty row there, which
    scores no token. ``prompt_index`` is the group id: groups are what the updater checks.
    """
    from soar_env.models import Rollout  # lazy: the models package imports torch

    g = len(datasets)
    slots = min(len(d) for d in datasets) if datasets else 0
    stages = max((len(d.rows) for dataset in datasets for d in dataset), default=1)
    rollout = Rollout(prompt_index=[], prompt_ids=[], completion_ids=[], texts=[], stopped=[])
    row_rewards: list[float] = []
    group = 0
    for i in range(slots):
        for s in range(stages):
            for k in range(g):
                draft = datasets[k][i]
                prompt_ids, completion = draft.rows[s] if s < len(draft.rows) else (draft.rows[0][0], [])
                rollout.prompt_index.append(group)
                rollout.prompt_ids.append(prompt_ids)
                rollout.completion_ids.append(list(completion))
                rollout.texts.append(draft.text)
                rollout.stopped.append(True)
                row_rewards.append(float(rewards[k]))
            group += 1
    return rollout, row_rewards


def _tag(problem: Problem | Rejection, step: int, dataset: int) -> Problem:
    assert isinstance(problem, Problem)
    return dataclasses.replace(problem, meta={**problem.meta, "teacher_step": step, "dataset": dataset})

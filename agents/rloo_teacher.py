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

When the budget runs out with fewer than g·n valid outputs (a teacher that cannot yet write the
format), the proposal is short: the valid outputs are dealt evenly over the g datasets and the
rejected ones get no gradient. Rejection sampling is unbiased because every valid output's
log-prob carries the same extra term, grad log P(valid), which cancels when the outputs'
advantages sum to zero. With datasets of unequal sizes n_k that sum is sum_k n_k A_k, so the
update weighs dataset k's outputs by mean(n)/n_k to make it zero again: each dataset's gradient
stays an unbiased estimate of the gradient of its own reward (scaled by that known weight). A
dataset with no valid problem, or one the env marks ``invalid_action``, is left out of the
advantages: it is no sample of the teacher's policy, and its invalid-action reward (a penalty)
would otherwise enter the other datasets' baselines. A hit budget is counted (``teacher/bound_hit``,
the update's ``budget_exhausted``) and warned about, at the 1st, 2nd, 4th, 8th... hit of a run.

Log-probs of the update are taken at the sampling temperature (softmax(logits / T)), so the
gradient is on-policy for any ``temperature``; the KL term compares policy and reference at T too.
With ``constrain_answer`` they are also taken under each stage's token filter (log softmax over
the tokens the filter allowed at that step), the distribution the tokens were drawn from.
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
        self._pending_short = 0
        """Valid problems the last proposal lacked (the budget ran out)."""
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
        if self.config.constrain_answer:
            _ = self.sampler  # builds the token filters: a tokenizer they cannot use fails here, not mid-run
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
        short = max(need - len(sampled.valid), 0)
        datasets = split_datasets(sampled, num_datasets, problems_per_dataset, self._rng)
        self._pending = datasets
        self._pending_short = short
        self.totals["drawn"] += sampled.drawn
        self.totals["accepted"] += len(sampled.valid)
        self.totals["bound_hits"] += int(short > 0)
        self.totals["tokens"] += sampled.tokens
        self.record("teacher/acceptance_rate", len(sampled.valid) / max(sampled.drawn, 1))
        self.record("teacher/acceptance_rate_run", self.totals["accepted"] / max(self.totals["drawn"], 1))
        self.record("teacher/samples_drawn", sampled.drawn)
        self.record("teacher/bound_hit", float(short > 0))
        self.record("teacher/problems_short", float(short))
        self.record("teacher/empty_datasets", float(sum(not dataset for dataset in datasets)))
        self.record("teacher/tokens", sampled.tokens)
        for reason, count in sampled.reasons.items():
            self.record(f"teacher/rejected/{reason}", count)
        step = self.num_steps
        if short:
            self._warn_budget(step, need, len(sampled.valid), sampled.drawn)
        return [[_tag(d.result, step, k) for d in dataset] for k, dataset in enumerate(datasets)]

    def _warn_budget(self, step: int, need: int, valid: int, drawn: int) -> None:
        hits = self.totals["bound_hits"]
        if hits & (hits - 1):  # rate limit: only the 1st, 2nd, 4th, 8th... hit of a run is shown
            return
        warnings.warn(f"{type(self).__name__} step {step}: only {valid} of {need} problems were valid after {drawn} "
                      f"raw samples (max_attempts={self.config.max_attempts:g}); the datasets are short, rejected "
                      f"outputs get no gradient and empty datasets are left out of the advantages "
                      f"(budget hit {hits} time(s) in this run; teacher/bound_hit counts them all)",
                      RuntimeWarning, stacklevel=3)

    def last_drafts(self) -> list[list[Draft]] | None:
        """The drafts behind the last proposal (all valid), per dataset."""
        return self._pending

    # -- learning --------------------------------------------------------------------------------

    def update(self, rewards: np.ndarray, infos: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
        """One RLOO step: every sampled token of X_k gets A_k = R_k - mean of the other rewards.

        Datasets without a counted problem (none valid, or ``infos[k]["invalid_action"]``) are left
        out of the advantages; see the module doc for short proposals.
        """
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
        counted = counted_drafts(datasets, infos)
        left_out = sum(not dataset for dataset in counted)
        budget = {"budget_exhausted": float(self._pending_short > 0), "problems_short": float(self._pending_short),
                  "datasets_left_out": float(left_out)}
        row_filters: list[Any] = []
        rollout, row_rewards, group_size = build_rollout(counted, rewards, row_filters=row_filters)
        if len(rollout) == 0:
            return {"update_skipped": 1.0, **budget}
        try:
            # Scored at the sampling temperature and under the sampling masks: on-policy for any T.
            stats = updater.update(self.policy, rollout, row_rewards, group_size=group_size,
                                   temperature=self.config.temperature,
                                   token_filters=row_filters if any(row_filters) else None)
        except NonFiniteLossError:
            # The updater left weights and optimizer untouched; the run goes on.
            return {"update_skipped": 1.0, "nonfinite": 1.0, **budget}
        self.totals["updates"] += int(not stats.get("skipped", 0.0))
        return {"loss": stats.get("loss", 0.0), "pg_loss": stats.get("pg_loss", 0.0), "kl": stats.get("kl", 0.0),
                "lr": stats.get("lr", 0.0), "grad_norm": stats.get("grad_norm", 0.0),
                "advantage_abs_mean": stats.get("advantage_abs_mean", 0.0),
                "update_skipped": stats.get("skipped", 0.0), "update_tokens": stats.get("tokens", 0.0), **budget}

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


def counted_drafts(datasets: Sequence[Sequence[Draft]], infos: Sequence[Mapping[str, Any]]) -> list[list[Draft]]:
    """The drafts whose problems the env trained on: all, less what ``infos`` says it rejected.

    ``infos[k]`` is the env's info of dataset k (ignored unless there is one per dataset): a
    dataset marked ``invalid_action`` trained nothing, and ``rejected`` entries name the
    positions in the action the env refused (from ``index`` on for ``too_many_problems``).
    """
    if len(infos) != len(datasets):
        return [list(dataset) for dataset in datasets]
    counted = []
    for dataset, info in zip(datasets, infos):
        if info.get("invalid_action"):
            counted.append([])
            continue
        refused: set[int] = set()
        for record in info.get("rejected") or ():
            index = record.get("index") if isinstance(record, Mapping) else None
            if isinstance(index, (int, np.integer)):
                last = len(dataset) if record.get("reason") == "too_many_problems" else int(index) + 1
                refused.update(range(int(index), last))
        counted.append([d for i, d in enumerate(dataset) if i not in refused])
    return counted


def build_rollout(datasets: Sequence[Sequence[Draft]], rewards: np.ndarray, *,
                  row_filters: list[Any] | None = None) -> tuple[Any, list[float], int]:
    """The teacher's RLOO batch: (rollout, row rewards, group size) such that dataset k's rows get A_k.

    Full proposal (every dataset the same non-zero size): groups of g rows, row k from dataset k
    with reward R_k. Group (i, s) holds stage s of problem i of each dataset, so the leave-one-out
    mean inside a group is the mean of the other datasets' rewards: A_k for every row of X_k.

    Short proposal (sizes n_k differ; see the module doc): empty datasets are left out, A_k is
    taken over the others, and dataset k's rows get the advantage A_k * mean(n) / n_k. The rows
    form one group whose rewards are chosen so that the updater's leave-one-out returns exactly
    these advantages: they sum to zero, and with G rows reward (G-1)/G * a gives advantage a.

    A draft with fewer stages than the mode (a question cut before stage 2) gets an empty row
    there, which scores no token. ``prompt_index`` is the group id: groups are what the updater checks.
    ``row_filters``, when given a list, receives the token filter each row was sampled under (None: free).
    """
    from soar_env.models import Rollout  # lazy: the models package imports torch

    g = len(datasets)
    sizes = [len(d) for d in datasets]
    stages = max((len(d.rows) for dataset in datasets for d in dataset), default=1)
    rollout = Rollout(prompt_index=[], prompt_ids=[], completion_ids=[], texts=[], stopped=[])
    row_rewards: list[float] = []

    def add_row(draft: Draft, stage: int, group: int, reward: float) -> None:
        prompt_ids, completion = draft.rows[stage] if stage < len(draft.rows) else (draft.rows[0][0], [])
        rollout.prompt_index.append(group)
        rollout.prompt_ids.append(prompt_ids)
        rollout.completion_ids.append(list(completion))
        rollout.texts.append(draft.text)
        rollout.stopped.append(True)
        row_rewards.append(reward)
        if row_filters is not None:
            row_filters.append(draft.stage_filter(stage))

    if g and min(sizes) > 0 and len(set(sizes)) == 1:
        for i in range(sizes[0]):
            for s in range(stages):
                for k in range(g):
                    add_row(datasets[k][i], s, i * stages + s, float(rewards[k]))
        return rollout, row_rewards, g
    kept = [k for k in range(g) if sizes[k] > 0]
    mean_size = sum(sizes) / max(len(kept), 1)
    advantages = short_advantages(rewards, kept)
    rows = sum(sizes) * stages
    scale = (rows - 1) / rows if rows > 1 else 0.0
    for k in kept:
        for draft in datasets[k]:
            for s in range(stages):
                add_row(draft, s, 0, scale * advantages[k] * mean_size / sizes[k])
    return rollout, row_rewards, max(rows, 1)


def short_advantages(rewards: np.ndarray, kept: Sequence[int]) -> dict[int, float]:
    """A_k = R_k - mean(R_j: j in kept, j != k) for each kept dataset; 0 without a second one."""
    if len(kept) < 2:
        return {k: 0.0 for k in kept}
    total = sum(float(rewards[k]) for k in kept)
    return {k: float(rewards[k]) - (total - float(rewards[k])) / (len(kept) - 1) for k in kept}


def _tag(problem: Problem | Rejection, step: int, dataset: int) -> Problem:
    assert isinstance(problem, Problem)
    return dataclasses.replace(problem, meta={**problem.meta, "teacher_step": step, "dataset": dataset})

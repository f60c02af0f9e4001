"""RLOO: REINFORCE with a leave-one-out baseline, the one update rule of soar-gym.

Both roles of SOAR learn with it: the student on the rewards of its sampled solutions (G = 32
samples per problem), the teacher on the grounded rewards of its datasets (G = g = 4). Each
prompt gets G samples; sample i is scored against the mean reward of the *other* G - 1 samples
of its group, which is an unbiased baseline because it does not depend on sample i
(Kool et al., 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al., 2024,
"Back to basics", arXiv 2402.14740).

    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(), total_steps=10)
    rollout = policy.sample(prompts, num_samples=G)
    stats = updater.update(policy, rollout, rewards, group_size=G)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from soar_env.config import LOSS_NORMALIZATIONS

if TYPE_CHECKING:  # soar_env.models imports transformers and peft; only its types are needed here
    from soar_env.models.policy import LMPolicy
    from soar_env.models.rollout import Rollout


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm was NaN/Inf; the optimizer step was not taken."""

    def __init__(self, message: str, stats: dict[str, float]) -> None:
        super().__init__(message)
        self.stats = stats


@dataclass
class RLOOConfig:
    """Optimiser and loss settings of one RLOO learner; the defaults are the paper's, for both roles.

    This is where these settings are documented: the student's, the teacher's and the env's
    configs refer to the docstrings below with ``{doc:soar_env.rl.rloo.RLOOConfig.FIELD}``.
    """

    lr: float = 1e-5
    """Peak AdamW learning rate, reached after the warm-up and decayed by a cosine (paper: 1e-5 for
    teacher and student; swept over 1e-6, 5e-6, 1e-5, 5e-5)."""
    kl_coef: float = 0.001
    """Weight of the per-token KL penalty (k3 estimator) towards the policy's KL reference (paper:
    0.001). The student's reference is its kl_reference setting; a bare LMPolicy's is its base
    weights (LoRA adapters off, or a frozen copy with full fine-tuning). 0 skips the reference pass."""
    warmup_steps: int = 0
    """Updates over which the lr rises linearly to its peak (paper: 20 for the teacher, 0 in the
    student's inner loop)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not stated in the paper)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None or 0 disables clipping, the norm is still
    logged (not stated in the paper)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment coefficients (beta1, beta2), as in PyTorch (not stated in the paper)."""
    eps: float = 1e-8
    """AdamW denominator epsilon, as in PyTorch (not stated in the paper)."""
    min_lr_ratio: float = 0.0
    """Fraction of the peak lr the cosine reaches at the end of the run (0: a full cosine to zero,
    reached just after the last update)."""
    skip_zero_advantage: bool = True
    """Skip forward, backward and optimizer step when every advantage is exactly zero (every group
    all right or all wrong: no signal), so a batch the learner cannot solve leaves the weights
    exactly unchanged (AdamW's weight decay, Adam's moments and the KL term would otherwise still
    move them); the skipped step still uses up its slot of the lr schedule (not stated in the paper)."""
    loss_normalization: str = "tokens"
    """How the summed per-token loss is averaged: "tokens" divides by the batch's valid-token count
    (every token weighs the same, so long and short completions are pushed alike), "sequences" takes
    each completion's token mean, then the mean over completions (the original GRPO form; a short
    completion's tokens weigh more). Not stated in the paper."""
    micro_batch_size: int | None = None
    """Completions per forward/backward pass, gradients accumulated over the batch (the result
    equals one full-batch pass); None: the whole batch at once. Bounds memory only."""

    def __post_init__(self) -> None:
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, "
                             f"got {self.loss_normalization!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be None or >= 0, got {self.max_grad_norm!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages ``A_i = r_i - mean(r_j, j != i)`` within each group.

    ``rewards`` has shape (P, G): P groups (prompts) of G samples. The result has the same
    shape and each row sums to zero, which is why rejection sampling of teacher outputs keeps
    the gradient unbiased. A group of one sample has no other sample to compare with, so its
    advantage is 0 (no learning signal) rather than undefined.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (P, G), got {tuple(rewards.shape)}")
    rewards = rewards.float()
    group_size = rewards.shape[1]
    if group_size < 2:
        return torch.zeros_like(rewards)
    # r_i - (sum - r_i) / (G - 1) == G / (G - 1) * (r_i - mean)
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)  # (P, G)
    return rewards - others_mean


def rloo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    kl_coef: float,
    *,
    normalizer: float | None = None,
    normalization: str = "tokens",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level RLOO policy-gradient loss plus a KL penalty, averaged over valid tokens.

    Shapes: ``logprobs``, ``ref_logprobs`` and ``mask`` are (B, T) over completion tokens,
    ``advantages`` is (B,) (one per completion). Per valid token t of completion b:

        loss_bt = -A_b * log pi(y_bt)  +  kl_coef * k3_bt
        k3_bt   = exp(ref_bt - lp_bt) - (ref_bt - lp_bt) - 1

    Normalisation ``"tokens"`` (default): the sum over all valid tokens of the batch divided by
    their count (``normalizer``; the micro-batching updater passes the whole batch's count so the
    pieces add up). Dividing every sequence by the same number keeps the REINFORCE gradient
    ``sum_b A_b sum_t grad log pi(y_bt)`` unbiased up to one positive scale; dividing each
    sequence by its own length instead (``"sequences"``: each completion's token mean, summed
    and divided by ``normalizer`` = the batch's completion count) weighs the tokens of short
    completions more and pushes the student towards short wrong answers less than long ones.

    KL: k3 (Schulman, "Approximating KL divergence", 2020) is non-negative for every token, so
    the logged value never goes below zero, and it is 0 with zero gradient where the policy
    equals the reference. Its expectation under the policy is KL(pi || ref); used as a loss,
    as GRPO does, its gradient pulls the policy back towards the reference. The policy-gradient
    term uses on-policy samples, so no importance ratio or clipping is needed.

    Returns the scalar loss and float stats: loss, pg_loss, kl (token mean), advantage_mean,
    advantage_abs_mean, tokens.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}")
    valid = mask.bool()  # (B, T)
    tokens = int(valid.sum().item())
    if normalization == "tokens":
        denom = float(normalizer) if normalizer is not None else float(max(tokens, 1))
        lengths = None
    else:
        denom = float(normalizer) if normalizer is not None else float(max(logprobs.shape[0], 1))
        lengths = valid.sum(1).clamp(min=1).to(logprobs.dtype)  # (B,)

    def average(per_token: torch.Tensor) -> torch.Tensor:
        # torch.where (not a product with the mask): padded positions may hold -inf or garbage.
        kept = torch.where(valid, per_token, logprobs.new_zeros(()))  # (B, T)
        return (kept.sum() if lengths is None else (kept.sum(1) / lengths).sum()) / denom

    pg_loss = average(-advantages.to(logprobs.dtype)[:, None] * logprobs)
    if ref_logprobs is not None and kl_coef != 0.0:
        log_ratio = ref_logprobs.detach() - logprobs  # (B, T)
        k3 = torch.exp(log_ratio) - log_ratio - 1.0  # (B, T), >= 0
        loss = pg_loss + kl_coef * average(k3)
        kl_mean = torch.where(valid, k3, logprobs.new_zeros(())).sum().item() / max(tokens, 1)
    else:
        loss = pg_loss
        kl_mean = 0.0
    stats = {
        "loss": float(loss.item()),
        "pg_loss": float(pg_loss.item()),
        "kl": float(kl_mean),
        "advantage_mean": float(advantages.float().mean().item()) if advantages.numel() else 0.0,
        "advantage_abs_mean": float(advantages.float().abs().mean().item()) if advantages.numel() else 0.0,
        "tokens": float(tokens),
    }
    return loss, stats


def cosine_schedule(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    1. Warm-up: ``(step + 1) / (warmup_steps + 1)``, so the first update already moves.
    2. Cosine from 1 at ``warmup_steps`` down to ``min_lr_ratio`` at ``total_steps``. The floor
       is reached just after the last update, so none of the run's updates is wasted on lr 0
       (with the paper's 10-step inner loop, that would be a tenth of the run).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RLOOUpdater:
    """AdamW + warm-up/cosine schedule + the RLOO loss, for one run of ``total_steps`` updates.

    The student makes a fresh one for every inner run (the paper restarts the optimizer and the
    cosine for each 10-step run); the teacher keeps one for its whole training.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], config: RLOOConfig, total_steps: int) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("RLOOUpdater needs at least one trainable parameter")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.config = config
        self.total_steps = total_steps
        self.steps_done = 0
        """Updates counted by the schedule, skipped ones included."""
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: cosine_schedule(
                step, warmup_steps=config.warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio
            ),
        )

    @property
    def lr(self) -> float:
        """Learning rate the next update will use."""
        return float(self.optimizer.param_groups[0]["lr"])

    def update(
        self, policy: LMPolicy, rollout: Rollout, rewards: Sequence[float], group_size: int,
        *, temperature: float = 1.0, token_filters: Sequence[Any] | None = None,
    ) -> dict[str, float]:
        """One RLOO step on a prompt-major rollout (P prompts x ``group_size`` completions).

        ``temperature``: the one the rollout was sampled at; tokens are scored under that
        distribution, log softmax(logits / T), so the gradient is on-policy at any temperature.
        ``token_filters``: per row, the filter (`soar_env.models.constrained`) its tokens were
        sampled under, or None; those rows are scored under the same mask, again on-policy.

        Raises ``NonFiniteLossError`` if the loss or the gradient norm is NaN/Inf: the step is
        abandoned before ``optimizer.step``, so parameters and optimizer state are untouched.
        """
        config = self.config
        n = len(rollout.completion_ids)
        if len(rewards) != n:
            raise ValueError(f"{len(rewards)} rewards for {n} completions")
        if token_filters is not None and len(token_filters) != n:
            raise ValueError(f"{len(token_filters)} token filters for {n} completions")
        if group_size < 1 or n % group_size != 0:
            raise ValueError(f"{n} completions do not split into groups of {group_size}")
        num_groups = n // group_size
        # Prompt-major order: completions g*G .. g*G+G-1 must share one prompt.
        for g in range(num_groups):
            group = rollout.prompt_index[g * group_size : (g + 1) * group_size]
            if len(set(group)) != 1:
                raise ValueError(f"group {g} mixes prompts {sorted(set(group))}: rollout is not prompt-major")

        reward_tensor = torch.tensor(list(rewards), dtype=torch.float32).view(num_groups, group_size)  # (P, G)
        advantages = rloo_advantages(reward_tensor).view(-1)  # (B,)
        total_tokens = sum(len(c) for c in rollout.completion_ids)
        stats: dict[str, float] = {
            "reward_mean": float(reward_tensor.mean().item()),
            "reward_std": float(reward_tensor.std(unbiased=False).item()),
            "advantage_abs_mean": float(advantages.abs().mean().item()),
            "tokens": float(total_tokens),
            "lr": self.lr,
            "skipped": 0.0,
        }

        # 1. No signal: all-zero advantages (every group all-correct or all-wrong) or nothing to
        # score. Skip the passes and the optimizer step; AdamW's weight decay would otherwise
        # still move the weights, and "RLOO on a 0/K hard set changes nothing" must hold exactly.
        if (config.skip_zero_advantage and bool((advantages == 0).all())) or total_tokens == 0:
            stats.update(loss=0.0, pg_loss=0.0, kl=0.0, advantage_mean=0.0, grad_norm=0.0, skipped=1.0)
            self._advance_schedule_only()
            return stats

        # 2. Forward/backward in micro-batches; each piece is normalised by the whole batch's
        # token count, so the accumulated gradient equals the full-batch gradient.
        self.optimizer.zero_grad(set_to_none=True)
        micro = config.micro_batch_size or n
        normalizer = float(total_tokens) if config.loss_normalization == "tokens" else float(n)
        scoring = {} if temperature == 1.0 else {"temperature": float(temperature)}
        loss_sum, pg_sum, kl_token_sum, adv_sum = 0.0, 0.0, 0.0, 0.0
        # A run's first update starts from its KL reference: the reference pass would repeat the
        # policy's forward exactly, so its log-probs are reused (one forward in four at 4 steps).
        reuse_reference = config.kl_coef > 0 and bool(getattr(policy, "reference_is_current", lambda: False)())
        for start in range(0, n, micro):
            idx = list(range(start, min(start + micro, n)))
            prompt_ids = [rollout.prompt_ids[i] for i in idx]
            completion_ids = [rollout.completion_ids[i] for i in idx]
            masks = {} if token_filters is None else {"token_filters": [token_filters[i] for i in idx]}
            logprobs, mask = policy.token_logprobs(prompt_ids, completion_ids, **scoring, **masks)  # (b, T), (b, T)
            ref_logprobs = None
            if reuse_reference:
                ref_logprobs = logprobs.detach()
            elif config.kl_coef > 0:
                with torch.no_grad():
                    ref_logprobs, _ = policy.token_logprobs(prompt_ids, completion_ids, reference=True, **scoring,
                                                            **masks)
            adv = advantages[idx].to(logprobs.device)  # (b,)
            loss, piece = rloo_loss(logprobs, ref_logprobs, mask, adv, config.kl_coef,
                                    normalizer=normalizer, normalization=config.loss_normalization)
            loss_sum += piece["loss"]
            pg_sum += piece["pg_loss"]
            kl_token_sum += piece["kl"] * piece["tokens"]
            adv_sum += piece["advantage_mean"] * len(idx)
            if not math.isfinite(piece["loss"]):
                stats.update(loss=piece["loss"], pg_loss=pg_sum, kl=float("nan"), grad_norm=float("nan"))
                self.optimizer.zero_grad(set_to_none=True)
                message = f"non-finite RLOO loss {piece['loss']} (completions {idx[0]}..{idx[-1]})"
                raise NonFiniteLossError(message, stats)
            loss.backward()
        stats.update(
            loss=loss_sum, pg_loss=pg_sum, kl=kl_token_sum / max(total_tokens, 1), advantage_mean=adv_sum / n
        )

        # 3. Clip, check, step. The check comes before optimizer.step so a bad batch leaves
        # parameters and Adam moments exactly as they were.
        max_norm = config.max_grad_norm if config.max_grad_norm else float("inf")  # None or 0: no clipping
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm).item())
        stats["grad_norm"] = grad_norm
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite gradient norm {grad_norm}", stats)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.steps_done += 1
        return stats

    def _advance_schedule_only(self) -> None:
        """A skipped update still uses up its slot of the schedule (step k keeps lr(k))."""
        with warnings.catch_warnings():
            # LambdaLR warns when it steps before any optimizer.step(); here that is intended.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        """Optimizer moments, schedule position and step count, for checkpoints."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_done": self.steps_done,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved (same parameters, same config)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = int(state["steps_done"])
        self.total_steps = int(state.get("total_steps", self.total_steps))

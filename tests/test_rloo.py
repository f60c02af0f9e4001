"""RLOO: advantages, loss and updater, on hand-computed values, a toy policy and the tiny LM."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from soar_env.rl import NonFiniteLossError, RLOOConfig, RLOOUpdater, cosine_schedule, rloo_advantages, rloo_loss


# ----------------------------------------------------------------------------------------------
# A toy policy with the LMPolicy interface the updater uses: one categorical distribution over
# V tokens at every position, its logits the only parameter. Reference = the initial logits.


@dataclass
class ToyRollout:
    prompt_index: list[int]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]


class ToyPolicy(torch.nn.Module):
    def __init__(self, vocab: int = 4, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(vocab, generator=gen))
        self.register_buffer("ref_logits", self.logits.detach().clone())
        self.nan = False

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.logits]

    def token_logprobs(self, prompt_ids, completion_ids, *, reference: bool = False):
        logits = self.ref_logits if reference else self.logits
        logp = torch.log_softmax(logits, dim=-1)  # (V,)
        width = max(len(c) for c in completion_ids)
        ids = torch.zeros(len(completion_ids), width, dtype=torch.long)
        mask = torch.zeros(len(completion_ids), width, dtype=torch.bool)
        for b, c in enumerate(completion_ids):
            ids[b, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[b, : len(c)] = True
        out = logp[ids] * (float("nan") if self.nan else 1.0)  # (B, T)
        return out, mask


def toy_rollout(completions: list[list[int]], group_size: int) -> ToyRollout:
    index = [i // group_size for i in range(len(completions))]
    return ToyRollout(index, [[0] for _ in completions], completions)


# ----------------------------------------------------------------------------------------------
# Advantages


def test_advantages_hand_computed() -> None:
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))


def test_advantages_leave_one_out_definition_and_zero_sum() -> None:
    rewards = torch.rand(5, 7, generator=torch.Generator().manual_seed(1))
    adv = rloo_advantages(rewards)
    for p in range(5):
        for i in range(7):
            others = torch.cat([rewards[p, :i], rewards[p, i + 1 :]])
            assert adv[p, i].item() == pytest.approx(rewards[p, i].item() - others.mean().item(), abs=1e-6)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(5), atol=1e-6, rtol=0)


def test_advantages_equal_group_and_singleton_are_zero() -> None:
    assert torch.equal(rloo_advantages(torch.zeros(3, 4)), torch.zeros(3, 4))
    assert torch.equal(rloo_advantages(torch.ones(2, 32)), torch.zeros(2, 32))
    assert torch.equal(rloo_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(4))


# ----------------------------------------------------------------------------------------------
# Loss


def test_loss_hand_computed_2x3() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = rloo_loss(logprobs, None, mask, advantages, kl_coef=0.0)
    # valid tokens: -A*lp = 1, 2 | -0.5, -1, 0  -> sum 1.5 over 5 tokens
    assert loss.item() == pytest.approx(0.3)
    assert stats["pg_loss"] == pytest.approx(0.3) and stats["kl"] == 0.0 and stats["tokens"] == 5.0
    loss.backward()
    expected = torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 1.0]]) / 5
    torch.testing.assert_close(logprobs.grad, expected)

    # With a reference: k3 on each valid token, weighted by kl_coef, same normalisation.
    ref = torch.tensor([[-1.5, -2.0, 9.0], [0.0, -1.0, -1.0]])
    loss, stats = rloo_loss(logprobs.detach(), ref, mask, advantages, kl_coef=0.1)
    d = [-0.5, 0.0, 0.5, 0.0, -1.0]  # ref - lp on valid tokens
    k3 = [math.exp(x) - x - 1 for x in d]
    assert stats["kl"] == pytest.approx(sum(k3) / 5)
    assert loss.item() == pytest.approx(0.3 + 0.1 * sum(k3) / 5)


def test_loss_ignores_garbage_in_padding() -> None:
    logprobs = torch.tensor([[-1.0, float("-inf")], [-2.0, float("nan")]])
    mask = torch.tensor([[1, 0], [1, 0]])
    loss, stats = rloo_loss(logprobs, torch.zeros(2, 2), mask, torch.tensor([1.0, -1.0]), kl_coef=0.5)
    assert math.isfinite(loss.item()) and stats["tokens"] == 2.0


def test_kl_zero_when_policy_equals_reference() -> None:
    logprobs = torch.randn(3, 5).log_softmax(-1).requires_grad_(True)
    loss, stats = rloo_loss(logprobs, logprobs.detach().clone(), torch.ones(3, 5), torch.zeros(3), kl_coef=1.0)
    assert stats["kl"] == 0.0 and loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logprobs.grad) == 0


def test_zero_advantages_give_exactly_zero_gradient() -> None:
    logprobs = torch.randn(4, 6).requires_grad_(True)
    loss, _ = rloo_loss(logprobs, None, torch.ones(4, 6), torch.zeros(4), kl_coef=0.0)
    loss.backward()
    assert torch.count_nonzero(logprobs.grad) == 0


def test_sequence_normalisation_hand_computed() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    loss, _ = rloo_loss(logprobs, None, mask, advantages, kl_coef=0.0, normalization="sequences")
    # per sequence: (1 + 2) / 2 = 1.5 and (0.5 + 1 + 0) / 3 = -0.5... with A = -1: -0.5; mean of 2: 0.5
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, -0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]) / 2)
    with pytest.raises(ValueError, match="normalization"):
        rloo_loss(logprobs, None, mask, advantages, kl_coef=0.0, normalization="words")


def test_kl_estimator_is_non_negative() -> None:
    lp, ref = torch.randn(8, 9), torch.randn(8, 9)
    _, stats = rloo_loss(lp, ref, torch.ones(8, 9), torch.zeros(8), kl_coef=1.0)
    assert stats["kl"] >= 0.0


# ----------------------------------------------------------------------------------------------
# Schedule


def test_cosine_schedule_values() -> None:
    f = lambda s: cosine_schedule(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)  # peak right after warm-up
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(14) == pytest.approx(0.1)  # floor at the end of the run
    # Paper inner loop: no warm-up, every one of the 10 updates has a positive lr.
    lrs = [cosine_schedule(s, warmup_steps=0, total_steps=10) for s in range(10)]
    assert lrs[0] == 1.0 and all(b < a for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0


def test_updater_lr_follows_schedule_including_skipped_steps() -> None:
    policy = ToyPolicy()
    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=0.1, warmup_steps=2), total_steps=6)
    seen = []
    for step in range(6):
        seen.append(updater.lr)
        rewards = [1.0, 0.0] if step % 2 == 0 else [0.0, 0.0]  # odd steps are skipped
        updater.update(policy, toy_rollout([[1], [2]], 2), rewards, group_size=2)
    expected = [0.1 * cosine_schedule(s, warmup_steps=2, total_steps=6) for s in range(6)]
    assert seen == pytest.approx(expected)
    assert updater.steps_done == 6


# ----------------------------------------------------------------------------------------------
# Updater on the toy policy


def test_update_moves_probability_towards_rewarded_token() -> None:
    policy = ToyPolicy(vocab=4)
    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=0.5, kl_coef=0.0), total_steps=20)
    before = torch.softmax(policy.logits, -1)[2].item()
    completions = [[0], [1], [2], [3]] * 2
    rewards = [1.0 if c == [2] else 0.0 for c in completions]
    for _ in range(20):
        stats = updater.update(policy, toy_rollout(completions, 4), rewards, group_size=4)
    assert before < 0.05 and torch.softmax(policy.logits, -1)[2].item() > 0.5
    assert stats["skipped"] == 0.0 and stats["grad_norm"] > 0 and stats["tokens"] == 8.0


def test_all_zero_advantages_leave_weights_bitwise_unchanged() -> None:
    policy = ToyPolicy()
    config = RLOOConfig(lr=0.1, weight_decay=0.5, kl_coef=0.1)
    updater = RLOOUpdater(policy.trainable_parameters(), config, total_steps=3)
    before = policy.logits.detach().clone()
    rollout = toy_rollout([[0, 1], [2], [3, 3, 3], [1]], 2)
    stats = updater.update(policy, rollout, [0.0, 0.0, 1.0, 1.0], group_size=2)
    assert stats["skipped"] == 1.0
    assert torch.equal(policy.logits.detach(), before)
    assert policy.logits.grad is None

    # Why the skip matters: without it, decoupled weight decay moves weights on a zero gradient.
    config = RLOOConfig(lr=0.1, weight_decay=0.5, skip_zero_advantage=False)
    noskip = RLOOUpdater(policy.trainable_parameters(), config, total_steps=3)
    stats = noskip.update(policy, rollout, [0.0, 0.0, 1.0, 1.0], group_size=2)
    assert stats["skipped"] == 0.0 and stats["grad_norm"] == 0.0
    assert not torch.equal(policy.logits.detach(), before)


def test_nan_loss_raises_and_leaves_parameters_and_optimizer_untouched() -> None:
    policy = ToyPolicy()
    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=0.1), total_steps=5)
    rollout = toy_rollout([[0], [1]], 2)
    updater.update(policy, rollout, [1.0, 0.0], group_size=2)  # a real step: Adam moments exist
    params_before = policy.logits.detach().clone()
    opt_before = {k: v.clone() for k, v in updater.optimizer.state[policy.logits].items()}
    lr_before = updater.lr
    policy.nan = True
    with pytest.raises(NonFiniteLossError) as info:
        updater.update(policy, rollout, [1.0, 0.0], group_size=2)
    assert math.isnan(info.value.stats["loss"])
    assert torch.equal(policy.logits.detach(), params_before)
    for k, v in updater.optimizer.state[policy.logits].items():
        assert torch.equal(v, opt_before[k])
    assert updater.lr == lr_before and updater.steps_done == 1
    assert policy.logits.grad is None


def test_micro_batching_matches_full_batch() -> None:
    completions = [[0, 1, 2], [3], [1, 1], [2, 0, 0, 3], [0], [3, 2]]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    results = []
    for micro in (None, 1, 4):
        policy = ToyPolicy(seed=3)
        with torch.no_grad():
            policy.logits.add_(0.5)  # differ from the reference so the KL term is active
        config = RLOOConfig(lr=0.1, kl_coef=0.5, micro_batch_size=micro)
        updater = RLOOUpdater(policy.trainable_parameters(), config, total_steps=4)
        stats = updater.update(policy, toy_rollout(completions, 3), rewards, group_size=3)
        results.append((policy.logits.detach().clone(), stats))
    for logits, stats in results[1:]:
        torch.testing.assert_close(logits, results[0][0])
        for key in ("loss", "pg_loss", "kl", "grad_norm", "tokens"):
            assert stats[key] == pytest.approx(results[0][1][key], rel=1e-5, abs=1e-7)


def test_micro_batching_matches_full_batch_with_sequence_normalisation() -> None:
    completions = [[0, 1, 2], [3], [1, 1], [2, 0, 0, 3]]
    results = []
    for micro in (None, 1, 3):
        policy = ToyPolicy(seed=4)
        with torch.no_grad():
            policy.logits.add_(0.5)
        config = RLOOConfig(lr=0.1, kl_coef=0.5, micro_batch_size=micro, loss_normalization="sequences")
        updater = RLOOUpdater(policy.trainable_parameters(), config, total_steps=4)
        stats = updater.update(policy, toy_rollout(completions, 2), [1.0, 0.0, 0.0, 1.0], group_size=2)
        results.append((policy.logits.detach().clone(), stats["loss"]))
    for logits, loss in results[1:]:
        torch.testing.assert_close(logits, results[0][0])
        assert loss == pytest.approx(results[0][1], rel=1e-5)


def test_zero_max_grad_norm_disables_clipping_like_none() -> None:
    rollout = toy_rollout([[0, 1, 2], [3], [1, 1], [2, 0, 0, 3]], 2)
    after = []
    for max_norm in (None, 0.0):
        policy = ToyPolicy(seed=5)
        start = policy.logits.detach().clone()
        updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=0.1, max_grad_norm=max_norm), total_steps=2)
        updater.update(policy, rollout, [1.0, 0.0, 0.0, 1.0], group_size=2)
        after.append(policy.logits.detach().clone())
        assert not torch.equal(after[-1], start), "clipping to norm 0 would zero the gradient"
    torch.testing.assert_close(after[1], after[0])
    with pytest.raises(ValueError, match="max_grad_norm"):
        RLOOConfig(max_grad_norm=-1.0)


def test_update_rejects_bad_grouping() -> None:
    policy = ToyPolicy()
    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(), total_steps=1)
    with pytest.raises(ValueError):
        updater.update(policy, toy_rollout([[0], [1], [2]], 2), [1.0, 0.0, 1.0], group_size=2)
    with pytest.raises(ValueError):
        updater.update(policy, ToyRollout([0, 1, 0, 1], [[0]] * 4, [[0]] * 4), [1.0, 0.0, 1.0, 0.0], group_size=2)


def test_state_dict_roundtrip() -> None:
    policy = ToyPolicy()
    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=0.1), total_steps=5)
    updater.update(policy, toy_rollout([[0], [1]], 2), [1.0, 0.0], group_size=2)
    state = updater.state_dict()
    fresh = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=0.1), total_steps=5)
    fresh.load_state_dict(state)
    assert fresh.lr == updater.lr and fresh.steps_done == 1
    for k, v in updater.optimizer.state[policy.logits].items():
        assert torch.equal(fresh.optimizer.state[policy.logits][k], v)


# ----------------------------------------------------------------------------------------------
# Known-answer learning test on the tiny LM: reward "the completion starts with an even token id".


def _even_first_token_mass(policy, prompt_ids: list[int], even: torch.Tensor) -> float:
    """Exact probability that the first completion token has an even id (one forward pass)."""
    with torch.no_grad():
        logprobs, _ = policy.token_logprobs([prompt_ids] * len(even), [[int(t)] for t in even])
    return float(logprobs[:, 0].exp().sum().item())


def test_rloo_learns_known_answer_on_tiny_lm() -> None:
    policy_module = pytest.importorskip("soar_env.models.policy")
    torch.manual_seed(0)
    policy = policy_module.LMPolicy.from_name("tiny")
    prompt = policy.chat_prompt("Say something.")
    even = torch.arange(0, len(policy.tokenizer), 2)
    params_before = policy.state_dict_trainable()
    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=1e-2, kl_coef=0.001), total_steps=6)

    prompt_ids = policy.sample([prompt], max_new_tokens=1, seed=0).prompt_ids[0]
    mass_before = _even_first_token_mass(policy, prompt_ids, even)  # about 0.5 for a random model
    rewards_seen = []
    for step in range(6):
        rollout = policy.sample([prompt], num_samples=32, max_new_tokens=1, seed=step)
        rewards = [1.0 if c and c[0] % 2 == 0 else 0.0 for c in rollout.completion_ids]
        rewards_seen.append(sum(rewards) / len(rewards))
        updater.update(policy, rollout, rewards, group_size=32)
    mass_after = _even_first_token_mass(policy, prompt_ids, even)

    changed = any(not torch.equal(v, params_before[k]) for k, v in policy.state_dict_trainable().items())
    assert changed
    assert mass_after > mass_before + 0.15, (mass_before, mass_after, rewards_seen)
    assert sum(rewards_seen[-2:]) > sum(rewards_seen[:2]), rewards_seen

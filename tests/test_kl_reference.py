"""The inner loop's KL reference (issue 15, item 2): the baseline the run started from, or the
episode-start student, chosen by ``kl_reference``; with LoRA still one model.

    python -m pytest tests/test_kl_reference.py -q
"""

from __future__ import annotations

import pytest
import torch

from soar_env.config import make_config
from soar_env.models import LMPolicy, LoraSettings, build_tiny_model
from soar_env.models.tiny import perturbed_state
from soar_env.problems import Problem
from soar_env.prompts import student_prompt
from soar_env.student import Student, StudentConfig, build_student

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]

PROBLEMS = [Problem("What is 2 + 3?", "5", source="test"), Problem("What is 4 + 4?", "8", source="test")]


def tiny_policy(lora: bool) -> LMPolicy:
    model, tokenizer = build_tiny_model(seed=0)
    return LMPolicy(model, tokenizer, lora=LoraSettings() if lora else None)


def perturbed(policy: LMPolicy, seed: int) -> dict[str, torch.Tensor]:
    """A trainable state far from the policy's current one (every tensor moved, LoRA B included)."""
    return perturbed_state(policy, 0.3, seed)


def logprobs_of(policy: LMPolicy, rollout, state=None, reference=False) -> torch.Tensor:
    """Token log-probs of the rollout under ``state`` (loaded, then undone) or the KL reference."""
    saved = policy.state_dict_trainable()
    if state is not None:
        policy.load_state_dict_trainable(state)
    try:
        with torch.no_grad():
            values, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, reference=reference)
    finally:
        policy.load_state_dict_trainable(saved)
    return values[mask]


def rollout_for(policy: LMPolicy):
    prompts = [policy.chat_prompt(student_prompt(p.question)) for p in PROBLEMS]
    return policy.sample(prompts, num_samples=2, max_new_tokens=6, seed=0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_set_reference_scores_with_the_given_state_in_one_model(lora):
    policy = tiny_policy(lora)
    rollout = rollout_for(policy)
    reference_state = perturbed(policy, seed=1)
    policy.set_reference(reference_state)
    # The policy itself moves on; the reference stays where it was set.
    policy.load_state_dict_trainable(perturbed(policy, seed=2))
    current, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)  # graph kept
    with torch.no_grad():
        reference = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, reference=True)[0][mask]
    # The swap never writes into the parameters: the graph built before it still backpropagates.
    (current * mask).sum().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    torch.testing.assert_close(reference, logprobs_of(policy, rollout, state=reference_state), rtol=0, atol=0)
    assert not torch.allclose(reference, current.detach()[mask], atol=1e-3)
    assert policy._reference_model is None, "no frozen second model"
    policy.set_reference(None)  # back to the default: adapters off / lazy frozen copy
    if lora:
        with policy.model.disable_adapter():
            torch.testing.assert_close(logprobs_of(policy, rollout, reference=True), logprobs_of(policy, rollout))


def test_a_reference_with_zero_lora_b_runs_as_the_base_model_bit_for_bit(monkeypatch):
    """A fresh run's reference (every lora_B zero) is scored with the adapters off, which skips their
    products; the log-probs are exactly those of swapping the reference tensors in."""
    policy = tiny_policy(lora=True)
    rollout = rollout_for(policy)
    start = {n: t + 0.1 if "lora_A" in n else t for n, t in policy.state_dict_trainable().items()}  # B still 0
    policy.set_reference(start)
    policy.load_state_dict_trainable(perturbed(policy, seed=2))
    calls = []
    disable = policy.model.disable_adapter
    monkeypatch.setattr(policy.model, "disable_adapter", lambda: calls.append(1) or disable())
    fast = logprobs_of(policy, rollout, reference=True)
    assert calls == [1]
    policy._reference_is_base = False  # force the swap of the reference tensors
    torch.testing.assert_close(fast, logprobs_of(policy, rollout, reference=True), rtol=0, atol=0)
    assert calls == [1]
    policy.set_reference(perturbed(policy, seed=3))  # non-zero B: the tensors are swapped in
    assert not policy._reference_is_base
    logprobs_of(policy, rollout, reference=True)
    assert calls == [1]


def test_set_reference_refuses_a_state_of_another_policy():
    policy = tiny_policy(lora=True)
    with pytest.raises(KeyError, match="reference state does not match"):
        policy.set_reference({"not.a.parameter": torch.zeros(1)})


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("kl_reference", ["baseline", "initial"])
def test_after_a_promotion_the_reference_is_the_configured_one(lora, kl_reference):
    policy = tiny_policy(lora)
    rollout = rollout_for(policy)
    initial = policy.state_dict_trainable()
    student = Student(policy, StudentConfig(kl_coef=0.001, kl_reference=kl_reference, seed=0))
    promoted = perturbed(policy, seed=3)
    student.promote(promoted)
    student.train(PROBLEMS, steps=0)  # every run sets the policy's reference before it trains
    reference = logprobs_of(policy, rollout, reference=True)
    expected_state = promoted if kl_reference == "baseline" else initial
    other_state = initial if kl_reference == "baseline" else promoted
    torch.testing.assert_close(reference, logprobs_of(policy, rollout, state=expected_state), rtol=0, atol=0)
    assert not torch.allclose(reference, logprobs_of(policy, rollout, state=other_state), atol=1e-3)
    if lora:
        assert policy._reference_model is None, "LoRA keeps one model: the reference is a copy of the adapters"
    # A second promotion moves a "baseline" reference again and leaves an "initial" one where it is.
    again = perturbed(policy, seed=4)
    student.promote(again)
    student.train(PROBLEMS, steps=0)
    expected_state = again if kl_reference == "baseline" else initial
    torch.testing.assert_close(logprobs_of(policy, rollout, reference=True),
                               logprobs_of(policy, rollout, state=expected_state), rtol=0, atol=0)


def test_default_reference_follows_promotions():
    """Only the API that existed before the fix: the default pulls towards the promoted baseline."""
    policy = tiny_policy(lora=True)
    rollout = rollout_for(policy)
    student = Student(policy, StudentConfig(kl_coef=0.001, seed=0))
    promoted = perturbed(policy, seed=5)
    student.promote(promoted)
    student.train(PROBLEMS, steps=0)
    torch.testing.assert_close(logprobs_of(policy, rollout, reference=True),
                               logprobs_of(policy, rollout, state=promoted), rtol=0, atol=0)


def test_env_config_chooses_the_reference_and_the_default_is_the_baseline():
    assert make_config("paper").kl_reference == "baseline"
    assert build_student(make_config("tiny")).config.kl_reference == "baseline"
    assert build_student(make_config("tiny", kl_reference="initial")).config.kl_reference == "initial"
    with pytest.raises(ValueError, match="kl_reference"):
        make_config("tiny", kl_reference="base")
    with pytest.raises(ValueError, match="kl_reference"):
        StudentConfig(kl_reference="start")


class ReferenceRecomputed:
    """The policy with the first-update shortcut off: every update runs its reference pass."""

    def __init__(self, policy: LMPolicy) -> None:
        self.policy = policy

    def reference_is_current(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.policy, name)


@pytest.mark.parametrize("state", ["fresh-lora", "set-reference"])
def test_first_update_reuses_its_own_logprobs_as_the_reference_exactly(state):
    """A run starts from its KL reference, so the first update skips the reference pass; the
    updated weights and the KL must be what the full pass gives, and later updates (the weights
    have moved) must run the pass again."""
    from soar_env.rl import RLOOConfig, RLOOUpdater

    def two_updates(wrap: bool):
        policy = tiny_policy(lora=True)
        if state == "set-reference":
            start = perturbed(policy, seed=3)
            policy.load_state_dict_trainable(start)
            policy.set_reference(start)
        assert policy.reference_is_current()
        rollout = rollout_for(policy)
        updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=1e-2, kl_coef=0.5), total_steps=2)
        rewards = [1.0, 0.0, 0.0, 1.0]
        first = updater.update(ReferenceRecomputed(policy) if wrap else policy, rollout, rewards, group_size=2)
        assert not policy.reference_is_current(), "the weights moved: the next update needs its pass"
        second = updater.update(ReferenceRecomputed(policy) if wrap else policy, rollout, rewards, group_size=2)
        return policy.state_dict_trainable(), first, second

    reused, first, second = two_updates(wrap=False)
    recomputed, first_full, second_full = two_updates(wrap=True)
    assert first["kl"] == first_full["kl"] == 0.0 and second["kl"] > 0
    assert second["kl"] == pytest.approx(second_full["kl"], rel=1e-6)
    for name, tensor in reused.items():
        torch.testing.assert_close(tensor, recomputed[name], rtol=0, atol=1e-7)

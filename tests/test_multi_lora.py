"""MultiLora: one batch, one adapter per run; gradients, log-probs and samples equal each run alone.

    OMP_NUM_THREADS=1 python -m pytest tests/test_multi_lora.py -q
"""

from __future__ import annotations

import pytest
import torch

from soar_env.models import LMPolicy, LoraSettings, build_tiny_model
from soar_env.models.tiny import perturbed_state
from soar_env.models.multi_lora import MultiLora, can_sample_runs, row_segments, run_logprobs
from soar_env.models.multi_lora import sample_runs
from soar_env.prompts import student_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What is 2 + 3?", "Find x if 3x + 4 = 19.", "Compute 7 * 8.", "What is 12 - 5?"]
RUNS = 3


def make_policy(**kwargs) -> LMPolicy:
    model, tokenizer = build_tiny_model(seed=0)
    return LMPolicy(model, tokenizer, lora=LoraSettings(r=4, alpha=8), **kwargs)


def run_states(policy: LMPolicy, runs: int = RUNS, spread: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """Distinct adapters per run (peft's B starts at zero, which would hide A's gradient)."""
    return [perturbed_state(policy, spread, seed=100 + run) for run in range(runs)]


def bank_with(policy: LMPolicy, states: list[dict[str, torch.Tensor]]) -> MultiLora:
    bank = MultiLora(policy, runs=len(states))
    for run, state in enumerate(states):
        bank.load_state(run, state)
    return bank


def test_row_segments() -> None:
    assert row_segments([0, 0, 1, 1, 1, 2]) == [(0, 0, 2), (1, 2, 5), (2, 5, 6)]
    assert row_segments([1, 0, 1]) == [(1, 0, 1), (0, 1, 2), (1, 2, 3)]


def test_state_names_match_policy_and_peft_comes_back() -> None:
    policy = make_policy()
    bank = MultiLora(policy, runs=2)
    assert bank.state_of(1).keys() == policy.state_dict_trainable().keys()
    before = [type(m) for m in policy.model.modules()]
    with bank.attached():
        assert any(type(m).__name__ == "MultiLoraLinear" for m in policy.model.modules())
    assert [type(m) for m in policy.model.modules()] == before


def test_unsupported_policies_are_refused_with_a_reason() -> None:
    model, tokenizer = build_tiny_model(seed=0)
    full = LMPolicy(model, tokenizer, lora=None)
    assert "full fine-tuning" in can_sample_runs(full)
    with pytest.raises(ValueError, match="LoRA"):
        MultiLora(full, runs=2)
    policy = make_policy()
    policy.fast_decode = None
    bank = MultiLora(policy, runs=1)
    with pytest.raises(ValueError, match="generate sampler"):
        sample_runs(policy, bank, [["hi"]], seeds=[0])


def test_each_adapter_gets_the_gradient_of_its_run_alone() -> None:
    policy = make_policy()
    states = run_states(policy)
    prompts = [policy.encode(policy.chat_prompt(student_prompt(q))) for q in QUESTIONS[:2]]
    # Every run scores the same two prompts (repeats of one dataset), with different completions.
    completions = [[[5 + run + i, 9, 11 + i][: 2 + i] for i in range(2)] for run in range(RUNS)]
    advantages = torch.tensor([1.0, -0.5])

    expected = []
    for run in range(RUNS):
        policy.load_state_dict_trainable(states[run])
        logprobs, mask = policy.token_logprobs(prompts, completions[run])
        (-(advantages[:, None] * logprobs)[mask].sum()).backward()
        expected.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad})
        expected[-1]["__logprobs__"] = logprobs.detach()
        policy.model.zero_grad(set_to_none=True)

    bank = bank_with(policy, states)
    runs = [run for run in range(RUNS) for _ in range(2)]
    with bank.attached():
        logprobs, mask = run_logprobs(policy, bank, prompts * RUNS, [c for run in completions for c in run], runs)
    (-(advantages.repeat(RUNS)[:, None] * logprobs)[mask].sum()).backward()
    for run in range(RUNS):
        width = expected[run]["__logprobs__"].shape[1]
        torch.testing.assert_close(logprobs[2 * run : 2 * run + 2, :width].detach(), expected[run]["__logprobs__"],
                                   atol=1e-5, rtol=1e-5)
        for name, parameter in zip(bank.state_of(run), bank.parameters_of(run)):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"run {run}: {name} got no gradient"
            torch.testing.assert_close(parameter.grad, expected[run][name], atol=1e-5, rtol=1e-4)
    # The runs' gradients differ: no adapter sees another run's rows.
    assert not torch.allclose(bank.parameters_of(0)[0].grad, bank.parameters_of(1)[0].grad)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("rows_per_batch", [128, 5])
def test_sample_runs_gives_each_run_the_tokens_of_its_own_call(greedy: bool, rows_per_batch: int) -> None:
    policy = make_policy()
    states = run_states(policy, spread=0.3)
    # Runs 0 and 2 share a prompt: their rows must still use their own adapters.
    prompts = [[policy.chat_prompt(student_prompt(q)) for q in QUESTIONS[run : run + 2]] for run in range(RUNS)]
    prompts[2][1] = prompts[0][0]
    seeds = [11, 22, 33]
    options = dict(num_samples=3, temperature=1.0, max_new_tokens=16, greedy=greedy)
    alone = []
    baseline = policy.state_dict_trainable()
    for run in range(RUNS):
        policy.load_state_dict_trainable(states[run])
        alone.append(policy.sample(prompts[run], seed=seeds[run], batch_size=4, **options))
    policy.load_state_dict_trainable(baseline)
    bank = bank_with(policy, states)
    together = sample_runs(policy, bank, prompts, seeds=seeds, rows_per_batch=rows_per_batch, **options)
    for run in range(RUNS):
        assert together[run].completion_ids == alone[run].completion_ids, f"run {run}"
        assert together[run].prompt_index == alone[run].prompt_index
        assert together[run].texts == alone[run].texts
    lengths = {len(c) for r in together for c in r.completion_ids}
    assert max(lengths) > 2 and len(lengths) > 1, "test needs rows that end at different steps"
    assert together[0].completion_ids != together[1].completion_ids
    # The policy itself was never changed (the bank holds the runs' adapters).
    assert all(torch.equal(v, baseline[k]) for k, v in policy.state_dict_trainable().items())

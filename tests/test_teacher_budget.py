"""The LLM teacher's rejection budget and sampling temperature (issue 15, items 4 and 8).

When the budget of raw samples runs out, rejected outputs must get no gradient, the datasets'
advantages must still sum to zero over the trained outputs (the property that keeps rejection
sampling unbiased), and an empty dataset must not enter the advantages with the env's penalty.
The update must score sampled tokens at the temperature they were sampled at.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from agents import RLOOTeacher, make_teacher_config
from agents.rloo_teacher import build_rollout, counted_drafts
from agents.teacher_config import TeacherConfig
from agents.teacher_sampling import Draft, TeacherSampler
from soar_env.options import field_docs
from soar_env.problems import Problem, Rejection
from soar_env.rl import rloo_advantages

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    return make_teacher_config("tiny", seed=0, lora=True, lora_rank=4, lora_alpha=8, **overrides)


def make_draft(number: int, ok: bool) -> Draft:
    result = Problem(f"What is {number} + 1?", str(number + 1), source="teacher") if ok else \
        Rejection("missing_question_tag")
    return Draft(text=f"draft {number}", result=result, rows=[([1, 2, 3], [5 + number % 7, 6])])


def scripted_sampler(monkeypatch, valid_total: int) -> list[int]:
    """Teacher samples where only the first ``valid_total`` outputs of the run are valid."""
    drawn = [0]

    def sample(self, count, seed):
        drafts = [make_draft(drawn[0] + i, drawn[0] + i < valid_total) for i in range(count)]
        drawn[0] += count
        return drafts

    monkeypatch.setattr(TeacherSampler, "sample", sample)
    monkeypatch.setattr(RLOOTeacher, "sampler", property(lambda self: TeacherSampler.__new__(TeacherSampler)))
    return drawn


def row_advantages(rollout, row_rewards, group_size) -> list[float]:
    """What the updater's leave-one-out makes of the rollout's rewards."""
    return rloo_advantages(torch.tensor(row_rewards).view(-1, group_size)).view(-1).tolist()


def test_a_short_proposal_trains_only_valid_outputs_with_advantages_that_sum_to_zero(monkeypatch):
    scripted_sampler(monkeypatch, valid_total=7)
    teacher = RLOOTeacher(tiny_config(max_attempts=1.5))
    with pytest.warns(RuntimeWarning, match="only 7 of 12 problems were valid"):
        batches = teacher.propose(3, 4)
    datasets = teacher.last_drafts()
    assert all(d.ok for dataset in datasets for d in dataset)  # rejected outputs are in no dataset
    sizes = [len(d) for d in datasets]
    assert sorted(sizes) == [2, 2, 3] and [len(b) for b in batches] == sizes

    rewards = np.array([0.03, -0.01, 0.01])
    rollout, row_rewards, group_size = build_rollout(datasets, rewards)
    assert all(text.startswith("draft ") and int(text.split()[1]) < 7 for text in rollout.texts)
    advantages = row_advantages(rollout, row_rewards, group_size)
    # Every trained output's log-prob carries the same grad log P(valid); it cancels only if the
    # advantages sum to zero over the outputs, which unequal datasets break unless weighted.
    assert sum(advantages) == pytest.approx(0.0, abs=1e-6)
    dataset_of = {d.text: k for k, dataset in enumerate(datasets) for d in dataset}
    mean_size = sum(sizes) / 3
    for text, advantage in zip(rollout.texts, advantages):
        k = dataset_of[text]
        a_k = rewards[k] - np.mean(np.delete(rewards, k))
        assert advantage == pytest.approx(a_k * mean_size / sizes[k], rel=1e-4, abs=1e-7)


def test_an_empty_or_refused_dataset_is_left_out_of_the_advantages():
    full = [[make_draft(0, True), make_draft(1, True)], [], [make_draft(2, True), make_draft(3, True)]]
    rewards = np.array([0.02, -1.0, -0.01])  # -1: the env's penalty for the empty dataset
    infos = [{"invalid_action": False}, {"invalid_action": True}, {"invalid_action": False}]
    rollout, row_rewards, group_size = build_rollout(counted_drafts(full, infos), rewards)
    advantages = dict(zip(rollout.texts, row_advantages(rollout, row_rewards, group_size)))
    assert advantages == pytest.approx({"draft 0": 0.03, "draft 1": 0.03, "draft 2": -0.03, "draft 3": -0.03})

    # The env refused problem 1 of dataset 0 and all of dataset 2: only what it trained on counts.
    infos = [{"rejected": [{"index": 1, "reason": "unparsable_answer"}]}, {"invalid_action": True},
             {"invalid_action": True}]
    counted = counted_drafts(full, infos)
    assert [[d.text for d in dataset] for dataset in counted] == [["draft 0"], [], []]
    rollout, row_rewards, group_size = build_rollout(counted, rewards)
    assert row_advantages(rollout, row_rewards, group_size) == [0.0]  # no second dataset: no baseline
    # Without infos (or with one per dataset missing) nothing is dropped.
    assert counted_drafts(full, []) == [list(d) for d in full]


def test_a_full_proposal_keeps_the_paper_layout():
    datasets = [[make_draft(2 * k + i, True) for i in range(2)] for k in range(3)]
    rewards = np.array([0.03, -0.01, 0.01])
    rollout, row_rewards, group_size = build_rollout(datasets, rewards)
    assert group_size == 3 and row_rewards == [0.03, -0.01, 0.01] * 2


def test_a_hit_budget_is_recorded_in_the_update_and_warned_about_rate_limited(monkeypatch):
    drawn = scripted_sampler(monkeypatch, valid_total=2)
    teacher = RLOOTeacher(tiny_config(max_attempts=1.0))
    teacher.setup(None, total_steps=4)  # loads the model (the scripted sampler does not need it)
    with pytest.warns(RuntimeWarning, match="max_attempts=1"):
        teacher.propose(3, 2)  # 2 valid problems for 3 datasets: one is empty
    assert sorted(len(d) for d in teacher.last_drafts()) == [0, 1, 1]
    metrics = teacher.pop_metrics()
    assert metrics["teacher/bound_hit"] == 1.0 and metrics["teacher/problems_short"] == 4.0
    assert metrics["teacher/empty_datasets"] == 1.0
    empty = [k for k, d in enumerate(teacher.last_drafts()) if not d][0]
    rewards = np.full(3, -1.0)  # -1: the env's penalty for the empty dataset
    rewards[[k for k in range(3) if k != empty]] = [0.05, -0.05]
    infos = [{"invalid_action": k == empty} for k in range(3)]
    before = {k: v.clone() for k, v in teacher.policy.state_dict_trainable().items()}
    stats = teacher.update(rewards, infos)
    assert stats["budget_exhausted"] == 1.0 and stats["datasets_left_out"] == 1.0 and stats["problems_short"] == 4.0
    assert stats["update_skipped"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in teacher.policy.state_dict_trainable().items())
    # Only the advantages of the two valid datasets (+-0.1, +-0.05 apart from their mean) entered.
    assert stats["advantage_abs_mean"] == pytest.approx(0.1, rel=1e-4)

    # Rate limit: warnings at the 1st, 2nd and 4th hit of a run, not the 3rd or 5th.
    shown = []
    for _ in range(4):
        drawn[0] = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            teacher.propose(3, 2)
        shown.append(sum(issubclass(w.category, RuntimeWarning) for w in caught))
    assert shown == [1, 0, 1, 0] and teacher.totals["bound_hits"] == 5


def test_teacher_log_probs_in_the_update_are_at_the_sampling_temperature(monkeypatch):
    temperature = 0.7
    teacher = RLOOTeacher(tiny_config(temperature=temperature, max_attempts=3.0, kl_coef=0.0))
    teacher.propose(2, 2)
    policy = teacher.policy
    original = type(policy).token_logprobs

    def spy(self, prompt_ids, completion_ids, **options):
        logprobs, mask = original(self, prompt_ids, completion_ids, **options)
        if options.get("reference"):
            return logprobs, mask
        with torch.no_grad():  # the expected values, from the same weights, before the optimizer step
            for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
                if not completion:
                    continue
                ids = torch.tensor([list(prompt) + list(completion)], device=self.device)
                logits = self.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # (T, V)
                expected = torch.log_softmax(logits / temperature, -1).gather(
                    1, torch.tensor(list(completion), device=self.device)[:, None]).squeeze(1)  # (T,)
                checked.append((logprobs[row, :len(completion)].detach().clone(), expected))
        return logprobs, mask

    checked = []
    monkeypatch.setattr(type(policy), "token_logprobs", spy)
    stats = teacher.update(np.array([0.05, -0.05]), [])
    assert stats["update_skipped"] == 0.0
    for used, expected in checked:
        torch.testing.assert_close(used, expected, rtol=1e-4, atol=1e-4)
    assert checked  # some sampled tokens were scored


def test_the_papers_teacher_batch_size_and_temperature_are_documented_in_the_help():
    docs = field_docs(TeacherConfig)
    assert 'batch size 2' in docs["micro_batch_size"] and "one optimizer step" in docs["micro_batch_size"]
    assert "logits / T" in docs["temperature"] and "on-policy" in docs["temperature"]
    assert "unbiased" in docs["max_attempts"] and "left out of the advantages" in docs["max_attempts"]

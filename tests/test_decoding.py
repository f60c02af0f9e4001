"""The sampling front and its helpers, without a model: argument normalisation, batching, rollouts."""

from __future__ import annotations

import pytest
import torch

from soar_env.models import LoraSettings, Rollout, resolve_device
from soar_env.models.decoding import SampleOptions, SamplerBase, first_stop_end, left_pad, plan_batches, positions


def options(**overrides) -> SampleOptions:
    given = dict(num_samples=4, temperature=1.0, max_new_tokens=8, stop=None, greedy=False, seed=None, batch_size=64)
    return SampleOptions(**(given | overrides))


def test_options_normalise_greedy_and_stops() -> None:
    assert not options().decodes_greedily and options().draws == 4
    assert options(temperature=0.0).decodes_greedily and options(temperature=0.0).draws == 1
    assert options(greedy=True).draws == 1
    assert options(stop=["", "</answer>", ""]).stops == ["</answer>"] and options().stops == []
    assert options(stop=["x"]).as_kwargs() == dict(num_samples=4, temperature=1.0, max_new_tokens=8, stop=["x"],
                                                    greedy=False, seed=None, batch_size=64)


def test_sampler_base_hands_the_arguments_to_the_engine() -> None:
    seen = []

    class Engine(SamplerBase):
        def _sample(self, prompts, options):
            seen.append((prompts, options))
            return Rollout.from_completions([], [])

    Engine().sample(["a", "b"], num_samples=2, stop=["x"], seed=3)
    assert seen == [(["a", "b"], options(num_samples=2, stop=["x"], seed=3, max_new_tokens=256))]


def test_rollout_from_completions_is_prompt_major() -> None:
    prompts = [[1, 2], [3]]
    rollout = Rollout.from_completions(prompts, [[([5, 6], "ab", True), ([7], "c", False)], [([8], "d", True)]])
    assert rollout.prompt_index == [0, 0, 1]
    assert rollout.prompt_ids[0] is rollout.prompt_ids[1] is prompts[0]
    assert rollout.completion_ids == [[5, 6], [7], [8]] and rollout.texts == ["ab", "c", "d"]
    assert rollout.stopped == [True, False, True] and rollout.num_tokens == 4 and len(rollout) == 3
    greedy = Rollout.from_completions(prompts, [[([5], "a", True)], [([8], "d", False)]], copies=3)
    assert greedy.prompt_index == [0, 0, 0, 1, 1, 1] and greedy.texts == ["a"] * 3 + ["d"] * 3
    assert greedy.completion_ids[0] is not greedy.completion_ids[1]  # rows are independent lists


@pytest.mark.parametrize("prompts, draws, batch_size", [(5, 4, 8), (3, 10, 4), (7, 1, 3), (2, 4, 4)])
def test_plan_batches_covers_every_draw_once(prompts: int, draws: int, batch_size: int) -> None:
    counts = [0] * prompts
    for group, repeats in plan_batches(list(range(prompts)), draws, batch_size):
        assert len(group) * repeats <= batch_size
        for i in group:
            counts[i] += repeats
    assert counts == [draws] * prompts


def test_left_pad_and_positions() -> None:
    ids, mask = left_pad([[4, 5, 6], [7], []], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    assert first_stop_end("a</b>c</d>", ["</d>", "</b>"]) == 5 and first_stop_end("abc", ["x"]) is None


def test_resolve_device(monkeypatch) -> None:
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_lora_settings_as_peft_config() -> None:
    config = LoraSettings(r=8, alpha=16, target_modules=("q_proj", "v_proj")).peft_config()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.0, "none")
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.task_type == "CAUSAL_LM"

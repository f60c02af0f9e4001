"""LMPolicy: sampling, log-probs, LoRA, state snapshots, saving.

    python -m pytest tests/test_policy.py -q -m "not slow"
"""

from __future__ import annotations

import time

import pytest
import torch

from soar_env.models import EMBEDDED_DEFAULT, LMPolicy, LoraSettings, build_tiny_model, load_model
from soar_env.models.decode_engines import FastDecodeSettings
from soar_env.models.precision import native_bf16, resolve_compute_dtype
from soar_env.prompts import TEACHER_REPLY_PREFIX, student_prompt, teacher_prompt

QUESTIONS = ["What is 2 + 3?", "Find x if 3x + 4 = 19 and explain every step.", "Compute 7 * 8."]


def tiny_policy_with(seed: int = 0, **kwargs) -> LMPolicy:
    model, tokenizer = build_tiny_model(seed=seed)
    return LMPolicy(model, tokenizer, **kwargs)


def prompts_for(policy: LMPolicy) -> list[str]:
    return [policy.chat_prompt(student_prompt(q)) for q in QUESTIONS]


def plain_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Reference computation: one unpadded forward pass and a full log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]  # (P+T, V)
    logprobs = logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) + len(completion) - 1]  # (T, V)
    return logprobs.gather(1, torch.tensor(completion)[:, None]).squeeze(1)  # (T,)


def perturb(parameters: list[torch.nn.Parameter], seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# construction and prompts


def test_lora_defaults_and_seeded_init() -> None:
    settings = LoraSettings()
    assert (settings.r, settings.alpha, settings.dropout) == (16, 32, 0.0)
    assert settings.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    torch.manual_seed(1)
    a = tiny_policy_with()
    torch.manual_seed(2)
    b = tiny_policy_with()
    c = tiny_policy_with(lora=LoraSettings(init_seed=7))
    assert states_equal(a.state_dict_trainable(), b.state_dict_trainable())
    assert not states_equal(a.state_dict_trainable(), c.state_dict_trainable())
    names = list(a.state_dict_trainable())
    assert names and all("lora_" in n for n in names)
    assert len(names) == 2 * 7 * 2  # A and B, 7 projections, 2 layers


def test_full_finetuning_trains_every_weight() -> None:
    policy = tiny_policy_with(lora=None)
    assert policy.num_trainable == sum(p.numel() for p in policy.model.parameters())


def test_chat_prompt_ends_with_the_reply_prefix(tiny_policy) -> None:
    text = tiny_policy.chat_prompt(teacher_prompt(), reply_prefix=TEACHER_REPLY_PREFIX)
    assert text.endswith("<|im_start|>assistant\n" + TEACHER_REPLY_PREFIX)
    assert teacher_prompt() in text
    plain = tiny_policy.chat_prompt("hi")
    assert plain.endswith("<|im_start|>assistant\n")
    with_system = tiny_policy_with(system_prompt="You are a student.").chat_prompt("hi")
    assert with_system.startswith("<|im_start|>system\nYou are a student.<|im_end|>")


# ----------------------------------------------------------------------------------------------
# sampling


def test_sample_is_grouped_prompt_major(tiny_policy) -> None:
    prompts = prompts_for(tiny_policy)
    rollout = tiny_policy.sample(prompts, num_samples=4, max_new_tokens=6, seed=0)
    assert rollout.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert len(rollout) == 12 and len(rollout.texts) == 12 and len(rollout.stopped) == 12
    for i, prompt_ids in zip(rollout.prompt_index, rollout.prompt_ids):
        assert prompt_ids == tiny_policy.tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
    for ids, text, stopped in zip(rollout.completion_ids, rollout.texts, rollout.stopped):
        assert 1 <= len(ids) <= 6
        assert stopped or len(ids) == 6
        assert text == tiny_policy.tokenizer.decode(ids, skip_special_tokens=True)
    assert rollout.num_tokens == sum(len(ids) for ids in rollout.completion_ids)


def test_sample_in_small_batches_keeps_the_grouping(tiny_policy) -> None:
    prompts = prompts_for(tiny_policy)[:2]
    rollout = tiny_policy.sample(prompts, num_samples=5, max_new_tokens=4, seed=0, batch_size=2)
    assert rollout.prompt_index == [0] * 5 + [1] * 5
    assert all(len(ids) <= 4 for ids in rollout.completion_ids)


def test_same_seed_same_texts_and_global_rng_untouched(tiny_policy) -> None:
    prompts = prompts_for(tiny_policy)
    torch.manual_seed(5)
    expected_next = torch.rand(2)
    torch.manual_seed(5)
    first = tiny_policy.sample(prompts, num_samples=3, max_new_tokens=12, seed=11)
    assert torch.equal(torch.rand(2), expected_next)
    second = tiny_policy.sample(prompts, num_samples=3, max_new_tokens=12, seed=11)
    other = tiny_policy.sample(prompts, num_samples=3, max_new_tokens=12, seed=12)
    assert first.completion_ids == second.completion_ids and first.texts == second.texts
    assert first.completion_ids != other.completion_ids
    # Samples of one prompt differ from each other (a random model is far from deterministic).
    assert len(set(map(tuple, first.completion_ids[:3]))) > 1


def test_shared_prefill_matches_separate_prompts(tiny_policy) -> None:
    """generate path: num_samples copies of a prompt decode from one prefilled KV cache, as copies would.

    (The own decode loop keys each row's random stream by (prompt, sample), so there the rows
    of copies differ by design; tests/test_fast_decode.py covers its batching invariances.)
    """
    short, long = prompts_for(tiny_policy)[0], prompts_for(tiny_policy)[1]
    tiny_policy.fast_decode = None
    try:
        shared = tiny_policy.sample([short, long], num_samples=4, max_new_tokens=10, seed=3)
        separate = tiny_policy.sample([short] * 4 + [long] * 4, num_samples=1, max_new_tokens=10, seed=3)
    finally:
        tiny_policy.fast_decode = FastDecodeSettings()
    assert shared.completion_ids == separate.completion_ids


def test_greedy_is_deterministic_and_independent_of_batching(tiny_policy) -> None:
    prompts = prompts_for(tiny_policy)
    greedy = tiny_policy.sample(prompts, num_samples=3, max_new_tokens=10, greedy=True, seed=1)
    again = tiny_policy.sample(prompts, num_samples=3, max_new_tokens=10, greedy=True, seed=2)
    assert greedy.completion_ids == again.completion_ids
    for k in range(3):
        group = greedy.completion_ids[3 * k : 3 * k + 3]
        assert group[0] == group[1] == group[2]
        # Alone (no left padding) the prompt decodes the same tokens.
        alone = tiny_policy.sample([prompts[k]], max_new_tokens=10, greedy=True)
        assert alone.completion_ids[0] == group[0]
    assert tiny_policy.sample(prompts, max_new_tokens=10, temperature=0.0).completion_ids == greedy.completion_ids[::3]


def test_merged_lora_sampling_matches_unmerged_and_restores_weights() -> None:
    policy = tiny_policy_with()
    perturb(policy.trainable_parameters(), seed=9, scale=0.3)
    base_before = {n: p.clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    weights_before = {n: p for n, p in policy.model.named_parameters()}
    prompts = prompts_for(policy)
    merged = policy.sample(prompts, num_samples=3, max_new_tokens=10, seed=0)
    merged_greedy = policy.sample(prompts, max_new_tokens=10, greedy=True)
    policy.merge_lora_for_sampling = False
    unmerged = policy.sample(prompts, num_samples=3, max_new_tokens=10, seed=0)
    unmerged_greedy = policy.sample(prompts, max_new_tokens=10, greedy=True)
    assert merged.completion_ids == unmerged.completion_ids
    assert merged_greedy.completion_ids == unmerged_greedy.completion_ids
    after = dict(policy.model.named_parameters())
    assert all(after[n] is p for n, p in weights_before.items()), "the original parameter objects are back"
    assert all(torch.equal(after[n], p) for n, p in base_before.items()), "base weights are bit-identical"


def test_sampling_is_not_truncated_to_top_k(tiny_policy) -> None:
    """RL needs samples from the full softmax: tokens outside the top 50 must occur."""
    prompt = prompts_for(tiny_policy)[0]
    rollout = tiny_policy.sample([prompt], num_samples=16, max_new_tokens=8, seed=0)
    ranks = []
    for completion in rollout.completion_ids:
        with torch.no_grad():
            logits = tiny_policy.model(input_ids=torch.tensor([rollout.prompt_ids[0] + completion])).logits[0]
        start = len(rollout.prompt_ids[0]) - 1
        for t, token in enumerate(completion):
            row = logits[start + t]
            ranks.append(int((row > row[token]).sum()))
    assert max(ranks) >= 50


def test_stop_strings_cut_text_and_tokens(tiny_policy) -> None:
    prompts = prompts_for(tiny_policy)
    free = tiny_policy.sample(prompts, num_samples=4, max_new_tokens=24, seed=4)
    stop = " "
    assert sum(stop in text for text in free.texts) >= 4, "the test needs texts that contain the stop string"
    cut = tiny_policy.sample(prompts, num_samples=4, max_new_tokens=24, seed=4, stop=[stop])
    tokenizer = tiny_policy.tokenizer
    for ids, text, stopped, full, full_stopped in zip(
        cut.completion_ids, cut.texts, cut.stopped, free.texts, free.stopped
    ):
        if stop in full:
            # Stopping early never changes the tokens before the stop.
            assert text == full[: full.index(stop) + len(stop)] and stopped
            assert stop in tokenizer.decode(ids, skip_special_tokens=True)
            assert stop not in tokenizer.decode(ids[:-1], skip_special_tokens=True)
        else:
            assert text == full and stopped == full_stopped


def test_trim_keeps_eos_and_cuts_at_stop(tiny_policy) -> None:
    tokenizer = tiny_policy.tokenizer
    eos = tokenizer.eos_token_id
    body = tokenizer("12 + 30 = 42</answer> and more", add_special_tokens=False)["input_ids"]
    ids, text, stopped = tiny_policy.trim(body[:3] + [eos] + body[3:], [])
    assert ids == body[:3] + [eos] and stopped and text == tokenizer.decode(body[:3])
    ids, text, stopped = tiny_policy.trim(body + [eos], ["</answer>"])
    assert stopped and text == "12 + 30 = 42</answer>" and eos not in ids
    assert "</answer>" not in tokenizer.decode(ids[:-1])
    ids, text, stopped = tiny_policy.trim(body, ["never"])
    assert ids == body and not stopped


# ----------------------------------------------------------------------------------------------
# log-probs


def test_logprobs_match_a_plain_forward(tiny_policy) -> None:
    rollout = tiny_policy.sample(prompts_for(tiny_policy), num_samples=2, max_new_tokens=9, seed=0)
    logprobs, mask = tiny_policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
    width = max(len(c) for c in rollout.completion_ids)
    assert logprobs.shape == mask.shape == (6, width)
    assert mask.sum(1).tolist() == [len(c) for c in rollout.completion_ids]
    assert torch.all(logprobs[~mask] == 0) and torch.all(logprobs[mask] <= 0)
    for i, (prompt, completion) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids)):
        expected = plain_logprobs(tiny_policy.model, prompt, completion)
        torch.testing.assert_close(logprobs[i, : len(completion)].detach(), expected, atol=1e-5, rtol=1e-5)
    chunked, _ = tiny_policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, micro_batch_size=4)
    torch.testing.assert_close(chunked, logprobs, atol=1e-5, rtol=1e-5)


def test_logprobs_with_ragged_completions_and_distinct_prompts(tiny_policy) -> None:
    tokenizer = tiny_policy.tokenizer
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts_for(tiny_policy)]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["5", "x = 5, so \\boxed{5}", ""]]
    logprobs, mask = tiny_policy.token_logprobs(prompts, completions)
    assert mask.sum(1).tolist() == [len(c) for c in completions]
    for i in range(2):
        expected = plain_logprobs(tiny_policy.model, prompts[i], completions[i])
        torch.testing.assert_close(logprobs[i, : len(completions[i])].detach(), expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapters() -> None:
    policy = tiny_policy_with()
    rollout = policy.sample(prompts_for(policy), num_samples=2, max_new_tokens=6, seed=0)
    logprobs, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
    assert logprobs.requires_grad
    (-(logprobs * mask).sum()).backward()
    for name, parameter in policy.model.named_parameters():
        if "lora_" in name:
            assert parameter.grad is not None
        else:
            assert parameter.grad is None, name
    # B starts at zero, so the first gradient lands on B.
    assert any(p.grad.abs().sum() > 0 for n, p in policy.model.named_parameters() if "lora_B" in n)


def test_reference_is_the_base_model_with_adapters_off() -> None:
    policy = tiny_policy_with()
    perturb(policy.trainable_parameters(), seed=0, scale=0.5)
    base, _ = build_tiny_model(seed=0)
    rollout = policy.sample(prompts_for(policy), num_samples=2, max_new_tokens=6, seed=0)
    current, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
    reference, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, reference=True)
    assert not reference.requires_grad
    assert not torch.allclose(current.detach()[mask], reference[mask], atol=1e-3)
    for i, (prompt, completion) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids)):
        torch.testing.assert_close(reference[i, : len(completion)], plain_logprobs(base, prompt, completion))


def test_full_finetuning_reference_is_a_lazy_frozen_copy() -> None:
    policy = tiny_policy_with(lora=None)
    rollout = policy.sample(prompts_for(policy)[:1], num_samples=2, max_new_tokens=5, seed=0)
    before, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, reference=True)
    perturb(policy.trainable_parameters(), seed=1)
    after_change, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, reference=True)
    torch.testing.assert_close(after_change, before)
    current, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
    assert not torch.allclose(current.detach(), before)
    policy.reset_reference()
    snapshot, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids, reference=True)
    torch.testing.assert_close(snapshot, current.detach())


# ----------------------------------------------------------------------------------------------
# state, saving


def test_trainable_state_round_trip() -> None:
    policy = tiny_policy_with()
    rollout = policy.sample(prompts_for(policy), max_new_tokens=6, seed=0)
    snapshot = policy.state_dict_trainable()
    expected, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
    perturb(policy.trainable_parameters(), seed=2)
    assert not states_equal(policy.state_dict_trainable(), snapshot)
    policy.load_state_dict_trainable(snapshot)
    assert states_equal(policy.state_dict_trainable(), snapshot)
    restored, _ = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)
    assert torch.equal(restored, expected)
    # The snapshot is a copy: training after it does not change it.
    perturb(policy.trainable_parameters(), seed=3)
    assert not states_equal(policy.state_dict_trainable(), snapshot)
    with pytest.raises(KeyError):
        policy.load_state_dict_trainable({"not.a.parameter": torch.zeros(1)})


@pytest.mark.parametrize("lora", [LoraSettings(r=4), None], ids=["lora", "full"])
def test_save_and_load_on_disk(tmp_path, lora) -> None:
    policy = LMPolicy.from_name("tiny", lora=lora, system_prompt="Be brief.")
    perturb(policy.trainable_parameters(), seed=4)
    policy.save(tmp_path / "checkpoint")
    fresh = LMPolicy.from_name("tiny", lora=lora)
    fresh.load(tmp_path / "checkpoint")
    assert states_equal(fresh.state_dict_trainable(), policy.state_dict_trainable())
    rebuilt = LMPolicy.from_checkpoint(tmp_path / "checkpoint")
    assert states_equal(rebuilt.state_dict_trainable(), policy.state_dict_trainable())
    assert rebuilt.system_prompt == "Be brief." and rebuilt.lora == lora
    mismatched = LMPolicy.from_name("tiny", lora=LoraSettings(r=8))
    with pytest.raises(ValueError):
        mismatched.load(tmp_path / "checkpoint")


@pytest.mark.parametrize("lora", [LoraSettings(), None], ids=["lora", "full"])
def test_save_pretrained_full_reloads_with_the_same_logits(tmp_path, lora) -> None:
    policy = tiny_policy_with(lora=lora)
    perturb(policy.trainable_parameters(), seed=5, scale=0.2)
    policy.save_pretrained_full(tmp_path / "hf")
    model, tokenizer = load_model(str(tmp_path / "hf"))
    ids = tokenizer(prompts_for(policy)[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = policy.model(input_ids=torch.tensor([ids])).logits
        got = model(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert tokenizer.get_vocab() == policy.tokenizer.get_vocab()
    # The policy keeps its adapters: saving merged a copy.
    assert len(policy.trainable_parameters()) > 0


# ----------------------------------------------------------------------------------------------
# embedded model (slow; one shared load)


@pytest.mark.slow
def test_embedded_answers_a_question(embedded_policy) -> None:
    prompt = embedded_policy.chat_prompt("What is 2 + 3?")
    rollout = embedded_policy.sample([prompt], max_new_tokens=16, greedy=True)
    assert rollout.texts[0].strip()
    sampled = embedded_policy.sample([prompt], num_samples=2, max_new_tokens=8, seed=0)
    logprobs, mask = embedded_policy.token_logprobs(sampled.prompt_ids, sampled.completion_ids)
    for i, completion in enumerate(sampled.completion_ids):
        expected = plain_logprobs(embedded_policy.model, sampled.prompt_ids[i], completion)
        torch.testing.assert_close(logprobs[i, : len(completion)].detach(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_embedded_lora_restore_is_fast(embedded_policy) -> None:
    snapshot = embedded_policy.state_dict_trainable()
    perturb(embedded_policy.trainable_parameters(), seed=6)
    start = time.perf_counter()
    embedded_policy.load_state_dict_trainable(snapshot)
    elapsed = time.perf_counter() - start
    assert states_equal(embedded_policy.state_dict_trainable(), snapshot)
    assert elapsed < 1.0, f"restoring the LoRA state took {elapsed:.2f} s"


@pytest.mark.slow
def test_embedded_save_pretrained_full(tmp_path, embedded_policy) -> None:
    snapshot = embedded_policy.state_dict_trainable()
    perturb(embedded_policy.trainable_parameters(), seed=7, scale=0.01)
    try:
        embedded_policy.save_pretrained_full(tmp_path / "hf")
        model, tokenizer = load_model(str(tmp_path / "hf"))
        ids = tokenizer(embedded_policy.chat_prompt("What is 2 + 3?"), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = embedded_policy.model(input_ids=torch.tensor([ids])).logits
            got = model(input_ids=torch.tensor([ids])).logits
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    finally:
        embedded_policy.load_state_dict_trainable(snapshot)
    assert EMBEDDED_DEFAULT == "smollm2-135m-instruct"


# --- bf16 compute ---------------------------------------------------------------------------------


def bf16_pair(**kwargs) -> tuple[LMPolicy, LMPolicy]:
    """The same tiny policy twice: fp32 compute and bf16 compute."""
    return tiny_policy_with(**kwargs), tiny_policy_with(compute_dtype="bfloat16", **kwargs)


def scored_rows(policy: LMPolicy) -> tuple[list[list[int]], list[list[int]]]:
    tokenizer = policy.tokenizer
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts_for(policy)]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"]
                   for t in ["5", "x = 5, so \\boxed{5}", "7 * 8 = 56, \\boxed{56}"]]
    return prompts, completions


def test_bf16_compute_runs_the_products_in_bf16_and_keeps_fp32_weights() -> None:
    assert resolve_compute_dtype("auto") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    with pytest.raises(ValueError, match="compute_dtype"):
        tiny_policy_with(compute_dtype="float16")
    policy = tiny_policy_with(compute_dtype="bfloat16")
    assert policy.compute_dtype == torch.bfloat16
    seen: list[torch.dtype] = []
    projection = next(m for n, m in policy.model.named_modules() if n.endswith("q_proj.base_layer"))
    projection.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    logprobs, _ = policy.token_logprobs(*scored_rows(policy))
    assert seen and set(seen) == {torch.bfloat16}  # the matrix products ran in bf16 ...
    assert logprobs.dtype == torch.float32  # ... the log-softmax in fp32
    # The weights are the fp32 masters: the adapters the optimiser updates, and the frozen base.
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("lora", [LoraSettings(), None], ids=["lora", "full"])
def test_bf16_logprobs_match_fp32_within_rounding(lora) -> None:
    fp32, bf16 = bf16_pair(lora=lora)
    rows = scored_rows(fp32)
    expected, mask = fp32.token_logprobs(*rows)
    got, _ = bf16.token_logprobs(*rows)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per product); over the tiny model's layers
    # the log-probs (|log p| ~ 7 for a 16k-token random model) move by well under 0.1.
    assert (got - expected)[mask].abs().max().item() < 0.1
    assert (got - expected)[mask].abs().mean().item() < 0.03
    reference, _ = bf16.token_logprobs(*rows, reference=True)  # the KL reference pass too
    assert (reference - fp32.token_logprobs(*rows, reference=True)[0])[mask].abs().max().item() < 0.1


@pytest.mark.parametrize("lora", [LoraSettings(), None], ids=["lora", "full"])
def test_a_bf16_update_trains_the_fp32_weights(lora) -> None:
    from soar_env.rl import RLOOConfig, RLOOUpdater

    policy = tiny_policy_with(lora=lora, compute_dtype="bfloat16")
    rollout = policy.sample(prompts_for(policy)[:2], num_samples=4, max_new_tokens=6, seed=0)
    before = policy.state_dict_trainable()
    updater = RLOOUpdater(policy.trainable_parameters(), RLOOConfig(lr=1e-2, kl_coef=0.001), total_steps=1)
    stats = updater.update(policy, rollout, [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0], group_size=4)
    assert stats["skipped"] == 0.0
    after = policy.state_dict_trainable()
    assert {t.dtype for t in after.values()} == {torch.float32}
    changed = [n for n in after if not torch.equal(after[n], before[n])]
    if lora is not None:
        assert any("lora_B" in n for n in changed)
    else:
        assert len(changed) > len(after) // 2


def test_kept_bf16_copies_of_the_frozen_weights_change_nothing_bit_for_bit() -> None:
    """The update's passes run on bf16 copies of the frozen base (cast once, not once per pass):
    log-probs and adapter gradients are exactly those of autocast's own casts, and a frozen weight
    changed in place (a loaded checkpoint) is copied again."""
    from soar_env.models.precision import FrozenWeightCasts

    policy = tiny_policy_with(compute_dtype="bfloat16")
    rows = scored_rows(policy)
    policy.load_state_dict_trainable({n: t + 0.01 for n, t in policy.state_dict_trainable().items()})  # B != 0

    def scores_and_grads(kept_copies: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        policy._frozen_casts = FrozenWeightCasts(policy.model, torch.bfloat16 if kept_copies else torch.float32)
        logprobs, mask = policy.token_logprobs(*rows)
        grads = torch.autograd.grad(logprobs[mask].sum(), policy.trainable_parameters())
        return logprobs.detach(), list(grads)

    for _ in range(2):  # the second round changes a frozen weight: the copies must follow it
        kept, autocast_only = scores_and_grads(True), scores_and_grads(False)
        assert torch.equal(kept[0], autocast_only[0])
        assert all(torch.equal(a, b) for a, b in zip(kept[1], autocast_only[1]))
        assert {p.dtype for p in policy.model.parameters()} == {torch.float32}  # fp32 again after the pass
        with torch.no_grad():
            next(m for n, m in policy.model.named_modules() if n.endswith("q_proj.base_layer")).weight.mul_(1.5)

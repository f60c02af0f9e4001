"""Sampling through transformers' ``generate``: the reference path beside the own decode loop.

`LMPolicy.sample` uses `soar_env.models.fast_decode` by default; ``policy.fast_decode = None``
selects this path, which any causal LM supports and whose tokens match what earlier versions of
this library sampled for a seed (the committed studies were sampled this way).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from soar_env.models.constrained import TokenFilter
from soar_env.models.decoding import SampleOptions, StopStrings, left_pad, lora_merged, plan_batches, positions, seeded
from soar_env.models.rollout import Completion, Rollout


def generate_rollout(policy: Any, encoded: list[list[int]], options: SampleOptions) -> Rollout:
    """`LMPolicy.sample` through ``generate`` (``policy`` an LMPolicy): similar lengths batched, one seed per call."""
    greedy, stops = options.decodes_greedily, options.stops
    # Similar lengths in one batch waste less left padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    per_prompt: list[list[Completion]] = [[] for _ in encoded]
    merge = policy.lora is not None and policy.merge_lora_for_sampling
    was_training = policy.model.training
    policy.model.eval()
    try:
        with seeded(options.seed, policy.device), lora_merged(policy.model) if merge else nullcontext():
            with torch.inference_mode():
                for group, repeats in plan_batches(order, options.draws, options.batch_size):
                    rows = _generate_batch(policy, [encoded[i] for i in group], repeats, options.temperature,
                                           greedy, options.max_new_tokens, stops, options.token_filter)
                    for k, i in enumerate(group):
                        per_prompt[i].extend(rows[k * repeats : (k + 1) * repeats])
    finally:
        policy.model.train(was_training)
    return Rollout.from_completions(encoded, per_prompt, copies=options.num_samples if greedy else 1)


def _generate_batch(
    policy: Any,
    prompts: list[list[int]],
    repeats: int,
    temperature: float,
    greedy: bool,
    max_new_tokens: int,
    stops: list[str],
    token_filter: TokenFilter | None = None,
) -> list[Completion]:
    """One ``generate`` call: U prompts x ``repeats`` samples each, prompt-major."""
    ids, mask = left_pad(prompts, policy.tokenizer.pad_token_id, policy.device)  # (U, P)
    width = ids.shape[1]
    kwargs: dict[str, object] = {"max_new_tokens": max_new_tokens, "do_sample": not greedy}
    if not greedy:
        kwargs.update(temperature=float(temperature), top_k=0, top_p=1.0)
    if repeats > 1 and min(len(p) for p in prompts) > 1:
        # Prefill every prompt once, then copy its KV cache to its samples: generate()
        # then only runs the last prompt token per row. Saves (repeats - 1) prefills.
        cache = policy.new_cache()
        policy.decoder()(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions(mask[:, :-1]),
            use_cache=True,
            **{policy.cache_kwarg: cache},
        )
        cache.batch_repeat_interleave(repeats)
        kwargs[policy.cache_kwarg] = cache
    ids, mask = ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)  # (U*repeats, P)
    if stops:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopStrings(policy.tokenizer, stops, width)])
    if token_filter is not None:
        kwargs["logits_processor"] = LogitsProcessorList([FilterLogits(token_filter, width)])
    output = policy.model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # (U*repeats, P+T)
    return [policy.trim(row, stops) for row in output[:, width:].tolist()]



class FilterLogits(LogitsProcessor):
    """``generate``'s side of constrained decoding: each row's scores masked to the tokens its filter allows."""

    def __init__(self, token_filter: TokenFilter, prompt_width: int) -> None:
        self.token_filter = token_filter
        self.prompt_width = prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        # input_ids: (B, P + generated so far); scores: (B, V). Rows generate() has finished get
        # pad tokens whatever their mask, which is never empty.
        allowed = self.token_filter.mask(input_ids[:, self.prompt_width :].tolist(), scores.shape[-1], scores.device)
        return scores.masked_fill(~allowed, float("-inf"))

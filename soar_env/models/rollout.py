"""The result of sampling: completions of a list of prompts, grouped prompt-major for RLOO.

Both sampling engines (transformers in :mod:`soar_env.models.policy`, vLLM in
:mod:`soar_env.models.vllm_sampler`) return a :class:`Rollout` built by
:meth:`Rollout.from_completions`, so a row means the same whichever engine sampled it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Completion = tuple[list[int], str, bool]
"""One generated row after trimming: (kept token ids, text, whether it stopped by itself)."""


@dataclass
class Rollout:
    """Completions sampled for a list of prompts, grouped prompt-major.

    Row ``i`` belongs to prompt ``prompt_index[i]``; the ``num_samples`` rows of prompt 0 come
    first, then those of prompt 1, and so on, so ``reshape(num_prompts, num_samples)`` of any
    per-row quantity gives the RLOO groups.
    """

    prompt_index: list[int]
    """Which prompt each completion answers (index into the ``prompts`` passed to ``sample``)."""
    prompt_ids: list[list[int]]
    """Token ids of each row's prompt, unpadded; rows of one prompt share one list object."""
    completion_ids: list[list[int]]
    """Generated token ids, cut after the first stop string or eos (eos kept, so the policy is
    trained to stop)."""
    texts: list[str]
    """Decoded completions without the prompt or special tokens, cut at the end of the stop
    string. A forced reply prefix (``chat_prompt(reply_prefix=...)``) is part of the prompt,
    not of the text."""
    stopped: list[bool]
    """True when a row ended with eos or a stop string, False when ``max_new_tokens`` cut it."""

    @classmethod
    def from_completions(
        cls, prompt_ids: Sequence[list[int]], completions: Sequence[Sequence[Completion]], *, copies: int = 1
    ) -> Rollout:
        """Rows of prompt ``i`` are ``completions[i]``, repeated ``copies`` times.

        ``copies`` serves greedy decoding: every sample of a prompt is the same, so an engine
        decodes one and the rollout holds it ``num_samples`` times.
        """
        rollout = cls(prompt_index=[], prompt_ids=[], completion_ids=[], texts=[], stopped=[])
        for i, (ids, rows) in enumerate(zip(prompt_ids, completions)):
            for kept, text, stopped in list(rows) * copies:
                rollout.prompt_index.append(i)
                rollout.prompt_ids.append(ids)
                rollout.completion_ids.append(list(kept))
                rollout.texts.append(text)
                rollout.stopped.append(stopped)
        return rollout

    @property
    def num_tokens(self) -> int:
        """Generated tokens over all rows (what throughput is measured in)."""
        return sum(len(ids) for ids in self.completion_ids)

    def __len__(self) -> int:
        return len(self.completion_ids)

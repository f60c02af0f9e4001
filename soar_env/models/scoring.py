"""Log-probabilities of the chosen tokens from the output head's logits.

Every scorer of the update (the policy's micro-batches, the batched runs' passes) ends here. The
update scores N completion tokens against a vocabulary of V (49,152 for SmolLM2): that (N, V)
log softmax and its backward were about a tenth of an update's forward/backward on this CPU.
``cross_entropy`` does the log softmax and the pick in one fused kernel with a fused backward,
about twice as fast here as a gather minus a logsumexp, with the same values within fp32
round-off (benchmarks/README.md, section 3).
"""

from __future__ import annotations

import torch
from torch import Tensor


def picked_logprobs(logits: Tensor, tokens: Tensor, token_mask: Tensor, *, temperature: float = 1.0,
                    softcap: float | None = None, allowed: Tensor | None = None) -> Tensor:
    """(B, T) log-probs of ``tokens`` (B, T) from fp32 ``logits`` (N, V) of the N positions where
    ``token_mask`` (B, T) is True, in row order; 0 elsewhere.

    ``softcap``: the model's final logit soft-capping (Gemma-2), applied first. ``temperature``:
    the sampling temperature, so the scores are those of the distribution the tokens were drawn
    from. ``allowed`` (N, V) renormalises each position over the tokens a filter allowed.
    """
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    picked = -torch.nn.functional.cross_entropy(logits, tokens[token_mask], reduction="none")  # (N,)
    return torch.zeros(token_mask.shape, dtype=picked.dtype, device=logits.device).masked_scatter(token_mask, picked)


__all__ = ["picked_logprobs"]

"""The update's token scoring: fused log softmax and pick (soar_env.models.scoring)."""

from __future__ import annotations

import pytest
import torch

from soar_env.models.scoring import picked_logprobs


def by_definition(logits, tokens, mask, temperature=1.0, softcap=None, allowed=None):
    """log softmax(logits / T) at the chosen token, written out: the reference values."""
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    picked = logits.gather(1, tokens[mask][:, None]).squeeze(1) - torch.logsumexp(logits, 1)
    return torch.zeros(mask.shape).masked_scatter(mask, picked)


@pytest.mark.parametrize("temperature,softcap,constrained", [(1.0, None, False), (0.7, None, True), (1.3, 30.0, False)])
def test_fused_scores_and_gradients_equal_the_definition(temperature, softcap, constrained):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (3, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    logits = torch.randn(int(mask.sum()), 50, generator=generator) * 4
    allowed = None
    if constrained:  # every chosen token allowed, about half the others not
        allowed = torch.rand(logits.shape, generator=generator) > 0.5
        allowed[torch.arange(len(logits)), tokens[mask]] = True
    fused_in, plain_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    fused = picked_logprobs(fused_in, tokens, mask, temperature=temperature, softcap=softcap, allowed=allowed)
    plain = by_definition(plain_in, tokens, mask, temperature, softcap, allowed)
    torch.testing.assert_close(fused, plain, rtol=0, atol=2e-6)
    assert (fused[~mask] == 0).all() and (fused[mask] < 0).all()
    weights = torch.randn(mask.shape, generator=generator)
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    torch.testing.assert_close(fused_in.grad, plain_in.grad, rtol=0, atol=5e-6)
    if constrained:
        assert (fused_in.grad[~allowed] == 0).all(), "a masked token gets no gradient"

"""Sampling completions: the one ``sample`` front every engine shares, and the decoding helpers.

:class:`SamplerBase` holds the public ``sample(prompts, *, num_samples, temperature, ...)``
signature once; :class:`~soar_env.models.policy.LMPolicy` (transformers) and
:class:`~soar_env.models.vllm_sampler.VLLMSampler` implement ``_sample`` behind it. The
helpers below turn generated token rows into what a :class:`~soar_env.models.rollout.Rollout`
holds (:func:`trim_completion`), batch and pad prompts for ``generate``, and keep sampling
reproducible (:func:`seeded`) and fast (:func:`lora_merged`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from soar_env.models.rollout import Completion, Rollout

if TYPE_CHECKING:
    from soar_env.models.constrained import TokenFilter


@dataclass(frozen=True)
class SampleOptions:
    """The keyword arguments of one :meth:`SamplerBase.sample` call, as the caller gave them."""

    num_samples: int
    temperature: float
    max_new_tokens: int
    stop: Sequence[str] | None
    greedy: bool
    seed: int | None
    batch_size: int
    token_filter: TokenFilter | None = None
    """Constrained decoding (`soar_env.models.constrained`): each row draws only the tokens the
    filter allows after its own generated text; None samples from the whole vocabulary."""

    @property
    def decodes_greedily(self) -> bool:
        """``greedy=True`` or a temperature of 0 or below: argmax decoding."""
        return self.greedy or self.temperature <= 0

    @property
    def stops(self) -> list[str]:
        """The stop strings, empty ones dropped (an empty string would stop every row at once)."""
        return [s for s in (self.stop or []) if s]

    @property
    def draws(self) -> int:
        """Rows decoded per prompt: greedy samples of one prompt are identical, so one."""
        return 1 if self.decodes_greedily else self.num_samples

    def as_kwargs(self) -> dict[str, Any]:
        """The arguments again, for handing the call on to another sampler unchanged.

        ``token_filter`` is left out when None, so samplers that take no filter accept the call.
        """
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        if kwargs["token_filter"] is None:
            del kwargs["token_filter"]
        return kwargs


class Sampler(Protocol):
    """Another engine that samples for a policy, with the arguments and result of :meth:`SamplerBase.sample`."""

    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_samples: int,
        temperature: float,
        max_new_tokens: int,
        stop: Sequence[str] | None,
        greedy: bool,
        seed: int | None,
        batch_size: int,
    ) -> Rollout: ...


class SamplerBase(ABC):
    """The public ``sample`` of every engine; subclasses implement :meth:`_sample`."""

    supports_token_filter = False
    """Whether :meth:`_sample` applies ``options.token_filter``; a filter given to an engine that
    does not is an error, never silently unconstrained sampling."""

    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        stop: Sequence[str] | None = None,
        greedy: bool = False,
        seed: int | None = None,
        batch_size: int = 64,
        token_filter: TokenFilter | None = None,
    ) -> Rollout:
        """Sample ``num_samples`` completions of each prompt (full texts, e.g. from ``chat_prompt``).

        Sampling is plain ancestral sampling at ``temperature`` (no top-k/top-p), so the
        samples come from exactly the distribution ``token_logprobs`` scores.
        ``greedy=True`` (or ``temperature <= 0``) decodes greedily. With ``seed`` the result is
        reproducible and the global torch RNG is left untouched; without it the global RNG is
        used. ``batch_size`` counts sequences decoded together (engines with their own
        scheduler, like vLLM, ignore it). ``token_filter`` constrains every row to the tokens it
        allows (`soar_env.models.constrained`); the rows then come from the renormalised masked
        distribution, which ``token_logprobs(..., token_filters=...)`` scores.
        """
        if token_filter is not None and not self.supports_token_filter:
            raise ValueError(f"{type(self).__name__} cannot apply a token_filter; constrained decoding runs in "
                             "LMPolicy's transformers samplers")
        options = SampleOptions(num_samples, temperature, max_new_tokens, stop, greedy, seed, batch_size, token_filter)
        return self._sample(prompts, options)

    @abstractmethod
    def _sample(self, prompts: Sequence[str], options: SampleOptions) -> Rollout:
        """The engine's sampling, for the arguments of :meth:`sample`."""


class StopStrings(StoppingCriteria):
    """Marks a row finished as soon as its generated text contains a stop string.

    Only the last few tokens are decoded each step: a stop string of L bytes spans at most L
    tokens, so the window always holds a freshly completed one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_width = prompt_width
        self.window = max(len(s.encode()) for s in stops) + 1
        self.done: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: object) -> Tensor:
        # input_ids: (B, prompt_width + generated so far)
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        rows = (~self.done).nonzero().flatten().tolist()
        start = max(self.prompt_width, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[rows, start:], skip_special_tokens=True)
        for row, tail in zip(rows, tails):
            if any(stop in tail for stop in self.stops):
                self.done[row] = True
        return self.done.clone()


# Per-row random streams: a row's tokens depend on its own seed, never on its batch.


def call_seed(seed: int | None) -> int:
    """The seed of a call; without one, drawn from the global torch RNG (as ``generate`` would use it)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(seed)


def _splitmix64(x: int) -> int:
    """One step of splitmix64: a well-mixed 64-bit hash, so nearby keys give unrelated streams."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """Seed of the random stream of row (prompt, sample) in a call seeded ``seed``."""
    x = _splitmix64(seed & 0xFFFFFFFFFFFFFFFF)
    x = _splitmix64(x ^ (prompt & 0xFFFFFFFFFFFFFFFF))
    return _splitmix64(x ^ (sample & 0xFFFFFFFFFFFFFFFF))


def trim_completion(
    tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int], generated: list[int], stops: Sequence[str]
) -> Completion:
    """Cut a generated row after its first eos or stop string, whichever comes first.

    Returns (kept ids, text, whether it stopped). A stop string can end inside a token;
    that token is kept and the text is cut at the end of the stop string.
    """
    ids, stopped = generated, False
    for position, token in enumerate(generated):
        if token in eos_token_ids:
            ids, stopped = generated[: position + 1], True
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if stops and first_stop_end(text, stops) is not None:
        # Smallest prefix whose text already holds a stop string: binary search, ~log2(T) decodes.
        low, high = 1, len(ids)
        while low < high:
            middle = (low + high) // 2
            if first_stop_end(tokenizer.decode(ids[:middle], skip_special_tokens=True), stops) is None:
                low = middle + 1
            else:
                high = middle
        ids, stopped = ids[:low], True
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text = text[: first_stop_end(text, stops)]
    return ids, text, stopped


def first_stop_end(text: str, stops: Sequence[str]) -> int | None:
    """End index of the earliest stop string in ``text``, or None."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a reply: the tokenizer's eos and the checkpoint's (often a list)."""
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    for token in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids


def plan_batches(order: list[int], draws: int, batch_size: int) -> Iterator[tuple[list[int], int]]:
    """Split prompts x draws into generate() calls of at most ``batch_size`` rows.

    Yields (prompt indices, samples per prompt); within one call every prompt has the same
    number of samples, which lets their KV caches be expanded with one repeat.
    """
    if draws >= batch_size:
        for i in order:
            for start in range(0, draws, batch_size):
                yield [i], min(batch_size, draws - start)
    else:
        per_call = batch_size // draws
        for start in range(0, len(order), per_call):
            yield order[start : start + per_call], draws


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, P) ids and attention mask, padded on the left so every row ends at column P-1."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token, as generate() computes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the RNG that generate() draws from, restoring the caller's RNG afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def lora_merged(model: nn.Module) -> Iterator[None]:
    """Fold each adapter of a peft ``model`` into its layer's weight for the duration of the block.

    A LoRA layer costs three matmuls per token; merged, one. The merged weights are new
    tensors swapped in and the original weight objects swapped back afterwards, so the base
    weights return bit for bit (merging in place and subtracting later would drift).
    """
    swapped: list[tuple[nn.Module, nn.Parameter]] = []
    adapter = model.active_adapter
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLinear) and adapter in module.lora_A:
                    layer = module.get_base_layer()
                    # peft keeps adapters in float32 under a bfloat16/float16 model: merge, then round.
                    merged = (layer.weight + module.get_delta_weight(adapter)).to(layer.weight.dtype)  # (out, in)
                    swapped.append((layer, layer.weight))
                    layer.weight = nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():  # the merged weights already hold the adapters
            yield
    finally:
        for layer, original in swapped:
            layer.weight = original

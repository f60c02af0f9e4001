"""A decode loop of its own for the transformers path: the sampler without ``generate``.

    >>> from soar_env.models.fast_decode import FastDecodeSettings, decode_rows
    >>> from soar_env.models.tiny import build_tiny_model
    >>> model, tokenizer = build_tiny_model(seed=0)
    >>> prompt = tokenizer("What is 2 + 3?")["input_ids"]
    >>> rows = decode_rows(model, [prompt], samples=[2], max_new_tokens=4, eos_token_ids=[2], seed=0)
    >>> [len(row) for row in rows]
    [4, 4]

``LMPolicy.sample`` through ``generate`` ran at 23-29% of this CPU's one-thread fp32 GEMM
roofline (issue 19): per-step Python and logits processing, a dynamic KV cache that copies
itself on every step, finished rows decoded to the end, and MKL GEMMs at 32 rows that repack
their weights on every call. This module decodes with:

- **a hand-written forward of Llama-family decoders** (Llama, SmolLM2, Mistral and Qwen2
  without a sliding window) over the model's own weights, prepared once per decode batch (``batch_size`` rows): LoRA
  adapters folded in, RMSNorm weights and the attention scaling folded into the next matrix,
  q/k/v fused into one matrix and gate/up into another, each prepacked for oneDNN (1.4-2x the
  GEMM rate of ``F.linear`` at 32 rows), the model's own rotary embedding and activation. Any
  other causal LM runs through its own ``forward`` (the ``"hf"`` engine), same loop around it.
- **a pre-allocated KV cache**: per layer one (rows, kv_heads, head_dim, columns) key and one
  (rows, kv_heads, columns, head_dim) value tensor, written in place; attention reads only
  the columns written so far and does grouped-query attention by batched matmuls, without
  repeating the K/V heads.
- **a shared prefix run once**: the longest common prefix of a batch's prompts (the chat
  template and instructions: 49 of the student prompt's 62 tokens) is prefilled once, then
  each distinct prompt's suffix, then copied to its samples' cache rows.
- **finished rows dropped**: a row ends at eos or at the token that completes a stop string;
  once enough rows ended (``FastDecodeSettings.compact_fraction``) they leave the batch and
  the cache.
- **per-row random streams**: row (prompt i, sample j) draws its uniforms from its own
  generator seeded by (seed, i, j) and picks its token by inverse CDF on the softmax of its
  fp32 logits (one uniform per token, no multinomial over the batch). A row's tokens therefore
  do not depend on which other rows share its batch, nor on ``batch_size`` (up to float
  round-off in the logits, which moves a token only when a uniform lands within ~1e-7 of a
  CDF step).
- **optional bfloat16** (``dtype="bfloat16"``): weights, GEMMs, the output head and the K/V
  cache in bf16; residual stream, norms, rotary, softmaxes and the sampling in fp32. The
  update keeps its fp32 weights: only this sampler's copy is rounded. On SmolLM2 the sampled
  distribution moves by KL 8e-4 nats a token from fp32's (half of it from the bf16 head).

Same seed, same tokens within one build and thread count. The ``"hf"`` engine runs in the
model's dtype (``dtype`` applies to the ``"llama"`` engine only). ``torch.compile`` is not
used: compiling the decode step took 100-150 s per process on this CPU and recompiled as the
cache column advanced, for at most the ~10% of a step that is elementwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from soar_env.models.constrained import TokenFilter
from soar_env.models.decoding import SampleOptions, call_seed, lora_merged, row_seed, trim_completion
from soar_env.models.decode_engines import Engine, FastDecodeSettings, HFEngine, engine_for, model_device
from soar_env.models.rollout import Completion, Rollout

# ---------------------------------------------------------------------------------------------
# public entry points


def sample_rollout(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[list[int]],
    options: SampleOptions,
    *,
    eos_token_ids: Sequence[int],
    settings: FastDecodeSettings = FastDecodeSettings(),
) -> Rollout:
    """What ``LMPolicy._sample`` returns, for already tokenised prompts: batching, decoding, trimming.

    Rows are (prompt i, sample j) for j < ``options.draws``; batches of at most
    ``options.batch_size`` rows take prompts in order of length (less left padding). Greedy
    decodes one row per prompt and repeats it ``num_samples`` times, as the ``generate`` path does.
    """
    draws, stops = options.draws, options.stops
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    rows = [(i, j) for i in order for j in range(draws)]
    per_prompt: list[list[Completion]] = [[] for _ in encoded]
    seed = call_seed(options.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), options.batch_size):
        batch = rows[start : start + options.batch_size]
        prompt_ids = sorted({i for i, _ in batch})
        slot = {i: k for k, i in enumerate(prompt_ids)}
        generated = decode_rows(
            model,
            [encoded[i] for i in prompt_ids],
            row_prompts=[slot[i] for i, _ in batch],
            row_seeds=[row_seed(seed, i, j) for i, j in batch],
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            greedy=options.decodes_greedily,
            eos_token_ids=eos_token_ids,
            tokenizer=tokenizer,
            stops=stops,
            pad_token_id=pad,
            settings=settings,
            token_filter=options.token_filter,
        )
        for (i, _), ids in zip(batch, generated):
            per_prompt[i].append(trim_completion(tokenizer, eos_token_ids, ids, stops))
    copies = options.num_samples if options.decodes_greedily else 1
    return Rollout.from_completions(list(encoded), per_prompt, copies=copies)


def decode_rows(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    samples: Sequence[int] | None = None,
    row_prompts: Sequence[int] | None = None,
    row_seeds: Sequence[int] | None = None,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    eos_token_ids: Sequence[int] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
    stops: Sequence[str] = (),
    seed: int | None = None,
    pad_token_id: int = 0,
    settings: FastDecodeSettings = FastDecodeSettings(),
    make_engine: Callable[[nn.Module, FastDecodeSettings, int, int], Engine] | None = None,
    token_filter: TokenFilter | None = None,
) -> list[list[int]]:
    """Generated token ids of every row, in row order; one decode batch.

    Rows are given either as ``samples`` (``samples[k]`` rows of prompt k, prompt-major, row j
    of prompt k drawing the stream ``row_seed(seed, k, j)``) or as ``row_prompts`` (the prompt of
    each row) with ``row_seeds`` (the seed of each row's random stream; default
    ``row_seed(seed, prompt, row)``). A row ends after its first eos
    or after the token that completes a stop string (``stops`` needs ``tokenizer``), that token
    included, or after ``max_new_tokens``. Without ``row_seeds``, ``seed=None`` draws the call's
    seed from the global torch RNG (the global RNG is otherwise untouched). ``model`` may be a peft model: its
    active adapters are folded in. The model runs in eval mode; its weights are not changed.
    ``make_engine(model, settings, columns, pad_token_id)`` replaces the engine the model's
    family gets (one whose rows use different adapters, say); it is called inside the decode.
    ``token_filter`` masks each row's logits to the tokens it allows after that row's text
    (`soar_env.models.constrained`); without it the rows decode exactly as before.
    """
    if samples is not None:
        row_prompts = [k for k, n in enumerate(samples) for _ in range(n)]
    if row_prompts is None:
        raise ValueError("give samples or row_prompts")
    if row_seeds is not None and len(row_seeds) != len(row_prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(row_prompts)} rows")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stops and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    if not row_prompts or max_new_tokens <= 0:
        return [[] for _ in row_prompts]
    if row_seeds is None:  # the call's seed is drawn only now, as before any row existed to need it
        seed = call_seed(seed)
        keys = ([(k, j) for k, n in enumerate(samples) for j in range(n)] if samples is not None
                else [(k, r) for r, k in enumerate(row_prompts)])
        row_seeds = [row_seed(seed, k, j) for k, j in keys]
    greedy = greedy or temperature <= 0
    engine = make_engine or engine_for(model, settings)
    device = model_device(model)
    # The llama engine folds adapters in itself; through the model's own forward, fold them
    # for the call (one matmul per layer instead of three, the same tokens) unless disabled.
    merge = engine is HFEngine and isinstance(model, PeftModel) and any(
        isinstance(m, LoraLinear) and not m.disable_adapters and not m.merged for m in model.modules()
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), lora_merged(model) if merge else nullcontext():
            uniforms = None if greedy else _uniforms(row_seeds, max_new_tokens)  # (B, T) float64
            return _decode_loop(
                engine(model, settings, max(len(p) for p in prompts) + max_new_tokens, pad_token_id),
                [list(p) for p in prompts],
                torch.tensor(list(row_prompts), device=device),
                uniforms,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos_token_ids=set(int(t) for t in eos_token_ids),
                stop_check=_StopCheck(tokenizer, list(stops)) if stops else None,
                compact_fraction=settings.compact_fraction,
                token_filter=token_filter,
            )
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# the loop


def _decode_loop(
    engine: Engine,
    prompts: list[list[int]],
    row_prompts: Tensor,
    uniforms: Tensor | None,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: set[int],
    stop_check: _StopCheck | None,
    compact_fraction: float,
    token_filter: TokenFilter | None = None,
) -> list[list[int]]:
    rows = row_prompts.shape[0]
    generated: list[list[int]] = [[] for _ in range(rows)]
    logits = engine.prefill(prompts, row_prompts)  # (B, V) fp32, the first token's
    alive = list(range(rows))  # cache row -> output row
    live = [True] * rows  # per cache row: still decoding
    for t in range(max_new_tokens):
        allowed = None
        if token_filter is not None:  # (B, V): finished rows still in the batch get the empty text's mask
            allowed = token_filter.mask([generated[row] if on else [] for row, on in zip(alive, live)],
                                        logits.shape[-1], logits.device)
        if uniforms is None:
            tokens = (logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))).argmax(-1)  # (B,)
        else:
            tokens = _inverse_cdf(logits, uniforms[alive, t], temperature, allowed=allowed)
        values = tokens.tolist()
        for slot, (row, token) in enumerate(zip(alive, values)):
            if not live[slot]:
                continue
            generated[row].append(token)
            if token in eos_token_ids or (stop_check is not None and stop_check(generated[row])):
                live[slot] = False
        if t == max_new_tokens - 1 or not any(live):
            break
        dead = live.count(False)
        if dead and dead >= compact_fraction * len(alive):
            keep = [k for k, on in enumerate(live) if on]
            engine.select(torch.tensor(keep, device=tokens.device))
            tokens = tokens[keep]
            alive = [alive[k] for k in keep]
            live = [True] * len(alive)
        logits = engine.step(tokens)
    return generated


def _inverse_cdf(logits: Tensor, uniforms: Tensor, temperature: float, block: int = 256,
                 allowed: Tensor | None = None) -> Tensor:
    """One token per row from softmax(logits / temperature), by its row's uniform in [0, 1).

    ``allowed`` (B, V) bool restricts each row to its True tokens: the others get weight 0, so
    the row draws from the softmax renormalised over its allowed tokens.

    Inverse CDF in two levels, so no float64 cumsum runs over the whole vocabulary: the
    uniform picks a block of ``block`` tokens by the blocks' float64 sums, then a token inside
    it. exp(z - max) is the softmax up to its normaliser, so the uniform is scaled by the row's
    total instead of dividing. Exponents are clamped at -80 (e^-80 ~ 2e-35, still a normal
    float): below that exp() makes denormals, which cost this CPU 4x on the whole pass, for
    tokens that together hold < 1e-30 of the mass.
    """
    z = logits if temperature == 1.0 else logits / temperature  # (B, V) fp32
    if allowed is not None:  # the maximum over the allowed tokens only, so their weights keep their ratios
        z = z.masked_fill(~allowed, float("-inf"))
    rows, vocab = z.shape
    weights = (z - z.amax(-1, keepdim=True)).clamp_(min=-80.0).exp_()  # (B, V) in (0, 1]
    if allowed is not None:
        weights.masked_fill_(~allowed, 0.0)  # the clamp left e^-80 on masked tokens
    if vocab % block:
        weights = nn.functional.pad(weights, (0, block - vocab % block))  # zero weight: never drawn
    blocks = weights.view(rows, -1, block)  # (B, V/block, block)
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum_(-1)  # (B, V/block)
    target = (uniforms.to(z.device) * block_cdf[:, -1]).unsqueeze(1)  # (B, 1)
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[1] - 1)  # (B, 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), torch.zeros_like(target))
    inner_cdf = blocks[torch.arange(rows, device=z.device), chosen[:, 0]].cumsum(-1, dtype=torch.float64)  # (B, block)
    # Round-off between the two sums must not push the remainder past the block's last token.
    remainder = torch.minimum(target - before, inner_cdf[:, -1:] * (1 - 2**-40))
    inner = torch.searchsorted(inner_cdf, remainder, right=True).clamp_(max=block - 1)  # (B, 1)
    return (chosen * block + inner).squeeze(1)


class _StopCheck:
    """Whether a row's generated text now contains a stop string (decodes only a tail window)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stops: list[str]) -> None:
        assert tokenizer is not None
        self.tokenizer = tokenizer
        self.stops = stops
        # A stop string of L bytes spans at most L tokens: the window holds any just completed.
        self.window = max(len(s.encode()) for s in stops) + 1

    def __call__(self, generated: list[int]) -> bool:
        tail = self.tokenizer.decode(generated[-self.window :], skip_special_tokens=True)
        return any(stop in tail for stop in self.stops)


# ---------------------------------------------------------------------------------------------
# randomness: one stream per row


def _uniforms(row_seeds: Sequence[int], steps: int) -> Tensor:
    """(B, T) float64 uniforms; row b's come from its own generator, seeded ``row_seeds[b]``."""
    table = torch.empty(len(row_seeds), steps, dtype=torch.float64)
    generator = torch.Generator()
    for b, seed in enumerate(row_seeds):
        generator.manual_seed(seed)
        table[b] = torch.rand(steps, generator=generator, dtype=torch.float64)
    return table

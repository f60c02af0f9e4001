"""Many LoRA adapters over one frozen base model, each batch row with its own: the g x r runs of a step at once.

    bank = MultiLora(policy, runs=4)          # 4 copies of the policy's current adapters
    rollouts = sample_runs(policy, bank, prompts_per_run, num_samples=8, seeds=seeds)   # bank detached
    with bank.attached():                     # peft's layers swapped for multi-adapter ones
        logprobs, mask = run_logprobs(policy, bank, prompt_ids, completion_ids, runs=row_runs)
    bank.state_of(2)                          # run 2's adapters, named as state_dict_trainable

The student runs of a SOAR step share the frozen base and differ only in their adapters and
data. :class:`MultiLoraLinear` wraps one target linear layer with one (A, B) pair per run, each
its own leaf tensor shaped as peft's (A: (r, in), B: (out, r)), and computes
``base(x) + scale * B_k A_k x`` on the rows of run k. Rows of one run are contiguous (run-major),
so that is one pair of small GEMMs per run and layer on a slice, and autograd gives each adapter
exactly the gradient of its own rows. (peft's mixed-adapter batches, ``adapter_names=``, are
inference-only; this trains every adapter.) Separate leaves let each run keep its own optimizer:
its own clipping norm, skipped steps and Adam step count.

Sampling (:func:`sample_runs`) is ``LMPolicy.sample`` of every run in one `decode_rows` batch:
:class:`RunEngine` is the ``"llama"`` engine over the base weights with each run's delta applied
to its rows (the prefix of the prompts runs once per run, since adapters change its K/V), and a
row keeps the random stream of its run's own call (seed, prompt, sample), so every run gets the
tokens it would get alone, up to float round-off in the logits (greedy: the argmax).

GPU mapping. Sampling: one vLLM engine over the base weights (``enable_lora=True``,
``max_loras`` >= runs), one ``LoRARequest`` per run (``bank.state_of(k)`` written as a peft
adapter folder, as `VLLMSampler` does for one adapter), each run's prompts submitted with its
request and its own ``SamplingParams(seed=...)``; vLLM's punica kernels then do what
:class:`RunEngine` does here. Update: :class:`MultiLoraLinear` as it is (one base GEMM for all
runs, per-run slices for the deltas); for many runs a segmented (SGMV) kernel would replace the
per-run slice loop. The KL reference pass is shared by all runs (they start from one baseline).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from soar_env.models.decode_engines import FastDecodeSettings, LlamaEngine, _Linear, engine_for
from soar_env.models.decoding import SampleOptions, left_pad, positions, trim_completion
from soar_env.models.decoding import call_seed, row_seed
from soar_env.models.fast_decode import decode_rows
from soar_env.models.policy import LMPolicy
from soar_env.models.rollout import Completion, Rollout
from soar_env.models.scoring import picked_logprobs


def row_segments(runs: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal stretches of equal run index: [(run, start, stop)], in row order."""
    segments: list[tuple[int, int, int]] = []
    for row, run in enumerate(runs):
        if segments and segments[-1][0] == run and segments[-1][2] == row:
            segments[-1] = (run, segments[-1][1], row + 1)
        else:
            segments.append((int(run), row, row + 1))
    return segments


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus one LoRA pair per run; rows pick theirs through ``bank.segments``."""

    def __init__(self, base: nn.Linear, weight_a: Tensor, weight_b: Tensor, scale: float, runs: int,
                 bank: MultiLora) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.bank = bank
        self.lora_A = nn.ParameterList([nn.Parameter(weight_a.detach().clone()) for _ in range(runs)])  # (r, in)
        self.lora_B = nn.ParameterList([nn.Parameter(weight_b.detach().clone()) for _ in range(runs)])  # (out, r)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # (N, ..., out): the shared frozen weights, one GEMM for every run
        segments = self.bank.segments
        if segments is None:
            raise RuntimeError("MultiLora: set the rows' runs (bank.rows(...)) before a forward")
        if segments[-1][2] != x.shape[0]:
            raise RuntimeError(f"MultiLora: rows were set for {segments[-1][2]} rows, the batch has {x.shape[0]}")
        pieces = []
        for run, start, stop in segments:
            a, b = self.lora_A[run], self.lora_B[run]
            # peft's order: B(A(x)) * scale, the input cast to the adapters' dtype.
            pieces.append(nn.functional.linear(nn.functional.linear(x[start:stop].to(a.dtype), a), b) * self.scale)
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
        return out + delta.to(out.dtype)


def _adapter_name(module: LoraLinear) -> str:
    active = module.active_adapter
    return active if isinstance(active, str) else active[0]


class MultiLora:
    """R copies of a peft policy's LoRA adapters, swapped in place of peft's layers while attached.

    The base weights are shared, never copied. Every copy starts from the adapters the policy
    holds when the bank is built; :meth:`load_state` puts another state into one copy. Needs
    LoRA on linear layers only, adapter dropout 0 and no DoRA (the defaults).
    """

    def __init__(self, policy: LMPolicy, runs: int) -> None:
        if policy.lora is None:
            raise ValueError("MultiLora needs a LoRA policy")
        if policy.lora.dropout:
            raise ValueError("MultiLora supports adapter dropout 0 only")
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        self.policy = policy
        self.runs = runs
        self.segments: list[tuple[int, int, int]] | None = None
        """(run, start, stop) row stretches of the next forward, set by :meth:`rows`."""
        self.layers: dict[str, MultiLoraLinear] = {}
        """Module name in ``policy.model`` -> its multi-adapter layer."""
        self._by_module: dict[int, MultiLoraLinear] = {}  # id(peft layer) -> its multi-adapter layer
        self._slots: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, peft layer)
        self._names: dict[str, tuple[str, str]] = {}  # state key -> (module name, "A" | "B")
        modules = dict(policy.model.named_modules())
        for name, module in modules.items():
            if not isinstance(module, LoraLinear):
                continue
            adapter = _adapter_name(module)
            if not isinstance(module.lora_A[adapter], nn.Linear) or module.use_dora.get(adapter, False):
                raise ValueError(f"MultiLora supports plain LoRA on linear layers; {name} is not one")
            layer = MultiLoraLinear(module.get_base_layer(), module.lora_A[adapter].weight,
                                    module.lora_B[adapter].weight, float(module.scaling[adapter]), runs, self)
            parent_name, _, attribute = name.rpartition(".")
            self.layers[name] = layer
            self._by_module[id(module)] = layer
            self._slots.append((modules[parent_name], attribute, module))
            for ab in ("A", "B"):
                self._names[f"{name}.lora_{ab}.{adapter}.weight"] = (name, ab)
        trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
        if trainable != set(self._names):
            raise ValueError(f"MultiLora covers only LoRA A/B weights; the policy also trains "
                             f"{sorted(trainable - set(self._names))[:3]}")

    @contextmanager
    def attached(self) -> Iterator[MultiLora]:
        """Swap peft's LoRA layers for the multi-adapter ones for the block; peft's come back after."""
        try:
            for (parent, attribute, _), layer in zip(self._slots, self.layers.values()):
                setattr(parent, attribute, layer)
            yield self
        finally:
            for parent, attribute, original in self._slots:
                setattr(parent, attribute, original)
            self.segments = None

    def rows(self, runs: Sequence[int]) -> None:
        """The run each row of the next forward(s) belongs to (run-major keeps it one GEMM pair per run)."""
        if not len(runs):
            raise ValueError("no rows")
        if min(runs) < 0 or max(runs) >= self.runs:
            raise ValueError(f"run indices must lie in 0..{self.runs - 1}")
        self.segments = row_segments([int(r) for r in runs])

    def layer_for(self, module: nn.Module) -> MultiLoraLinear | None:
        """The multi-adapter layer standing for one of the policy's peft layers (None: not adapted)."""
        return self._by_module.get(id(module))

    def holds_policy_adapters(self, run: int) -> bool:
        """Whether run ``run``'s adapters equal the policy's own (peft's), bit for bit; call detached."""
        own = dict(self.policy.model.named_parameters())
        return all(torch.equal(own[key], p) for key, p in zip(self._names, self.parameters_of(run)))

    def parameters_of(self, run: int) -> list[nn.Parameter]:
        """Run ``run``'s adapter tensors, in ``state_of`` order: what its optimizer updates."""
        return [getattr(self.layers[name], f"lora_{ab}")[run] for name, ab in self._names.values()]

    def state_of(self, run: int) -> dict[str, Tensor]:
        """CPU copies of run ``run``'s adapters, keyed like ``policy.state_dict_trainable()``."""
        return {key: p.detach().to("cpu", copy=True) for key, p in zip(self._names, self.parameters_of(run))}

    def load_state(self, run: int, state: dict[str, Tensor]) -> None:
        """Copy a ``state_dict_trainable``-shaped state into run ``run``'s adapters."""
        if set(state) != set(self._names):
            raise KeyError("state does not match this bank's adapters")
        with torch.no_grad():
            for key, parameter in zip(self._names, self.parameters_of(run)):
                parameter.copy_(state[key])


# ------------------------------------------------------------------------------------------------
# log-probs: LMPolicy._logprobs with prompts shared only within a run


def run_logprobs(policy: LMPolicy, bank: MultiLora, prompt_ids: Sequence[Sequence[int]],
                 completion_ids: Sequence[Sequence[int]], runs: Sequence[int], *,
                 temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(B, T) log-probs and mask of each row under its run's adapters (bank attached), with grads.

    ``LMPolicy.token_logprobs``'s computation (one prefill per distinct prompt, output head only
    on completion tokens, the policy's compute dtype), except that a prompt is shared only by rows
    of one run: runs with the same problem have different adapters, hence different prompt states.
    """
    device = policy.device
    rows = len(completion_ids)
    width = max((len(c) for c in completion_ids), default=0)
    token_mask = torch.zeros(rows, width, dtype=torch.bool, device=device)  # (B, T)
    for i, completion in enumerate(completion_ids):
        token_mask[i, : len(completion)] = True
    if rows == 0 or width == 0:
        return torch.zeros(rows, width, device=device), token_mask
    base = policy._base_model()
    decoder = policy.decoder()
    pad = policy.tokenizer.pad_token_id
    with policy._autocast():
        # 1. One forward per distinct (run, prompt); run-major rows give run-major groups.
        groups: dict[tuple[int, tuple[int, ...]], int] = {}
        row_group = [groups.setdefault((int(k), tuple(p)), len(groups)) for k, p in zip(runs, prompt_ids)]
        prompt_tensor, prompt_mask = left_pad([list(p) for _, p in groups], pad, device)  # (U, P)
        cache = policy.new_cache()
        bank.rows([k for k, _ in groups])
        prompt_hidden = decoder(input_ids=prompt_tensor, attention_mask=prompt_mask,
                                position_ids=positions(prompt_mask), use_cache=True,
                                **{policy.cache_kwarg: cache}).last_hidden_state[:, -1]  # (U, H)
        index = torch.tensor(row_group, device=device)  # (B,)
        if len(groups) != rows:
            cache.batch_select_indices(index)
        # 2. The completions, right-padded, after their prompts, each row with its run's adapters.
        tokens = torch.full((rows, width), pad, device=device)
        for i, completion in enumerate(completion_ids):
            tokens[i, : len(completion)] = torch.tensor(list(completion), device=device)
        prompt_lengths = prompt_mask.sum(1)[index]  # (B,)
        bank.rows(runs)
        hidden = decoder(input_ids=tokens, attention_mask=torch.cat([prompt_mask[index], token_mask.long()], 1),
                         position_ids=prompt_lengths[:, None] + torch.arange(width, device=device),
                         use_cache=True, **{policy.cache_kwarg: cache}).last_hidden_state  # (B, T, H)
        predictors = torch.cat([prompt_hidden[index, None], hidden[:, :-1]], 1)  # (B, T, H)
        logits = base.get_output_embeddings()(predictors[token_mask])  # (N, V)
    with torch.autocast(device.type, enabled=False):
        softcap = getattr(base.config, "final_logit_softcapping", None)
        return picked_logprobs(logits.float(), tokens, token_mask, temperature=temperature, softcap=softcap), token_mask


# ------------------------------------------------------------------------------------------------
# sampling: the llama engine with each row's run's adapters


class _RunLinear:
    """A fused `_Linear` of the base weights plus each run's LoRA delta on its rows (fp32 delta).

    The delta is the one ``_write_weight`` would fold in: for source module i (out rows
    ``s_i``), ``out_scale_i * scale_i * B_i A_i (in_scale * x)``; A's of the sources are stacked
    into one shrink GEMM, each B expands into its own output columns.
    """

    def __init__(self, base: _Linear, bank: MultiLora, runs: Sequence[int], engine: RunEngine) -> None:
        assert base.sources is not None
        modules, in_scale, out_scales = base.sources
        layers = [bank.layer_for(m) for m in modules]
        if any(layer is None for layer in layers):
            raise ValueError("RunEngine: every fused projection needs an adapter in the bank")
        self.base, self.engine = base, engine
        self.down: list[Tensor] = []  # per run: (in, sum r_i)
        self.up: list[list[Tensor]] = []  # per run, per source: (r_i, s_i)
        self.blocks: list[tuple[int, int, int, int]] = []  # per source: out columns lo:hi, rank columns lo:hi
        out, rank = 0, 0
        for layer in layers:
            assert layer is not None
            r, s = layer.lora_A[0].shape[0], layer.lora_B[0].shape[0]
            self.blocks.append((out, out + s, rank, rank + r))
            out, rank = out + s, rank + r
        with torch.no_grad():
            for run in runs:
                downs = [layer.lora_A[run].float() for layer in layers]  # (r, in) each
                down = torch.cat(downs, 0) if in_scale is None else torch.cat(downs, 0) * in_scale
                self.down.append(down.t().contiguous())
                self.up.append([(layer.lora_B[run].float() * (layer.scale * scale)).t().contiguous()
                                for layer, scale in zip(layers, out_scales)])

    def __call__(self, x: Tensor) -> Tensor:
        y = self.base(x)
        out = y if y.dtype == torch.float32 else y.float()
        flat_out = out.view(x.shape[0], -1, out.shape[-1])  # (rows, tokens, out)
        flat_x = x.reshape(x.shape[0], -1, x.shape[-1])
        for group, start, stop in self.engine.segments:
            h = flat_x[start:stop].float() @ self.down[group]  # (n, tokens, sum r)
            target = flat_out[start:stop]
            for (lo, hi, r_lo, r_hi), up in zip(self.blocks, self.up[group]):
                target[..., lo:hi] += h[..., r_lo:r_hi] @ up
        return out if out is y else out.to(y.dtype)


class RunEngine(LlamaEngine):
    """The ``"llama"`` decode engine over the base weights, each row with its run's adapters.

    ``runs[g]`` is the bank run of group g; ``prompt_groups`` the group of each prompt. Built by
    `decode_rows` through ``make_engine`` while the bank is detached (peft's layers in place):
    the base weights are read with the adapters switched off.
    """

    def __init__(self, model: nn.Module, settings: FastDecodeSettings, columns: int, pad_token_id: int, *,
                 bank: MultiLora, runs: Sequence[int], prompt_groups: Sequence[int]) -> None:
        with model.disable_adapter():  # type: ignore[operator]
            super().__init__(model, settings, columns, pad_token_id)
        self.prompt_groups = list(prompt_groups)
        self.segments: list[tuple[int, int, int]] = []
        for layer in self.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(layer, name, _RunLinear(getattr(layer, name), bank, runs, self))

    def _use_rows(self, groups: Tensor) -> None:
        self.segments = row_segments(groups.tolist())


def can_sample_runs(policy: LMPolicy) -> str | None:
    """None when `sample_runs` can decode this policy's runs together, else why not."""
    if policy.lora is None:
        return "full fine-tuning (lora=False): runs differ in every weight"
    if policy.sampler is not None:
        return f"sampling runs on {type(policy.sampler).__name__}"
    if policy.fast_decode is None:
        return "the generate sampler (fast_decode=None)"
    if engine_for(policy.model, policy.fast_decode) is not LlamaEngine:
        return f"the llama decode engine does not support {type(policy._base_model()).__name__}"
    return None


def sample_runs(policy: LMPolicy, bank: MultiLora, prompts: Sequence[Sequence[str]], *, num_samples: int = 1,
                temperature: float = 1.0, max_new_tokens: int = 256, stop: Sequence[str] | None = None,
                greedy: bool = False, seeds: Sequence[int | None], rows_per_batch: int = 128) -> list[Rollout]:
    """``policy.sample(prompts[k], ..., seed=seeds[k])`` with bank run k's adapters, for every k at once.

    Returns one prompt-major :class:`Rollout` per run (empty for no prompts). Rows of all runs,
    run-major, are decoded in batches of ``rows_per_batch`` (memory: the KV cache grows with it).
    Call with the bank detached.
    """
    if len(prompts) != len(seeds) or len(prompts) > bank.runs:
        raise ValueError(f"{len(prompts)} prompt lists, {len(seeds)} seeds, {bank.runs} adapters")
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    reason = can_sample_runs(policy)
    if reason is not None:
        raise ValueError(f"sample_runs cannot batch this policy: {reason}")
    assert policy.fast_decode is not None
    options = SampleOptions(num_samples, temperature, max_new_tokens, stop, greedy, None, rows_per_batch)
    draws, stops = options.draws, options.stops
    encoded = [[policy.encode(p) for p in run_prompts] for run_prompts in prompts]
    # A seed of None draws from the global RNG, as a sequential call does.
    run_seeds = [call_seed(s) for s in seeds]
    rows = []  # (run, prompt, sample), each run's prompts in order of length as `sample_rollout` takes them
    for k, run_prompts in enumerate(encoded):
        order = sorted(range(len(run_prompts)), key=lambda i, e=run_prompts: len(e[i]))
        rows.extend((k, i, j) for i in order for j in range(draws))
    per_prompt: list[list[list[Completion]]] = [[[] for _ in e] for e in encoded]
    pad = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), rows_per_batch):
        batch = rows[start : start + rows_per_batch]
        slots = list(dict.fromkeys((k, i) for k, i, _ in batch))  # distinct (run, prompt), run-major
        runs = list(dict.fromkeys(k for k, _ in slots))
        slot = {s: n for n, s in enumerate(slots)}
        # Each row draws the stream it draws in its own run's call (`sample_rollout`).
        generated = decode_rows(
            policy.model, [encoded[k][i] for k, i in slots], row_prompts=[slot[(k, i)] for k, i, _ in batch],
            row_seeds=[row_seed(run_seeds[k], i, j) for k, i, j in batch], max_new_tokens=max_new_tokens,
            temperature=temperature, greedy=options.decodes_greedily, eos_token_ids=policy.eos_token_ids,
            tokenizer=policy.tokenizer, stops=stops, pad_token_id=pad, settings=policy.fast_decode,
            make_engine=partial(RunEngine, bank=bank, runs=runs, prompt_groups=[runs.index(k) for k, _ in slots]),
        )
        for (k, i, _), ids in zip(batch, generated):
            per_prompt[k][i].append(trim_completion(policy.tokenizer, policy.eos_token_ids, ids, stops))
    copies = num_samples if options.decodes_greedily else 1
    return [Rollout.from_completions(e, p, copies=copies) for e, p in zip(encoded, per_prompt)]


__all__ = ["MultiLora", "MultiLoraLinear", "RunEngine", "can_sample_runs", "row_segments",
           "run_logprobs", "sample_runs"]

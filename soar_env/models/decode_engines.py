"""The forward passes behind `soar_env.models.fast_decode`: its settings and its two engines.

``LlamaEngine`` is a hand-written forward of Llama-family decoders over the model's own
weights (LoRA folded in, norms and scalings folded into the next matrix, q/k/v and gate/up
fused, weights prepacked for oneDNN, a pre-allocated KV cache); ``HFEngine`` runs any other
causal LM through its own ``forward`` with the same loop around it. Kept apart from the loop
so that each file reads in one sitting.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from soar_env.models.decoding import left_pad, positions
from soar_env.models.precision import resolve_compute_dtype

EngineName = Literal["auto", "llama", "hf"]
DType = Literal["float32", "bfloat16", "auto"]

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
"""``config.model_type`` values whose decoder layers the ``"llama"`` engine reimplements."""


@dataclass(frozen=True)
class FastDecodeSettings:
    """How :func:`decode_rows` runs (``benchmarks/sampler_speed.py`` measures the choices)."""

    engine: EngineName = "auto"
    """``"llama"``: the hand-written Llama-family forward; ``"hf"``: the model's own ``forward``;
    ``"auto"``: ``"llama"`` when the model is one it supports, else ``"hf"``."""
    dtype: DType = "float32"
    """Compute dtype of the ``"llama"`` engine. ``"bfloat16"`` rounds this sampler's copy of the
    weights (the update keeps fp32); ``"auto"`` is bfloat16 where the CPU has native bf16 matmul
    (AVX512-BF16 / AMX), float32 elsewhere. Measured on SmolLM2 (4 x 8 x 48 tokens, one AVX512-BF16
    thread): bf16 1.75x fp32's tokens/s. `LMPolicy` sets it from its ``compute_dtype``."""
    compact_fraction: float = 0.125
    """Drop finished rows from the batch and cache once they are at least this fraction of the
    rows decoded (a compaction copies the live cache, about one step's attention reads)."""
    prepack: bool = True
    """Reorder the ``"llama"`` engine's weights once per decode batch into oneDNN's blocked layout (CPU
    builds with mkldnn): 1.4-2x the GEMM rate at decode batch sizes on AVX512 CPUs."""



def supports_llama_engine(model: nn.Module) -> bool:
    """Whether the hand-written ``"llama"`` engine reproduces ``model`` (else ``"hf"`` is used)."""
    base = base_model(model)
    config = base.config
    if config.model_type not in LLAMA_FAMILY or getattr(config, "pretraining_tp", 1) not in (None, 1):
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None) is not None:
        return False
    decoder = getattr(base, base.base_model_prefix, None)
    if decoder is None or not isinstance(decoder.embed_tokens, nn.Embedding) or not hasattr(decoder, "rotary_emb"):
        return False
    for module in base.modules():
        if isinstance(module, LoraLinear) and any(module.use_dora.get(a, False) for a in module.active_adapters):
            return False
    layer = decoder.layers[0]
    needed = ("q_proj", "k_proj", "v_proj", "o_proj")
    return all(hasattr(layer.self_attn, n) for n in needed) and all(
        hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")
    )



# ---------------------------------------------------------------------------------------------
# engines



class Engine:
    """One decode batch: ``prefill`` the prompts, then ``step`` one token per row, ``select`` rows."""

    def prefill(self, prompts: list[list[int]], row_prompts: Tensor) -> Tensor:
        """Run the U prompts; return the (B, V) fp32 logits of each row's first new token."""
        raise NotImplementedError

    def step(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def select(self, keep: Tensor) -> None:
        raise NotImplementedError


def engine_for(model: nn.Module, settings: FastDecodeSettings) -> type[Engine]:
    if settings.engine == "hf":
        return HFEngine
    if settings.engine == "llama" or supports_llama_engine(model):
        if settings.engine == "llama" and not supports_llama_engine(model):
            raise ValueError(f"the llama engine does not support {type(base_model(model)).__name__}")
        return LlamaEngine
    return HFEngine


def base_model(model: nn.Module) -> PreTrainedModel:
    return model.get_base_model() if isinstance(model, PeftModel) else model  # type: ignore[return-value]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _write_weight(module: nn.Module, out: Tensor, column_scale: Tensor | None, row_scale: float) -> None:
    """Write a linear layer's effective fp32 weight, times ``row_scale`` and ``column_scale`` (in,), into ``out``.

    A LoRA layer's weight is its base weight plus each active adapter's ``scaling * B A``, as
    peft's ``merge`` computes it; the scales go onto B's rows and A's columns, so the whole is
    two passes over ``out`` (one scaled copy, one ``addmm_``) and no (out, in) delta of its
    own. Under ``lora_merged`` (adapters disabled, the merged weight swapped in) the base
    weight is read as it is.
    """
    lora = isinstance(module, LoraLinear)
    weight = (module.get_base_layer() if lora else module).weight
    scale = row_scale if column_scale is None else column_scale * row_scale  # float or (in,)
    if isinstance(scale, float) and scale == 1.0:
        out.copy_(weight)
    else:
        torch.mul(weight, scale, out=out)
    if not lora or module.disable_adapters or module.merged:
        return
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if module.fan_in_fan_out or not isinstance(module.lora_A[adapter], nn.Linear):
            out.add_(module.get_delta_weight(adapter).float() * scale)
            continue
        up = module.lora_B[adapter].weight.float() * (module.scaling[adapter] * row_scale)  # (out, r)
        down = module.lora_A[adapter].weight.float()  # (r, in)
        out.addmm_(up, down if column_scale is None else down * column_scale)


class _Linear:
    """y = x W^T + b with W prepacked for oneDNN where it can be (CPU with mkldnn).

    On this CPU a prepacked (blocked-layout) weight runs the decode GEMMs (32 rows) at 80-86
    GFLOP/s in fp32 against 40-58 for ``F.linear`` (MKL repacks W on every call, which at 32
    rows costs as much as the product) and 140-167 against 100-118 in bf16.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, prepack: bool) -> None:
        self.dtype = dtype
        self.sources: tuple[list[nn.Module], Tensor | None, list[float]] | None = None
        """(modules, in_scale, out_scales) this weight was fused from (see `_fused`): what a per-row
        adapter needs to apply its delta on the same input (`soar_env.models.multi_lora.RunEngine`)."""
        self.out_features = weight.shape[0]
        weight = weight.to(dtype).contiguous()
        self.bias = None if bias is None else bias.to(dtype)
        self.packed = prepack and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.packed else weight

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        flat = x.reshape(-1, x.shape[-1])
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        else:
            y = nn.functional.linear(flat, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def _fused(
    modules: Sequence[nn.Module], settings: tuple[torch.dtype, bool], *, in_scale: Tensor | None = None,
    out_scales: Sequence[float] = (),
) -> _Linear:
    """Linear layers on the same input as one: weights stacked on the output dimension.

    ``in_scale`` (in,) folds an RMSNorm weight into the columns, ``out_scales`` (one per
    module) scales its rows (the attention scaling folded into q_proj). Built in one fp32
    buffer, so preparing a model writes its weights twice (this buffer, then the packed or
    bf16 copy) plus one pass per LoRA adapter.
    """
    scales = list(out_scales) or [1.0] * len(modules)
    sizes = [int(_base_weight(m).shape[0]) for m in modules]
    first = _base_weight(modules[0])
    weight = torch.empty(sum(sizes), first.shape[1], dtype=torch.float32, device=first.device)  # (out, in)
    for module, rows, scale in zip(modules, weight.split(sizes), scales):
        _write_weight(module, rows, in_scale, scale)
    biases = [_base_bias(m) for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([
            torch.zeros(n, device=first.device) if b is None else b.float() * scale
            for b, n, scale in zip(biases, sizes, scales)
        ])
    linear = _Linear(weight, bias, *settings)
    linear.sources = (list(modules), in_scale, scales)
    return linear


def _base_weight(module: nn.Module) -> Tensor:
    return (module.get_base_layer() if isinstance(module, LoraLinear) else module).weight


def _base_bias(module: nn.Module) -> Tensor | None:
    return (module.get_base_layer() if isinstance(module, LoraLinear) else module).bias


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (x * cos + rotate_half(x) * sin); cos/sin broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Layer:
    qkv: _Linear  # (Hq*D + 2*Hkv*D, hidden), input norm and attention scaling folded in
    o: _Linear  # (hidden, Hq*D)
    gate_up: _Linear  # (2*inter, hidden), post-attention norm folded in
    down: _Linear  # (hidden, inter)
    eps_attn: float
    eps_mlp: float


class LlamaEngine(Engine):
    """Llama-family decoder layers, written out, over a pre-allocated KV cache.

    Shapes: B rows, U distinct prompts, L = longest prompt + max_new_tokens cache columns, Hq
    query heads and Hkv key/value heads of D dims, G = Hq / Hkv. Keys are cached
    transposed, (B, Hkv, D, L), so q K^T reads them as a plain matrix (in bf16 a transposed
    view costs a copy per layer and step, half the attention time). The residual
    stream, norms, rotary and softmaxes run in fp32; GEMMs and the K/V cache in ``dtype``.
    RMSNorm weights are folded into the next GEMM's columns and the attention scaling into
    q_proj's rows (a power of two for D = 64, so exact).

    Rows may belong to groups with different weights (one group per student run in
    `soar_env.models.multi_lora.RunEngine`): ``prompt_groups`` gives each prompt's group, the
    shared prefix then runs once per group, and ``_use_rows`` hears the group of every row
    before each pass (after ``select`` too). One group by default.
    """

    prompt_groups: list[int] | None = None
    """Group (0..P-1) of each prompt of the next prefill; None: all in group 0."""

    def __init__(self, model: nn.Module, settings: FastDecodeSettings, columns: int, pad_token_id: int) -> None:
        base = base_model(model)
        decoder = getattr(base, base.base_model_prefix)
        config = base.config
        self.dtype = resolve_compute_dtype(settings.dtype, model_device(model))
        linear = (self.dtype, settings.prepack)
        self.columns = columns
        self.pad_token = pad_token_id
        attention = decoder.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.q_heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        scaling = float(attention.scaling)
        self.act = decoder.layers[0].mlp.act_fn
        self.rotary = decoder.rotary_emb
        self.embed = decoder.embed_tokens.weight  # (V, hidden), looked up in its own dtype
        self.norm_eps = float(decoder.norm.variance_epsilon)
        self.head = _fused([base.get_output_embeddings()], linear, in_scale=decoder.norm.weight.float())
        self.layers = []
        for layer in decoder.layers:
            a, m = layer.self_attn, layer.mlp
            norm_attn, norm_mlp = layer.input_layernorm, layer.post_attention_layernorm
            self.layers.append(_Layer(
                qkv=_fused([a.q_proj, a.k_proj, a.v_proj], linear, in_scale=norm_attn.weight.float(),
                           out_scales=(scaling, 1.0, 1.0)),
                o=_fused([a.o_proj], linear),
                gate_up=_fused([m.gate_proj, m.up_proj], linear, in_scale=norm_mlp.weight.float()),
                down=_fused([m.down_proj], linear),
                eps_attn=float(norm_attn.variance_epsilon),
                eps_mlp=float(norm_mlp.variance_epsilon),
            ))
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def _rope(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, T, D) fp32 cos and sin from the model's own rotary module (any rope scaling)."""
        return self.rotary(self.embed.new_empty(0, dtype=torch.float32), position_ids)

    def _norm(self, x: Tensor, eps: float) -> Tensor:
        return nn.functional.rms_norm(x, x.shape[-1:], None, eps)  # weight folded into the next GEMM

    def _mlp(self, x: Tensor, layer: _Layer) -> Tensor:
        gate, up = layer.gate_up(self._norm(x, layer.eps_mlp)).chunk(2, -1)
        return layer.down(self.act(gate) * up).float()

    def prefill(self, prompts: list[list[int]], row_prompts: Tensor) -> Tensor:
        """Prefix once, suffixes per prompt: the cache columns of a row are [prefix | padding | suffix].

        Prompts of one call share their chat template and instructions (49 of 62 tokens for
        the student prompt), so the longest common prefix runs once, as one sequence, and only
        the U suffixes run per prompt, left-padded to the longest suffix S. Padding in the
        middle of a row is as good as on its left: keys are masked, positions count real tokens.
        """
        U, device = len(prompts), row_prompts.device
        B, L, D, Hkv = row_prompts.shape[0], self.columns, self.head_dim, self.kv_heads
        groups = torch.tensor(self.prompt_groups or [0] * U, device=device)  # (U,)
        P = int(groups.max()) + 1
        shared = len(os.path.commonprefix(prompts)) if U > 1 else 0
        shared = min(shared, min(len(p) for p in prompts) - 1)  # every prompt keeps a token to run
        prefix_kv: list[tuple[Tensor, Tensor]] = []
        if shared > 0:
            ids = torch.tensor([prompts[0][:shared]] * P, device=device)  # (P, shared): once per group
            allowed = torch.ones(shared, shared, dtype=torch.bool, device=device).tril()[None]  # (1, shared, shared)
            each_group = torch.arange(P, device=device)
            self._use_rows(each_group)
            _, prefix_kv = self._prefill_pass(ids, torch.arange(shared, device=device)[None].expand(P, -1),
                                              allowed, [], each_group)
        ids, mask = left_pad([p[shared:] for p in prompts], self.pad_token, device)  # (U, S)
        S = ids.shape[1]
        # Suffix queries see the whole prefix, and the suffix causally without its padding; a
        # padding query also sees itself, so its (unused) row is no NaN.
        causal = torch.ones(S, S, dtype=torch.bool, device=device).tril() & mask.bool()[:, None, :]
        causal |= torch.eye(S, dtype=torch.bool, device=device)
        allowed = torch.cat([causal.new_ones(U, S, shared), causal], -1)  # (U, S, shared + S)
        self._use_rows(groups)
        x, suffix_kv = self._prefill_pass(ids, shared + positions(mask), allowed, prefix_kv, groups)
        row_groups = groups[row_prompts]  # (B,)
        self.keys, self.values = [], []
        for layer_kv, (k, v) in zip(prefix_kv or [None] * len(suffix_kv), suffix_kv):
            keys = torch.empty(B, Hkv, D, L, dtype=self.dtype, device=device)  # transposed, see the class
            values = torch.empty(B, Hkv, L, D, dtype=self.dtype, device=device)
            if layer_kv is not None:
                keys[..., :shared] = layer_kv[0][row_groups].transpose(-1, -2)  # its group's (Hkv, D, shared)
                values[:, :, :shared] = layer_kv[1][row_groups]
            keys[..., shared : shared + S] = k[row_prompts].transpose(-1, -2)
            values[:, :, shared : shared + S] = v[row_prompts]
            self.keys.append(keys)
            self.values.append(values)
        # Attention bias over cache columns: -inf on padding, 0 on real and generated ones.
        self.bias = torch.zeros(B, 1, L, dtype=self.dtype, device=device)
        self.bias[:, 0, shared : shared + S].masked_fill_(~mask.bool()[row_prompts], float("-inf"))
        self.position = torch.tensor([len(prompts[u]) for u in row_prompts.tolist()], device=device)  # (B,)
        self.column = shared + S  # the next token's cache column
        self.row_groups = row_groups
        self._use_rows(row_groups)
        return self.head(self._norm(x, self.norm_eps)).float()[row_prompts]

    def _use_rows(self, groups: Tensor) -> None:
        """The group of each row of the passes that follow; weights shared by all groups ignore it."""

    def _prefill_pass(
        self, ids: Tensor, position_ids: Tensor, allowed: Tensor, past: list[tuple[Tensor, Tensor]], groups: Tensor
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Run (U, T) tokens through every layer after ``past`` (per layer (P, Hkv, T0, D) K and V of
        each group; row u reads its group's, ``groups[u]``).

        ``allowed`` (U, T, T0 + T) says which keys each query sees. Returns the last position's
        hidden state (U, hidden) and each layer's new (U, Hkv, T, D) K and V, in ``dtype``.
        Attention runs in fp32 (the scaling is already in q).
        """
        U, T = ids.shape
        D, Hq, Hkv = self.head_dim, self.q_heads, self.kv_heads
        cos, sin = self._rope(position_ids)  # (U, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (U, 1, T, D)
        x = self.embed[ids].float()  # (U, T, hidden) fp32 residual stream
        new_kv = []
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(x, layer.eps_attn)).float()  # (U, T, (Hq + 2Hkv) D)
            qk = _rotate(qkv[..., : (Hq + Hkv) * D].view(U, T, Hq + Hkv, D).transpose(1, 2), cos, sin)
            q, k = qk[:, :Hq], qk[:, Hq:]  # (U, Hq, T, D), (U, Hkv, T, D)
            v = qkv[..., (Hq + Hkv) * D :].view(U, T, Hkv, D).transpose(1, 2)
            k, v = k.to(self.dtype), v.to(self.dtype)
            new_kv.append((k, v))
            if past:
                k = torch.cat([past[i][0][groups], k], 2)  # (U, Hkv, T0 + T, D)
                v = torch.cat([past[i][1][groups], v], 2)
            out = nn.functional.scaled_dot_product_attention(
                q, k.float(), v.float(), attn_mask=allowed.unsqueeze(1), scale=1.0, enable_gqa=True
            )  # (U, Hq, T, D)
            x = x + layer.o(out.transpose(1, 2).reshape(U, T, Hq * D)).float()
            x = x + self._mlp(x, layer)
        return x[:, -1], new_kv

    def step(self, tokens: Tensor) -> Tensor:
        B, D, c = tokens.shape[0], self.head_dim, self.column
        Hq, Hkv, G = self.q_heads, self.kv_heads, self.q_heads // self.kv_heads
        cos, sin = self._rope(self.position[:, None])  # (B, 1, D)
        bias = self.bias[:, :, : c + 1].repeat_interleave(Hkv, 0)  # (B*Hkv, 1, c+1), broadcast over G
        x = self.embed[tokens].float()  # (B, hidden)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            qkv = layer.qkv(self._norm(x, layer.eps_attn)).float()  # (B, (Hq + 2Hkv) D)
            qk = _rotate(qkv[:, : (Hq + Hkv) * D].view(B, Hq + Hkv, D), cos, sin)
            keys[..., c] = qk[:, Hq:]
            values[:, :, c] = qkv[:, (Hq + Hkv) * D :].view(B, Hkv, D)
            # Grouped-query attention as a batched matmul: the G query heads of one K/V head
            # together, no repeated K/V. (B*Hkv, G, D) x (B*Hkv, D, c+1) -> (B*Hkv, G, c+1).
            q = qk[:, :Hq].reshape(B * Hkv, G, D).to(self.dtype)
            scores = torch.baddbmm(bias, q, keys[..., : c + 1].flatten(0, 1))
            weights = torch.softmax(scores, -1, dtype=torch.float32).to(self.dtype)
            out = torch.bmm(weights, values[:, :, : c + 1].flatten(0, 1))  # (B*Hkv, G, D)
            x = x + layer.o(out.view(B, Hq * D)).float()
            x = x + self._mlp(x, layer)
        self.position = self.position + 1
        self.column = c + 1
        return self.head(self._norm(x, self.norm_eps)).float()  # (B, V)

    def select(self, keep: Tensor) -> None:
        c = self.column
        for i, (keys, values) in enumerate(zip(self.keys, self.values)):
            # Only the written columns are worth copying.
            self.keys[i] = keys.new_empty(keep.shape[0], *keys.shape[1:])
            self.keys[i][..., :c] = keys[keep, ..., :c]
            self.values[i] = values.new_empty(keep.shape[0], *values.shape[1:])
            self.values[i][:, :, :c] = values[keep, :, :c]
        self.bias = self.bias[keep]
        self.position = self.position[keep]
        self.row_groups = self.row_groups[keep]
        self._use_rows(self.row_groups)


class HFEngine(Engine):
    """Any causal LM through its own ``forward`` and a ``DynamicCache`` (LoRA as peft runs it)."""

    def __init__(self, model: nn.Module, settings: FastDecodeSettings, columns: int, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        base = base_model(model)
        try:
            self.cache = DynamicCache(config=base.config)
        except TypeError:  # transformers < 4.56 takes no config
            self.cache = DynamicCache()
        # transformers 5 renamed past_key_values to cache.
        self.cache_kwarg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def _forward(self, ids: Tensor, mask: Tensor, position_ids: Tensor) -> Tensor:
        output = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
            logits_to_keep=1, **{self.cache_kwarg: self.cache},
        )
        return output.logits[:, -1].float()  # (rows, V)

    def prefill(self, prompts: list[list[int]], row_prompts: Tensor) -> Tensor:
        ids, mask = left_pad(prompts, self.pad_token_id, row_prompts.device)  # (U, P)
        position_ids = positions(mask)
        logits = self._forward(ids, mask, position_ids)
        self.cache.batch_select_indices(row_prompts)
        self.mask = mask[row_prompts]  # (B, P + generated)
        self.position = position_ids[row_prompts, -1] + 1
        return logits[row_prompts]

    def step(self, tokens: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        logits = self._forward(tokens[:, None], self.mask, self.position[:, None])
        self.position = self.position + 1
        return logits

    def select(self, keep: Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        self.position = self.position[keep]


"""The LM policy: one wrapper that both the student and the teacher are.

SOAR trains two copies of the same LLM with RLOO, and both need the same three things:
sample completions for prompts (the hot path: tens of thousands of rollouts per outer step),
score the sampled tokens with gradients (the policy-gradient term) and without (the KL
reference), and save/restore their trainable weights cheaply (every inner loop starts from
the baseline student again). :class:`LMPolicy` does these for any Hugging Face causal LM.

    >>> from soar_env.models import LMPolicy
    >>> policy = LMPolicy.from_name("tiny")
    >>> rollout = policy.sample([policy.chat_prompt("What is 2 + 3?")], num_samples=2, max_new_tokens=8, seed=0)
    >>> rollout.prompt_index
    [0, 0]

Speed choices, all on by default: prompts are tokenised once; the samples of one prompt share
one prefill of its KV cache; greedy decoding runs once per prompt whatever ``num_samples``;
LoRA adapters are folded into the weights while sampling; log-probs run each distinct prompt
once per call and apply the output head only to completion tokens. On a GPU, ``policy.sampler =
VLLMSampler(policy)`` (extra ``vllm``) hands sampling to vLLM; log-probs and training stay here.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import DynamicCache, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from soar_env.models.constrained import TokenFilter, position_masks
from soar_env.models.decoding import SampleOptions, Sampler, SamplerBase, eos_token_ids, left_pad, positions
from soar_env.models.decoding import trim_completion
from soar_env.models.decode_engines import FastDecodeSettings
from soar_env.models.export import write_pretrained_folder
from soar_env.models.fast_decode import sample_rollout
from soar_env.models.generate import generate_rollout
from soar_env.models.precision import FrozenWeightCasts, resolve_compute_dtype
from soar_env.models.resolve import load_model, prepare_tokenizer
from soar_env.models.rollout import Completion, Rollout
from soar_env.models.scoring import picked_logprobs

LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear projection of a Llama block (also the names in Qwen2, Mistral, SmolLM2)."""

TRAINABLE_FILE = "trainable.pt"
SETTINGS_FILE = "policy.json"


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters instead of full fine-tuning: a small trainable state and a free KL reference."""

    r: int = 16
    """Rank of the adapter matrices A (r x in) and B (out x r)."""
    alpha: int = 32
    """Scale numerator: a layer computes W x + (alpha / r) B A x."""
    dropout: float = 0.0
    """Dropout on the adapter input; 0 keeps sampling and log-probs deterministic."""
    target_modules: tuple[str, ...] = LLAMA_LINEAR_MODULES
    """Names of the linear layers that get adapters."""
    init_seed: int = 0
    """Seed of the adapter initialisation, so equal settings on equal models give equal policies."""

    def peft_config(self) -> LoraConfig:
        """These settings as peft's ``LoraConfig`` (causal LM, no bias adapters)."""
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


class LMPolicy(SamplerBase):
    """A causal LM with its tokenizer, for sampling and for policy-gradient training.

    The policy owns ``model``: it moves it to ``device``, replaces its generation defaults
    (so no checkpoint's top-k/top-p silently biases the RL samples) and, with ``lora``, wraps
    it in peft adapters whose initialisation depends only on ``lora.init_seed``.
    ``lora=None`` trains every weight; the KL reference is then a frozen copy, made when it is
    first used, unless :meth:`set_reference` names one (the student's baseline, say).
    """

    supports_token_filter = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        lora: LoraSettings | None = LoraSettings(),
        device: str | torch.device = "cpu",
        system_prompt: str | None = None,
        name_or_path: str | None = None,
        merge_lora_for_sampling: bool = True,
        compute_dtype: str | torch.dtype = "float32",
    ) -> None:
        if isinstance(model, PeftModel):
            raise ValueError("pass the plain model: LMPolicy adds the LoRA adapters itself")
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.lora = lora
        self.system_prompt = system_prompt
        self.name_or_path = name_or_path
        """The name ``from_name`` loaded, kept so a saved policy can be rebuilt; None otherwise."""
        self.merge_lora_for_sampling = merge_lora_for_sampling
        """``generate`` path: sample with the adapters folded into the weights (the same tokens, ~7% faster on
        the embedded model). The own decode loop (`fast_decode`) always folds them, into its own copy."""
        prepare_tokenizer(model, tokenizer)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        model.generation_config = GenerationConfig(
            bos_token_id=model.generation_config.bos_token_id,
            eos_token_id=self.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.to(self.device)
        if lora is None:
            model.requires_grad_(True)
            self.model: nn.Module = model
        else:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # peft reads a property that transformers 5 deprecated; nothing for users to do.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                torch.manual_seed(lora.init_seed)
                self.model = get_peft_model(model, lora.peft_config())
        self.model.eval()
        # transformers 5 renamed past_key_values to cache.
        decoder_arguments = inspect.signature(getattr(model, model.base_model_prefix).forward).parameters
        self.cache_kwarg = "cache" if "cache" in decoder_arguments else "past_key_values"
        self._reference_model: PreTrainedModel | None = None
        self._reference_state: dict[str, Tensor] | None = None
        """Device tensors that stand in for the trainable ones in reference passes (set_reference)."""
        self._reference_is_base = False
        """The set reference has every lora_B at zero, so it scores exactly as the base model."""
        self.sampler: Sampler | None = None
        """Where :meth:`sample` runs: None is this transformers model; e.g. a ``VLLMSampler``."""
        self.compute_dtype = resolve_compute_dtype(compute_dtype, self.device)
        """Dtype of the matrix products in :meth:`token_logprobs` (forward and backward of the update).
        bfloat16 runs them under ``torch.autocast``: the weights stay as they are (fp32 master
        weights for the optimiser, adapters and full fine-tuning alike), each product rounds its
        inputs to bf16, and the log-softmax runs in fp32."""
        self._frozen_casts = FrozenWeightCasts(self.model, self.compute_dtype)
        self.fast_decode: FastDecodeSettings | None = FastDecodeSettings(
            dtype="bfloat16" if self.compute_dtype == torch.bfloat16 else "float32")
        """This model's sampler: the own decode loop (`soar_env.models.fast_decode`; 1.7x ``generate`` in
        fp32 on the embedded model, 2.9x in bf16), in the compute dtype; None: transformers' ``generate``."""

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        lora: LoraSettings | None = LoraSettings(),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        system_prompt: str | None = None,
        compute_dtype: str | torch.dtype = "float32",
    ) -> LMPolicy:
        """Load ``name`` with :func:`~soar_env.models.resolve.load_model` and wrap it."""
        model, tokenizer = load_model(name, dtype=dtype, device=device)
        return cls(model, tokenizer, lora=lora, device=device, system_prompt=system_prompt, name_or_path=name,
                   compute_dtype=compute_dtype)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "cpu") -> LMPolicy:
        """Rebuild a policy written by :meth:`save` (the base model is loaded by its name again)."""
        settings = json.loads((Path(path) / SETTINGS_FILE).read_text())
        if settings["name_or_path"] is None:
            raise ValueError(f"{path} was saved from a policy built without a name; build it and call load()")
        policy = cls.from_name(
            settings["name_or_path"],
            lora=_lora_from_json(settings["lora"]),
            device=device,
            system_prompt=settings["system_prompt"],
        )
        policy.load(path)
        return policy

    # ----------------------------------------------------------------------------------------
    # prompts and sampling

    def chat_prompt(self, user: str, *, reply_prefix: str = "") -> str:
        """The full prompt text for one user message: chat template, assistant header, prefix.

        ``reply_prefix`` is written as the start of the assistant's reply (the teacher's
        ``<question>`` for small models that rarely follow the format by themselves). Models
        without a chat template get the bare message.
        """
        messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        messages.append({"role": "user", "content": user})
        if self.tokenizer.chat_template is None:
            return f"{user}\n\n{reply_prefix}"
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text) + reply_prefix

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a full prompt text; its special tokens are already in the text."""
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def trim(self, generated: list[int], stops: Sequence[str]) -> Completion:
        """A generated row cut after its first eos or stop string (see :func:`~soar_env.models.decoding.trim_completion`)."""
        return trim_completion(self.tokenizer, self.eos_token_ids, generated, stops)

    def _sample(self, prompts: Sequence[str], options: SampleOptions) -> Rollout:
        """:meth:`sample` on this transformers model, or on :attr:`sampler` when one is set."""
        if self.sampler is not None:
            if options.token_filter is not None:
                raise ValueError(f"token_filter: constrained decoding runs in the transformers samplers, not in "
                                 f"{type(self.sampler).__name__}; set policy.sampler = None for constrained calls")
            return self.sampler.sample(prompts, **options.as_kwargs())
        encoded = [self.encode(prompt) for prompt in prompts]
        if self.fast_decode is not None:  # it seeds, merges adapters and switches to eval mode itself
            return sample_rollout(self.model, self.tokenizer, encoded, options, eos_token_ids=self.eos_token_ids,
                                  settings=self.fast_decode)
        return generate_rollout(self, encoded, options)

    # ----------------------------------------------------------------------------------------
    # log-probs

    def token_logprobs(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        *,
        reference: bool = False,
        temperature: float = 1.0,
        micro_batch_size: int | None = None,
        token_filters: Sequence[TokenFilter | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Log-probability of every completion token given its prompt and the tokens before it.

        Returns ``(logprobs, mask)``, both (B, T) with T the longest completion, right-padded:
        padding has mask False and log-prob 0. The log-probs carry gradients into the trainable
        parameters (unless the caller disabled grad). ``reference=True`` scores with the KL
        reference under ``no_grad``: the tensors given to :meth:`set_reference` in place of the
        trainable ones when there are some; otherwise the same model with its adapters switched
        off (LoRA), or a frozen copy of the weights taken at the first reference call (full
        fine-tuning; see :meth:`reset_reference`). ``micro_batch_size`` bounds the rows run together.
        ``token_filters`` (one per row, None for a free row) scores a row sampled with a token
        filter under the same masks: log softmax over the tokens the filter allowed at each step,
        the distribution the row was drawn from. Without filters nothing changes.
        """
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
        if token_filters is not None and len(token_filters) != len(completion_ids):
            raise ValueError(f"{len(token_filters)} token filters for {len(completion_ids)} completions")
        if token_filters is not None and all(f is None for f in token_filters):
            token_filters = None
        rows = len(completion_ids)
        width = max((len(c) for c in completion_ids), default=0)
        mask = torch.zeros(rows, width, dtype=torch.bool, device=self.device)  # (B, T)
        for i, completion in enumerate(completion_ids):
            mask[i, : len(completion)] = True
        if rows == 0 or width == 0:
            return torch.zeros(rows, width, device=self.device), mask
        step = micro_batch_size or rows
        overrides: dict[int, Tensor] | None = None
        if reference and self._reference_state is not None and not self._reference_is_base:
            context, base = nullcontext(), self._base_model()
            overrides = {id(p): self._reference_state[n] for n, p in self.model.named_parameters()
                         if n in self._reference_state}
        elif reference and self.lora is not None:
            context, base = self.model.disable_adapter(), self._base_model()
        elif reference:
            context, base = nullcontext(), self._frozen_reference()
        else:
            context, base = nullcontext(), self._base_model()
        chunks = []
        with context, (torch.no_grad() if reference else nullcontext()), self._autocast(), \
                self._frozen_casts.in_place():
            for start in range(0, rows, step):
                chunk = self._logprobs(
                    base, prompt_ids[start : start + step], completion_ids[start : start + step], temperature,
                    overrides, None if token_filters is None else token_filters[start : start + step],
                )
                chunks.append(nn.functional.pad(chunk, (0, width - chunk.shape[1])))
        return torch.cat(chunks, 0), mask

    def _logprobs(
        self,
        base: PreTrainedModel,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        temperature: float,
        overrides: dict[int, Tensor] | None = None,
        token_filters: Sequence[TokenFilter | None] | None = None,
    ) -> Tensor:
        """(B, T) log-probs for one micro-batch (see :meth:`token_logprobs`).

        ``overrides`` maps ``id(parameter)`` to the tensor used in its place (the KL reference).
        """
        decoder = getattr(base, base.base_model_prefix)
        # 1. One forward per distinct prompt; its rows attend to it through a shared KV cache.
        groups: dict[tuple[int, ...], int] = {}
        row_group = [groups.setdefault(tuple(p), len(groups)) for p in prompt_ids]
        prompt_tensor, prompt_mask = left_pad([list(p) for p in groups], self.tokenizer.pad_token_id, self.device)
        cache = self.new_cache()
        prompt_hidden = _call_with(
            decoder, overrides, input_ids=prompt_tensor, attention_mask=prompt_mask,
            position_ids=positions(prompt_mask), use_cache=True, **{self.cache_kwarg: cache},
        ).last_hidden_state[:, -1]  # (U, H): left padding puts every prompt's last token last
        index = torch.tensor(row_group, device=self.device)  # (B,)
        if len(groups) != len(row_group):
            cache.batch_select_indices(index)
        # 2. The completions, right-padded, after their prompts.
        width = max(len(c) for c in completion_ids)
        tokens = torch.full((len(completion_ids), width), self.tokenizer.pad_token_id, device=self.device)
        token_mask = torch.zeros(len(completion_ids), width, dtype=torch.bool, device=self.device)  # (B, T)
        for i, completion in enumerate(completion_ids):
            tokens[i, : len(completion)] = torch.tensor(list(completion), device=self.device)
            token_mask[i, : len(completion)] = True
        prompt_lengths = prompt_mask.sum(1)[index]  # (B,)
        hidden = _call_with(
            decoder, overrides, input_ids=tokens,
            attention_mask=torch.cat([prompt_mask[index], token_mask.long()], 1),  # (B, P+T)
            position_ids=prompt_lengths[:, None] + torch.arange(width, device=self.device),  # (B, T)
            use_cache=True, **{self.cache_kwarg: cache},
        ).last_hidden_state  # (B, T, H)
        # Token t is predicted by the state before it: the prompt's last for t = 0.
        predictors = torch.cat([prompt_hidden[index, None], hidden[:, :-1]], 1)  # (B, T, H)
        # 3. The output head only on real completion tokens: N rows instead of B*T. Under bf16
        # compute the head's product is bf16; the log-softmax below runs in fp32 (autocast off).
        logits = _call_with(base.get_output_embeddings(), overrides, predictors[token_mask])  # (N, V)
        allowed = None  # (N, V): positions row by row, as predictors[token_mask] orders them
        if token_filters is not None:
            allowed = position_masks(completion_ids, token_filters, logits.shape[-1], self.device)
        with torch.autocast(self.device.type, enabled=False):
            return picked_logprobs(logits.float(), tokens, token_mask, temperature=temperature, allowed=allowed,
                                   softcap=getattr(base.config, "final_logit_softcapping", None))

    def _autocast(self) -> Any:
        """bf16 matrix products for :attr:`compute_dtype` bfloat16; nothing for float32."""
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def set_reference(self, state: dict[str, Tensor] | None) -> None:
        """Score reference passes with ``state`` (a :meth:`state_dict_trainable`) in place of the
        trainable tensors, over the same frozen weights; None goes back to the default reference.

        Still one model: the tensors are copied once to the device and swapped in only for the
        reference pass (``torch.func.functional_call``), never written into the parameters, so
        a graph built before a reference pass stays valid. The cost is one copy of the trainable
        tensors: a few MB of adapters with LoRA, the weights with full fine-tuning (which then
        replaces the default frozen copy).
        """
        if state is None:
            self._reference_state, self._reference_is_base = None, False
            return
        parameters = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(parameters) != set(state):
            missing, extra = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
            raise KeyError(f"reference state does not match this policy: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")
        previous = self._reference_state or {}
        stored: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, parameter in parameters.items():
                tensor = previous.get(name)
                if tensor is None or tensor.shape != parameter.shape or tensor.dtype != parameter.dtype:
                    tensor = torch.empty_like(parameter, requires_grad=False)
                stored[name] = tensor.copy_(state[name])  # reuses last reference's memory when it fits
        self._reference_state = stored
        self._reference_model = None
        # Zero B makes every adapter's output exactly 0: the base model with adapters switched off
        # scores the same (tested bit for bit) and skips the adapters' products, ~10% of the pass.
        self._reference_is_base = self.lora is not None and not any(
            bool(t.any()) for n, t in stored.items() if "lora_B" in n)

    def reset_reference(self) -> None:
        """Default reference, full fine-tuning: the next reference call snapshots the weights as they are."""
        self._reference_model = None

    def reference_is_current(self) -> bool:
        """Whether a reference pass would score what the trainable weights score now: true at the
        first update of an inner run, which starts from its KL reference; the update then reuses
        its own log-probs instead of running the same forward twice."""
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if self._reference_state is not None:
            return all(torch.equal(p, self._reference_state[n]) for n, p in trainable.items())
        if self.lora is not None:  # the reference is the base model: equal while every lora_B is zero
            return not any(bool(p.any()) for n, p in trainable.items() if "lora_B" in n)
        return False  # full fine-tuning's frozen copy is taken by the first reference pass itself

    def _frozen_reference(self) -> PreTrainedModel:
        if self._reference_model is None:
            reference = copy.deepcopy(self._base_model())
            for parameter in reference.parameters():
                parameter.requires_grad_(False)
                parameter.grad = None
            self._reference_model = reference.eval()
        return self._reference_model

    # ----------------------------------------------------------------------------------------
    # trainable state

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimiser should update: the adapters (LoRA) or every weight."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_dict_trainable(self) -> dict[str, Tensor]:
        """CPU copies of the trainable tensors only: a few MB for LoRA, so snapshots are cheap."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict_trainable(self, state: dict[str, Tensor]) -> None:
        """Copy a :meth:`state_dict_trainable` snapshot back in place (optimiser references stay valid)."""
        parameters = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(parameters) != set(state):
            missing, extra = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
            raise KeyError(f"trainable state does not match this policy: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(state[name])

    def save(self, path: str | Path) -> None:
        """Write the trainable state and the settings needed to rebuild the policy to folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict_trainable(), folder / TRAINABLE_FILE)
        settings = {
            "name_or_path": self.name_or_path,
            "lora": None if self.lora is None else dataclasses.asdict(self.lora),
            "system_prompt": self.system_prompt,
        }
        (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    def load(self, path: str | Path) -> None:
        """Restore trainable weights written by :meth:`save` into this policy."""
        folder = Path(path)
        settings = json.loads((folder / SETTINGS_FILE).read_text())
        saved_lora = _lora_from_json(settings["lora"])
        if saved_lora != self.lora:
            raise ValueError(f"{folder} holds weights for lora={saved_lora}, this policy has lora={self.lora}")
        self.load_state_dict_trainable(torch.load(folder / TRAINABLE_FILE, map_location="cpu", weights_only=True))

    def save_pretrained_full(self, folder: str | Path, *, merge_lora: bool = True) -> None:
        """Write a standard transformers folder (LoRA merged in) that ``load_model(folder)`` reads.

        Written by hand (:func:`~soar_env.models.export.write_pretrained_folder`) because a
        GGUF-loaded model cannot ``save_pretrained`` itself. ``merge_lora=False`` writes the base
        weights without the adapters: the model a LoRA-serving engine (vLLM) applies adapters to.
        """
        write_pretrained_folder(self.model, self.tokenizer, folder, merge_lora=merge_lora)

    # ----------------------------------------------------------------------------------------
    # modes and internals

    def train_mode(self) -> None:
        """Training mode (matters only for dropout; sampling always runs in eval mode)."""
        self.model.train()

    def eval_mode(self) -> None:
        self.model.eval()

    @property
    def num_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.trainable_parameters())

    def _base_model(self) -> PreTrainedModel:
        """The transformers model (inside the peft wrapper when there is one)."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def decoder(self) -> nn.Module:
        """The transformer stack without the output head: prefills need no logits."""
        base = self._base_model()
        return getattr(base, base.base_model_prefix)

    def new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self._base_model().config)
        except TypeError:  # transformers < 4.56 takes no config
            return DynamicCache()


def _call_with(module: nn.Module, overrides: dict[int, Tensor] | None, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with the parameters named in ``overrides`` (by id) replaced."""
    overrides = overrides or {}
    swapped = {name: overrides[id(p)] for name, p in module.named_parameters() if id(p) in overrides}
    if not swapped:
        return module(*args, **kwargs)
    return torch.func.functional_call(module, swapped, args, kwargs)


def _lora_from_json(data: dict[str, object] | None) -> LoraSettings | None:
    if data is None:
        return None
    data = dict(data)
    data["target_modules"] = tuple(data["target_modules"])  # type: ignore[arg-type]
    return LoraSettings(**data)  # type: ignore[arg-type]

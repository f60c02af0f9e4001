"""``LMPolicy.sample`` on vLLM (extra ``vllm``), with the policy's weights synced before each call.

    from soar_env.models import LMPolicy, VLLMSampler, VLLMSettings
    policy = LMPolicy.from_name("smollm2-135m-instruct", device="cuda")
    policy.sampler = VLLMSampler(policy, VLLMSettings(gpu_memory_utilization=0.3))
    rollout = policy.sample(prompts, num_samples=32, seed=0)   # runs on vLLM
    logprobs, mask = policy.token_logprobs(rollout.prompt_ids, rollout.completion_ids)  # transformers

Sampling is the hot path of SOAR; training is not. So vLLM only samples, and everything the
loss needs (log-probs with gradients, the KL reference) stays on the transformers model. The
two engines must therefore agree on what they sample from:

- the same prompt tokens: prompts are encoded with the policy's tokenizer and sent as token
  ids, never as text;
- the same distribution: plain ancestral sampling at ``temperature`` (top-k and top-p off, no
  penalties), greedy for ``temperature <= 0``, stopping at every eos token of the policy;
- the same weights: before each ``sample`` the trainable tensors are compared with a cheap
  fingerprint and, if they changed, pushed to vLLM. LoRA policies send their adapters (a few
  MB written with peft, a new ``LoRARequest`` each time) or, with ``lora_sync="merged"``, the
  merged weights of the adapted layers; full fine-tuning sends every trainable tensor through
  ``model.load_weights`` in vLLM's worker;
- the same post-processing: completions are cut after eos or the first stop string by the
  policy's own ``trim``, so ``Rollout`` rows mean exactly what they mean on the transformers path.

Seeds: every sampled row gets its own vLLM seed, derived from ``seed``, the prompt index and
the sample index (:func:`request_seed`), so a call is reproducible whatever vLLM batches
together. The two engines draw different random numbers, so only greedy outputs can be
compared token for token.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), next to the training
model on the same GPU: weight pushes are then device-to-device copies without serialisation.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

from soar_env.models.decoding import SampleOptions, SamplerBase, row_seed
from soar_env.models.resolve import EMBEDDED_DEFAULT, TINY_NAMES, looks_local
from soar_env.models.rollout import Completion, Rollout

if TYPE_CHECKING:
    from soar_env.models.policy import LMPolicy

INSTALL_HINT = "pip install 'soar-gym[vllm]'"
WORKER_EXTENSION = "soar_env.models.vllm_sampler.WorkerExtension"
"""Qualified name vLLM imports in its worker to add :class:`WorkerExtension`'s methods."""
LORA_SYNC_MODES = ("adapter", "merged")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``max_lora_rank`` (every version since 0.6)."""


@dataclass
class VLLMSettings:
    """How the vLLM engine is built. The defaults suit one GPU shared with the training model."""

    dtype: str = "bfloat16"
    """Weights and activations in vLLM; LoRA adapters need ``float16`` or ``bfloat16``."""
    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU vLLM takes for weights and KV cache; the rest is left to training."""
    max_model_len: int | None = None
    """Longest prompt + completion; None: the model's context length."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture: starts faster (tests), samples slower."""
    lora_sync: str = "adapter"
    """LoRA policies: ``"adapter"`` sends the adapters (small, vLLM's LoRA kernels); ``"merged"``
    sends W + BA of each adapted layer (plain kernels, any dtype, like the transformers path)."""
    model_path: str | None = None
    """Where vLLM loads the base weights from; None: the policy's name when vLLM can read it
    (a transformers folder or hub id), else a folder written by ``save_pretrained_full``."""
    in_process: bool = True
    """Run vLLM's engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weight pushes
    are plain tensor copies. False keeps vLLM's separate engine process; pushes then go
    through CPU copies."""
    sync_chunk_mb: int = 512
    """Weight pushes are split into calls of at most this many megabytes."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further ``vllm.LLM`` arguments (e.g. ``max_num_seqs``, ``enable_prefix_caching``)."""


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"the vLLM sampler needs vLLM: {INSTALL_HINT} ({error})") from error
    return vllm


def sync_mode(policy: LMPolicy, settings: VLLMSettings) -> str:
    """``"full"`` (no LoRA), ``"adapter"`` or ``"merged"``; raises on settings vLLM would reject later."""
    if policy.lora is None:
        return "full"
    if settings.lora_sync not in LORA_SYNC_MODES:
        raise ValueError(f"lora_sync must be one of {LORA_SYNC_MODES}, got {settings.lora_sync!r}")
    if settings.lora_sync == "adapter":
        if settings.dtype not in ("float16", "bfloat16", "half", "auto"):  # auto: half for float32 checkpoints
            raise ValueError(
                f"vLLM's LoRA kernels run in float16 or bfloat16, not {settings.dtype}; "
                "use lora_sync='merged' to sample a LoRA policy in float32"
            )
        max_lora_rank(policy.lora.r)  # raises early for ranks vLLM cannot serve
    return settings.lora_sync


def max_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``r``."""
    for rank in VLLM_LORA_RANKS:
        if r <= rank:
            return rank
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, this policy has r={r}")


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """vLLM seed of sample ``sample`` of prompt ``prompt`` in a call seeded with ``seed``.

    A SplitMix64 chain: deterministic, spread over 63 bits (vLLM takes a signed 64-bit seed),
    and independent of how many prompts or samples the call has, so neighbouring calls
    (seeds s and s + 1) share no row seeds.
    """
    return row_seed(seed, prompt, sample) >> 1


def sampling_kwargs(
    *,
    temperature: float,
    greedy: bool,
    max_new_tokens: int,
    stops: Sequence[str],
    eos_token_ids: Sequence[int],
    seed: int | None,
) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments for one row: the distribution ``LMPolicy.sample`` draws from.

    Every filter is set to "off" explicitly, so no default of the checkpoint's generation
    config or of a vLLM version can narrow the distribution: top_k=-1 (accepted as "off" by
    every version), top_p=1, min_p=0, no penalties. Greedy is temperature 0, which vLLM
    decodes by argmax. The eos tokens are stop tokens (vLLM keeps them in ``token_ids``);
    stop strings let vLLM stop early, and the policy trims the tokens itself afterwards.
    """
    return {
        "n": 1,
        "temperature": 0.0 if greedy else float(temperature),
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": int(max_new_tokens),
        "stop": list(stops) or None,
        "stop_token_ids": list(eos_token_ids),
        "seed": None if greedy else seed,
    }


def rollout_from_outputs(
    outputs: Sequence[Any],
    prompt_ids: Sequence[list[int]],
    *,
    num_samples: int,
    greedy: bool,
    trim: Callable[[list[int]], Completion],
) -> Rollout:
    """Turn vLLM's request outputs into a prompt-major :class:`Rollout`.

    ``outputs[k]`` answers request ``k``; the requests were prompt-major: ``num_samples`` per
    prompt, or one per prompt when ``greedy`` (copied ``num_samples`` times, as the
    transformers path does). Each ``outputs[k].outputs[0].token_ids`` is cut by ``trim``
    (``LMPolicy.trim``: after eos or the first stop string).
    """
    draws = 1 if greedy else num_samples
    if len(outputs) != len(prompt_ids) * draws:
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids) * draws} requests")
    completions: list[list[Completion]] = []
    for i, ids in enumerate(prompt_ids):
        rows = []
        for output in outputs[i * draws : (i + 1) * draws]:
            sent = getattr(output, "prompt_token_ids", None)
            if sent is not None and list(sent) != ids:
                raise RuntimeError(f"vLLM answered prompt {i} with other prompt tokens: outputs out of order")
            rows.append(trim(list(output.outputs[0].token_ids)))
        completions.append(rows)
    return Rollout.from_completions(prompt_ids, completions, copies=num_samples if greedy else 1)


def trainable_fingerprint(model: nn.Module) -> tuple[tuple[str, int, int, float], ...]:
    """A summary of the trainable tensors that changes whenever one of them is written.

    Per tensor: storage address, version counter and the float64 sum of its values. The
    counter moves with every in-place op through the parameter (optimizer steps,
    ``load_state_dict_trainable``); the sum catches writes that bypass it (fused AdamW and
    ``.data`` writes do). One reduction pass over the trainable tensors, no copy.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        return ()
    with torch.no_grad():
        sums = [p.detach().sum(dtype=torch.float64).reshape(1) for _, p in named]
        values = torch.cat([s.to(sums[0].device) for s in sums]).tolist()  # one device sync
    return tuple((name, p.data_ptr(), p._version, value) for (name, p), value in zip(named, values))


def hf_parameter_name(name: str) -> str:
    """The transformers checkpoint name of a parameter of a peft-wrapped model (what vLLM loads).

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``; plain names pass unchanged.
    """
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def merged_lora_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint name, W + delta) for every adapted linear layer: the weights the adapters change."""
    adapter = model.active_adapter
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
            raise NotImplementedError(f"lora_sync='merged' handles LoRA on linear layers only, not {name}")
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            with torch.no_grad():
                weight = module.get_base_layer().weight + module.get_delta_weight(adapter)  # (out, in)
            yield hf_parameter_name(f"{name}.weight"), weight


def full_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint name, tensor) for every trainable parameter; tied weights appear once."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            yield hf_parameter_name(name), parameter.detach()


def vllm_loadable(name: str | None) -> str | None:
    """``name`` when vLLM can load it itself (a transformers folder or a hub id), else None."""
    if name is None:
        return None
    name = name.strip()
    if name.lower() in (EMBEDDED_DEFAULT, *TINY_NAMES) or name.lower().endswith(".gguf"):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path) if (path / "config.json").is_file() else None
    return None if looks_local(name) else name


class WorkerExtension:
    """Methods vLLM adds to its GPU worker (``worker_extension_cls``), called with ``LLM.collective_rpc``.

    ``self`` is vLLM's worker. ``model.load_weights`` takes checkpoint names and does vLLM's
    own renaming (q/k/v into qkv_proj, gate/up into gate_up_proj, tied lm_head skipped).
    """

    def soar_load_weights(self, weights: list[tuple[str, Tensor]]) -> int:
        runner = self.model_runner  # type: ignore[attr-defined]
        # get_model() unwraps vLLM's CUDA-graph wrapper in the versions that have one.
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        model.load_weights(weights)
        return len(weights)


class VLLMSampler(SamplerBase):
    """Samples like :meth:`LMPolicy.sample` on vLLM, keeping vLLM's weights in step with the policy.

    Attach it with ``policy.sampler = VLLMSampler(policy)``; ``policy.sample`` then delegates
    here. :attr:`syncs` counts weight pushes. Call :meth:`close` to free the GPU memory.
    ``sample``'s ``batch_size`` is unused: vLLM schedules its own batches (bound them with
    ``VLLMSettings(engine_args={"max_num_seqs": ...})``).
    """

    def __init__(self, policy: LMPolicy, settings: VLLMSettings | None = None) -> None:
        vllm = import_vllm()
        self.policy = policy
        self.settings = settings if settings is not None else VLLMSettings()
        self.mode = sync_mode(policy, self.settings)
        self.syncs = 0
        """Weight pushes so far (the constructor's export does not count)."""
        self._sampling_params = vllm.SamplingParams
        self._lora_request_class: Any = None
        self._lora_request: Any = None
        self._lora_folder: Path | None = None
        self._next_lora_id = 1
        self._folder = tempfile.TemporaryDirectory(prefix="soar-vllm-")
        self._synced: tuple[Any, ...] | None = None

        engine_args: dict[str, Any] = {
            "dtype": self.settings.dtype,
            "gpu_memory_utilization": self.settings.gpu_memory_utilization,
            "enforce_eager": self.settings.enforce_eager,
            "seed": 0,
        }
        if self.settings.max_model_len is not None:
            engine_args["max_model_len"] = self.settings.max_model_len
        if self.mode == "adapter":
            from vllm.lora.request import LoRARequest

            self._lora_request_class = LoRARequest
            assert policy.lora is not None
            engine_args.update(enable_lora=True, max_lora_rank=max_lora_rank(policy.lora.r), max_loras=1)
        else:
            accepted = {f.name for f in fields(vllm.EngineArgs)}
            if "worker_extension_cls" not in accepted:
                raise NotImplementedError(
                    f"pushing {'full' if self.mode == 'full' else 'merged LoRA'} weights into vLLM needs "
                    f"vLLM >= 0.8 (worker_extension_cls + collective_rpc); this is vLLM {vllm.__version__}. "
                    "Upgrade vLLM, or sample a LoRA policy with lora_sync='adapter'."
                )
            engine_args["worker_extension_cls"] = WORKER_EXTENSION
        engine_args.update(self.settings.engine_args)

        model_path = self.settings.model_path or vllm_loadable(policy.name_or_path)
        if model_path is None:
            model_path = str(Path(self._folder.name) / "model")
            current = trainable_fingerprint(policy.model)
            # The adapter mode serves adapters on the bare base model; the others load W (+ BA).
            policy.save_pretrained_full(model_path, merge_lora=self.mode != "adapter")
            if self.mode != "adapter":
                self._synced = current  # the folder holds exactly these weights
        if self.settings.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with _caller_rng_kept():  # vLLM seeds the global RNGs of the process it runs in
            self.llm = vllm.LLM(model=model_path, tokenizer=model_path, **engine_args)

    # ----------------------------------------------------------------------------------------

    def _sample(self, prompts: Sequence[str], options: SampleOptions) -> Rollout:
        """:meth:`LMPolicy.sample` on vLLM, after :meth:`sync`."""
        num_samples, max_new_tokens = options.num_samples, options.max_new_tokens
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"need num_samples >= 1 and max_new_tokens >= 1, got {num_samples}, {max_new_tokens}")
        greedy, stops = options.decodes_greedily, options.stops
        encoded = [self.policy.encode(prompt) for prompt in prompts]
        if not encoded:
            return Rollout.from_completions([], [])
        self.sync()
        seed = options.seed
        if seed is None:
            seed = int(torch.randint(2**31, (1,)).item())  # from the global RNG, as the transformers path
        requests, params = [], []
        for i, ids in enumerate(encoded):
            for j in range(options.draws):
                requests.append({"prompt_token_ids": ids})  # a vllm.inputs.TokensPrompt
                kwargs = sampling_kwargs(
                    temperature=options.temperature,
                    greedy=greedy,
                    max_new_tokens=max_new_tokens,
                    stops=stops,
                    eos_token_ids=self.policy.eos_token_ids,
                    seed=request_seed(seed, i, j),
                )
                params.append(self._sampling_params(**kwargs))
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self._lora_request)
        return rollout_from_outputs(
            outputs, encoded, num_samples=num_samples, greedy=greedy, trim=lambda ids: self.policy.trim(ids, stops)
        )

    def sync(self, *, force: bool = False) -> bool:
        """Push the policy's trainable state to vLLM if it changed since the last push; True if pushed."""
        current = trainable_fingerprint(self.policy.model)
        if not force and current == self._synced:
            return False
        if self.mode == "adapter":
            self._push_adapter()
        elif self.mode == "merged":
            self._push_weights(merged_lora_weights(self.policy.model))
        else:
            self._push_weights(full_weights(self.policy.model))
        self._synced = current
        self.syncs += 1
        return True

    def _push_adapter(self) -> None:
        """Write the adapters with peft and switch to a new LoRARequest (vLLM caches adapters by id)."""
        lora_id = self._next_lora_id
        folder = Path(self._folder.name) / f"adapter-{lora_id}"
        self.policy.model.save_pretrained(str(folder))  # a PeftModel writes only its adapters
        _check_adapter_folder(folder)
        # Name and id both new: vLLM compares requests by name and caches prefixes per adapter.
        self._lora_request = self._lora_request_class(
            lora_name=f"soar-{lora_id}", lora_int_id=lora_id, lora_path=str(folder)
        )
        if self._lora_folder is not None:
            shutil.rmtree(self._lora_folder, ignore_errors=True)  # never requested again
        self._lora_folder = folder
        self._next_lora_id += 1

    def _push_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy tensors into vLLM's model in chunks, then drop KV blocks computed with the old weights."""
        limit = self.settings.sync_chunk_mb * 2**20
        chunk: list[tuple[str, Tensor]] = []
        size = 0
        for name, tensor in weights:
            if not self.settings.in_process:
                tensor = tensor.to("cpu")  # crosses a process boundary
            chunk.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= limit:
                self.llm.collective_rpc("soar_load_weights", args=(chunk,))
                chunk, size = [], 0
        if chunk:
            self.llm.collective_rpc("soar_load_weights", args=(chunk,))
        # The prefix cache would otherwise serve prompt KV computed with the previous weights.
        if not hasattr(self.llm, "reset_prefix_cache"):
            raise NotImplementedError("this vLLM has no LLM.reset_prefix_cache; disable enable_prefix_caching")
        self.llm.reset_prefix_cache()

    # ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Shut the engine down and free its GPU memory; the sampler cannot sample afterwards."""
        if getattr(self.policy, "sampler", None) is self:
            self.policy.sampler = None
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            del llm
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
            except ImportError:  # older vLLM: no helper, the collector and the cache allocator suffice
                cleanup_dist_env_and_memory = None
            if cleanup_dist_env_and_memory is not None:
                cleanup_dist_env_and_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._folder.cleanup()

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_adapter_folder(folder: Path) -> None:
    """vLLM reads a peft folder: adapter_config.json plus adapter_model.safetensors (or .bin)."""
    config = folder / "adapter_config.json"
    weights = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
    if not config.is_file() or not any(w.is_file() for w in weights):
        raise RuntimeError(f"peft did not write an adapter folder vLLM can read at {folder}")
    if json.loads(config.read_text()).get("use_dora"):
        raise NotImplementedError("vLLM serves plain LoRA adapters, not DoRA")


@contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global RNG states afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

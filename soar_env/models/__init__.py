"""Models: name resolution (embedded default, tiny, local folders, hub ids), the LM policy and
its optional vLLM sampler (imports vLLM only when a ``VLLMSampler`` is built).

    >>> from soar_env.models import LMPolicy
    >>> student = LMPolicy.from_name("tiny")          # "smollm2-135m-instruct" for the real one
"""

from soar_env.models.decoding import Sampler
from soar_env.models.policy import LLAMA_LINEAR_MODULES, LMPolicy, LoraSettings
from soar_env.models.resolve import (
    EMBEDDED_DEFAULT,
    ModelLoadError,
    clear_model_cache,
    embedded_gguf_path,
    is_embedded_available,
    load_model,
    resolve_device,
)
from soar_env.models.rollout import Rollout
from soar_env.models.tiny import build_tiny_model, build_tiny_tokenizer
from soar_env.models.vllm_sampler import VLLMSampler, VLLMSettings

__all__ = [
    "EMBEDDED_DEFAULT",
    "LLAMA_LINEAR_MODULES",
    "LMPolicy",
    "LoraSettings",
    "ModelLoadError",
    "Rollout",
    "Sampler",
    "VLLMSampler",
    "VLLMSettings",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "clear_model_cache",
    "embedded_gguf_path",
    "is_embedded_available",
    "load_model",
    "resolve_device",
]

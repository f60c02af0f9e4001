"""Which float type the student computes in: bfloat16 where the hardware runs it natively.

On a CPU with AVX512-BF16 or AMX (and on recent GPUs) bf16 matrix products run at up to twice
the fp32 rate; elsewhere PyTorch emulates them, slower than fp32. Weights the optimizer updates
stay fp32 (master weights) whatever is chosen here.
"""

from __future__ import annotations

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

"""Which dtype to run a model in: the one it was published in, where the hardware multiplies it natively.

Calibration runs the model's own forward passes, so it computes in the dtype the model is loaded in (the grams are
accumulated in float32 or float64 whatever that dtype, and the solvers work in float32 and write their results
back in the model's dtype). bfloat16 halves the memory traffic and, on hardware with bfloat16 matrix units, makes
those passes faster than float32; without such units the CPU emulates bfloat16 matrix products, several times
slower than float32 ones (measured on an AVX2 CPU: a SmolLM2 forward pass 5 × slower in bfloat16).
:func:`native_dtype` picks the published dtype where it is native and float32 elsewhere.
"""

from __future__ import annotations

import torch

#: Low-precision dtypes :func:`has_matrix_units` knows about; float32 and float64 are native everywhere.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def has_matrix_units(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``device`` multiplies ``dtype`` matrices natively (not by converting to float32 and back).

    float32 / float64: always. bfloat16: CUDA devices that support it, CPUs with AMX tiles or AVX512-BF16.
    float16: CUDA devices, CPUs with AMX-FP16. Other devices (MPS, XPU, …): assumed native.
    """
    device = torch.device(device)
    if dtype not in LOW_PRECISION:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    if dtype == torch.bfloat16:
        return _cpu_has("_is_amx_tile_supported") or _cpu_has("_is_avx512_bf16_supported")
    return _cpu_has("_is_amx_fp16_supported")


def native_dtype(published: torch.dtype, device: torch.device | str) -> torch.dtype:
    """``published`` where ``device`` multiplies it natively (:func:`has_matrix_units`), else float32."""
    return published if has_matrix_units(published, device) else torch.float32


def _cpu_has(probe: str) -> bool:
    """The answer of torch's CPU capability probe ``torch.cpu.<probe>()`` (False where torch lacks it)."""
    return bool(getattr(torch.cpu, probe, lambda: False)())

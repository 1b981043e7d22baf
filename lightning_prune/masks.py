"""Compact storage of boolean sparsity masks: 8 mask entries per byte."""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> dict[str, object]:
    """Bit-pack a bool mask of any shape: ``{"shape": [...], "bits": uint8 tensor [ceil(numel / 8)]}`` on the CPU."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    flat = mask.detach().reshape(-1).cpu()
    padded = torch.zeros((flat.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    bits = (padded.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)
    return {"shape": list(mask.shape), "bits": bits}


def unpack_mask(packed: dict[str, object]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the bool mask on the CPU."""
    shape, bits = packed["shape"], packed["bits"]
    numel = 1
    for size in shape:
        numel *= int(size)
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask of shape {shape} needs {(numel + 7) // 8} uint8 bytes")
    flat = (bits.unsqueeze(1) & _BIT_WEIGHTS).ne(0).reshape(-1)[:numel]
    return flat.reshape(shape)

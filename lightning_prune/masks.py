"""Compact storage of boolean sparsity masks: 8 mask entries per byte, on any device.

Entry ``i`` of the flattened mask is bit ``i % 8`` of byte ``i // 8``. :func:`pack_bits` / :func:`unpack_bits` work on
the mask's own device (a GPU keeps its masks packed and unpacks one layer at a time); :func:`pack_mask` /
:func:`unpack_mask` are the CPU form stored in checkpoints and progress files, ``{"shape": [...], "bits": uint8}``;
:class:`PackedMasks` is a read-only ``{layer name: bool mask}`` mapping kept in that form.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask of any shape on its device: uint8 ``[ceil(numel / 8)]``.

    Memory: besides the result, two byte-sized temporaries of ``numel / 8`` entries (one bit plane at a time)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    flat = mask.detach().reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    planes = flat.reshape(-1, 8)
    bits = torch.zeros(planes.shape[0], dtype=torch.uint8, device=mask.device)
    for bit in range(8):
        bits |= planes[:, bit].to(torch.uint8) << bit
    return bits


def unpack_bits(bits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the bool mask of ``shape`` on ``bits``' device.

    Raises:
        ValueError: unless ``bits`` is a uint8 tensor of ``ceil(numel / 8)`` bytes.
    """
    numel = math.prod(int(size) for size in shape)
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask of shape {list(shape)} needs {(numel + 7) // 8} uint8 bytes")
    planes = bits.reshape(-1, 1) & _BIT_WEIGHTS.to(bits.device)
    return planes.ne_(0).view(torch.bool).reshape(-1)[:numel].reshape(tuple(shape))


def pack_mask(mask: torch.Tensor) -> dict[str, object]:
    """Bit-pack a bool mask of any shape: ``{"shape": [...], "bits": uint8 tensor [ceil(numel / 8)]}`` on the CPU
    (packed on the mask's device, so only the bits travel)."""
    return {"shape": list(mask.shape), "bits": pack_bits(mask).cpu()}


def unpack_mask(packed: Mapping[str, object]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the bool mask on the CPU."""
    return unpack_bits(packed["bits"], packed["shape"]).cpu()


class PackedMasks(Mapping[str, torch.Tensor]):
    """Read-only ``{layer name: bool mask}`` kept bit-packed; each lookup unpacks one mask on the CPU.

    Args:
        packed: ``{layer name: {"shape": [...], "bits": uint8}}`` (the :func:`pack_mask` form), kept as
            :attr:`packed`.
    """

    def __init__(self, packed: Mapping[str, Mapping[str, object]] | None = None) -> None:
        self.packed: dict[str, Mapping[str, object]] = dict(packed or {})

    @classmethod
    def of(cls, masks: Mapping[str, torch.Tensor]) -> PackedMasks:
        """``masks`` as :class:`PackedMasks`: itself if it is one, else each bool mask packed."""
        if isinstance(masks, PackedMasks):
            return masks
        return cls({name: pack_mask(mask) for name, mask in masks.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self.packed[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.packed)

    def __len__(self) -> int:
        return len(self.packed)

    def __repr__(self) -> str:
        return f"PackedMasks({list(self.packed)})"

"""Lightning callbacks: one-shot pruning (one class per method), keeping the zeros, export of the pruned model."""

from .export import ExportPrunedModelCallback
from .mask import SparsityMaskCallback
from .pruning import (
    ALPSPruningCallback,
    MagnitudePruningCallback,
    OneShotPruningCallback,
    SparseGPTPruningCallback,
    WandaPruningCallback,
)

__all__ = [
    "ALPSPruningCallback",
    "ExportPrunedModelCallback",
    "MagnitudePruningCallback",
    "OneShotPruningCallback",
    "SparseGPTPruningCallback",
    "SparsityMaskCallback",
    "WandaPruningCallback",
]

"""Lightning callbacks: one-shot pruning (one class per method), structured pruning (FASP), keeping the zeros,
export of the pruned model."""

from .export import ExportPrunedModelCallback
from .mask import SparsityMaskCallback
from .pruning import (
    ALPSPruningCallback,
    MagnitudePruningCallback,
    OneShotPruningCallback,
    PruningCallback,
    SparseGPTPruningCallback,
    WandaPruningCallback,
)
from .structured import FASPPruningCallback

__all__ = [
    "ALPSPruningCallback",
    "ExportPrunedModelCallback",
    "FASPPruningCallback",
    "MagnitudePruningCallback",
    "OneShotPruningCallback",
    "PruningCallback",
    "SparseGPTPruningCallback",
    "SparsityMaskCallback",
    "WandaPruningCallback",
]

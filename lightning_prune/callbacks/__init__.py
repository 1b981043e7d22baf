"""Lightning callbacks: one-shot pruning (one class per method), structured pruning (FASP), keeping the zeros,
export of the pruned model.

Importing this package also registers the slimmed ``*_fasp`` model types with transformers (see
:mod:`lightning_prune.structured`) and the CPU DeepSpeed strategy with Lightning as ``"deepspeed_cpu_stage_3"``
(see :mod:`lightning_prune.distributed.strategies`).
"""

from ..distributed import strategies  # noqa: F401  (registers "deepspeed_cpu_stage_3")
from .base import PruningCallback, PruningOutcome
from .export import ExportPrunedModelCallback
from .fasp import FASPPruningCallback
from .mask import SparsityMaskCallback
from .oneshot import (
    ALPSPruningCallback,
    MagnitudePruningCallback,
    OneShotPruningCallback,
    SparseGPTPruningCallback,
    WandaPruningCallback,
)

__all__ = [
    "ALPSPruningCallback",
    "ExportPrunedModelCallback",
    "FASPPruningCallback",
    "MagnitudePruningCallback",
    "OneShotPruningCallback",
    "PruningCallback",
    "PruningOutcome",
    "SparseGPTPruningCallback",
    "SparsityMaskCallback",
    "WandaPruningCallback",
]

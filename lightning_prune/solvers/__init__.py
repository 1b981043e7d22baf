"""Pure-tensor layer solvers: ``f(weight [out, in], gram [in, in], sparsity=None, *, nm=None, **options)``.

Each returns a :class:`PruneResult` (new weight, bool mask of kept entries, stats); :func:`alps_shared` prunes
layers that read the same input (q/k/v, gate/up) with one decomposition of their gram. See
:mod:`lightning_prune.solvers.patterns` for the sparsity semantics and :data:`METHODS` for each method's options
class. :func:`fasp` is the structured counterpart: it removes whole input columns of a layer (with the rows of the
earlier layers feeding them) and returns a :class:`ColumnPruneResult`; an :class:`OutputTarget` makes it refit
towards other outputs (the dense model's), :func:`restoration_errors` gives its error at every kept count. Nothing
here imports Lightning or transformers.
"""

from .alps import ALPSOptions, alps, alps_shared
from .fasp import ColumnPruneResult, FASPOptions, OutputTarget, fasp, restoration_errors, units_kept
from .magnitude import MagnitudeOptions, magnitude
from .methods import METHODS, Method
from .patterns import check_mask, parse_nm, select_mask
from .result import PruneResult
from .sparsegpt import SparseGPTOptions, sparsegpt
from .wanda import WandaOptions, wanda

#: ``{name: public solver function}`` of the one-shot methods.
SOLVERS = {name: method.function for name, method in METHODS.items()}

__all__ = [
    "ALPSOptions",
    "ColumnPruneResult",
    "FASPOptions",
    "METHODS",
    "MagnitudeOptions",
    "Method",
    "OutputTarget",
    "PruneResult",
    "SOLVERS",
    "SparseGPTOptions",
    "WandaOptions",
    "alps",
    "alps_shared",
    "check_mask",
    "fasp",
    "magnitude",
    "parse_nm",
    "restoration_errors",
    "select_mask",
    "sparsegpt",
    "units_kept",
    "wanda",
]

"""Pure-tensor layer solvers: ``f(weight [out, in], gram [in, in], sparsity=None, *, nm=None, **options)``.

Each returns a :class:`PruneResult` (new weight, bool mask of kept entries, stats). See
:mod:`lightning_prune.solvers.patterns` for the sparsity semantics. :func:`fasp` is the structured counterpart: it
removes whole input columns of a layer (with the rows of the earlier layers feeding them) and returns a
:class:`ColumnPruneResult`.
"""

from .alps import alps
from .fasp import ColumnPruneResult, fasp, kept_count
from .magnitude import magnitude
from .patterns import check_mask, parse_nm, select_mask
from .result import PruneResult
from .sparsegpt import sparsegpt
from .wanda import wanda

SOLVERS = {"alps": alps, "sparsegpt": sparsegpt, "wanda": wanda, "magnitude": magnitude}

__all__ = ["SOLVERS", "ColumnPruneResult", "PruneResult", "alps", "fasp", "check_mask", "kept_count", "magnitude", "parse_nm", "select_mask", "sparsegpt", "wanda"]

"""FASP structured pruning: coupled rows and columns removed, the model physically slimmed.

* :mod:`.driver`: :func:`fasp_prune` / :func:`prune_structured`, block by block over calibration batches;
* :mod:`.ratios`: how many units each coupled group loses (ratios, exact parameter counts, budget solve);
* :mod:`.options`: :class:`StructuredOptions`, checked once;
* :mod:`.models`: the slimmed ``*_fasp`` model types.

Importing this package registers the slimmed model types with the transformers ``Auto*`` classes, so a FASP-pruned
directory reloads with ``AutoModelForCausalLM.from_pretrained`` after ``import lightning_prune.structured``.
"""

from . import models
from .driver import GroupReport, StructuredReport, fasp_prune, prune_structured
from .options import StructuredOptions
from .ratios import decoder_linear_parameters, removed_parameters, resolve_ratios

models.register()

__all__ = [
    "GroupReport",
    "StructuredOptions",
    "StructuredReport",
    "decoder_linear_parameters",
    "fasp_prune",
    "prune_structured",
    "removed_parameters",
    "resolve_ratios",
]

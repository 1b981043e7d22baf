"""lightning_prune: one-shot pruning of large language models as PyTorch Lightning callbacks.

Importing the package registers the slimmed ``*_fasp`` model types (:mod:`lightning_prune.slim_models`) with the
transformers ``Auto*`` classes, so FASP-pruned directories reload with ``AutoModelForCausalLM.from_pretrained``.
"""

from . import slim_models
from .oneshot import oneshot
from .structured import fasp_prune

slim_models.register()

__version__ = "0.1.0"

__all__ = ["fasp_prune", "oneshot"]

"""lightning_prune: one-shot pruning of large language models as PyTorch Lightning callbacks.

Importing the package registers the slimmed ``*_fasp`` model types (:mod:`lightning_prune.slim_models`) with the
transformers ``Auto*`` classes, so FASP-pruned directories reload with ``AutoModelForCausalLM.from_pretrained``,
and the CPU DeepSpeed strategy (:mod:`lightning_prune.strategies`) with Lightning as ``"deepspeed_cpu_stage_3"``.
"""

from . import slim_models, strategies  # noqa: F401 (registers the strategy)
from .oneshot import oneshot
from .structured import fasp_prune

slim_models.register()

__version__ = "0.1.0"

__all__ = ["fasp_prune", "oneshot", "strategies"]

"""lightning_prune: one-shot pruning of large language models as PyTorch Lightning callbacks."""

from .oneshot import oneshot

__version__ = "0.1.0"

__all__ = ["oneshot"]

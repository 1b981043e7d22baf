"""lightning_prune: one-shot pruning of large language models as PyTorch Lightning callbacks."""

__version__ = "0.1.0"

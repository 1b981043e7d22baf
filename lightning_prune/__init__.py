"""lightning_prune: one-shot pruning of large language models as PyTorch Lightning callbacks.

``import lightning_prune`` needs torch alone: it brings the functional one-shot face (:func:`oneshot`,
:class:`OneShotOptions`, :func:`prune_oneshot`); the FASP face (:func:`fasp_prune`, :class:`StructuredOptions`,
:func:`prune_structured`) is imported on first access (PEP 562), with transformers, from
:mod:`lightning_prune.structured`, whose import registers the slimmed ``*_fasp`` model types. The Lightning
callbacks live in :mod:`lightning_prune.callbacks`.
"""

from __future__ import annotations

import importlib
from typing import Any

from .oneshot import OneShotOptions, oneshot, prune_oneshot

__version__ = "0.1.0"

#: Public names imported on first access, from :mod:`lightning_prune.structured` (which needs transformers).
_STRUCTURED = ("StructuredOptions", "fasp_prune", "prune_structured")

__all__ = ["OneShotOptions", "oneshot", "prune_oneshot", *_STRUCTURED]


def __getattr__(name: str) -> Any:
    if name in _STRUCTURED:
        value = getattr(importlib.import_module("lightning_prune.structured"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_STRUCTURED])

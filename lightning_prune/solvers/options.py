"""Checks shared by the solvers' option classes: each names the option and the accepted values.

Every solver keeps its options in a frozen dataclass (:class:`~lightning_prune.solvers.alps.ALPSOptions`, …)
whose ``__post_init__`` runs these checks, so options are validated once, when the object is built, and the
dataclass fields are the one place where the defaults live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .patterns import NM


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a real bool; ValueError naming ``name`` otherwise (``"no"`` or ``1`` are refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` if it is an int (not a bool) ``>= low``; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_real(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite number ``>= 0`` (``> 0`` with ``positive``); ValueError otherwise."""
    accepted = "a finite number > 0" if positive else "a finite number >= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SolverOptions:
    """Base of the solvers' option classes (frozen dataclasses, checked in ``__post_init__``)."""

    def check_pattern(self, sparsity: float | None, nm: NM | None) -> None:
        """Raise ``ValueError`` when these options cannot serve the pattern (default: any pattern is fine)."""

    def as_dict(self) -> dict[str, Any]:
        """The options as plain values, ``{field name: value}``."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [field.name for field in fields(cls)]

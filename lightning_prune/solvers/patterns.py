"""Sparsity patterns: argument checks, the exact projection onto a pattern, and mask checks.

Semantics (shared by every solver and callback):

* ``sparsity`` is the fraction of weights **removed**. A layer ``[out, in]`` pruned at ``sparsity=s`` keeps exactly
  ``out*in - round(s*out*in)`` weights (per row: ``in - round(s*in)`` in every row).
* ``nm=(n, m)`` (or the string ``"n:m"``) means **n kept** out of every m consecutive input weights of each row,
  the hardware pattern: ``"2:4"`` keeps 2 of every 4 (50 % sparsity). ``in`` must be divisible by ``m``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NM = tuple[int, int]


def parse_nm(nm: str | Sequence[int] | None) -> NM | None:
    """Return ``(n, m)`` for ``"n:m"``, ``(n, m)`` or ``[n, m]``; ``None`` stays ``None``.

    Raises:
        ValueError: naming ``nm`` when it is not two integers with ``1 <= n <= m``.
    """
    if nm is None:
        return None
    parts: Sequence
    if isinstance(nm, str):
        parts = nm.split(":")
    elif isinstance(nm, Sequence):
        parts = nm
    else:
        raise ValueError(f"nm must be 'n:m' (e.g. '2:4') or a pair (n, m), got {nm!r}")
    try:
        if len(parts) != 2 or any(isinstance(p, (bool, float)) for p in parts):
            raise TypeError
        n, m = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"nm must be 'n:m' (e.g. '2:4') or a pair (n, m), got {nm!r}") from None
    if not 1 <= n <= m:
        raise ValueError(f"nm={nm!r}: n (kept) must satisfy 1 <= n <= m, got n={n}, m={m}")
    return n, m


def check_pattern(sparsity: float | None, nm: str | Sequence[int] | None) -> tuple[float | None, NM | None]:
    """Validate the pattern arguments of a solver: exactly one of ``sparsity`` in [0, 1) or ``nm``.

    Returns:
        ``(sparsity as a float or None, (n, m) or None)``.

    Raises:
        ValueError: naming ``sparsity`` or ``nm``.
    """
    nm = parse_nm(nm)
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity (fraction removed, in [0, 1)) or nm ('n:m', n kept of m)")
    if sparsity is not None:
        sparsity = check_fraction(sparsity, "sparsity")
    return sparsity, nm


def check_fraction(value: object, argument: str) -> float:
    """``value`` as a float if it is a number in [0, 1) (a fraction removed); ValueError naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{argument} must be in [0, 1) (a fraction removed), got {value!r}")
    return float(value)


def check_layer(weight: torch.Tensor, gram: torch.Tensor | None, nm: NM | None, needs_gram: bool = True) -> None:
    """Validate one layer problem's tensors against an already checked pattern.

    Args:
        weight: ``[out, in]`` floating tensor with at least one entry, finite.
        gram: ``[in, in]`` floating tensor ``H = XᵀX``, finite, with a diagonal ``>= 0`` (sums of squares), on
            ``weight``'s device; may be ``None`` when ``needs_gram`` is False.
        nm: ``(n, m)`` or None; with N:M, ``in`` must be divisible by ``m``.
        needs_gram: whether the solver needs ``gram`` (default True).

    Raises:
        ValueError: naming ``weight``, ``gram`` or ``nm``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor [out, in], got {_describe(weight)}")
    if weight.numel() == 0:
        raise ValueError(f"weight has no entries (shape {tuple(weight.shape)}): there is nothing to prune")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf")
    if gram is None and needs_gram:
        raise ValueError(f"gram must be a floating tensor [in, in] = [{weight.shape[1]}, {weight.shape[1]}], got None")
    if gram is not None:
        n_in = weight.shape[1]
        if not isinstance(gram, torch.Tensor) or not gram.is_floating_point() or gram.shape != (n_in, n_in):
            raise ValueError(f"gram must be a floating tensor [in, in] = [{n_in}, {n_in}], got {_describe(gram)}")
        if not torch.isfinite(gram).all():
            raise ValueError("gram contains NaN or Inf")
        negative = torch.nonzero(torch.diagonal(gram) < 0).flatten()
        if negative.numel():
            raise ValueError(
                f"gram has a negative diagonal entry (input {int(negative[0])}): H = XᵀX has H_jj = Σ x_j² >= 0; "
                "pass the gram of the layer's calibration inputs"
            )
        if gram.device != weight.device:
            raise ValueError(f"gram is on {gram.device} but weight is on {weight.device}")
    if nm is not None and weight.shape[1] % nm[1] != 0:
        raise ValueError(f"nm={nm[0]}:{nm[1]} needs the input dimension ({weight.shape[1]}) divisible by m={nm[1]}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def kept_count(total: int, sparsity: float) -> int:
    """Number of weights kept out of ``total`` at ``sparsity`` (fraction removed)."""
    return total - round(sparsity * total)


def keep_largest(scores: torch.Tensor, k: int, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask (shape of ``scores``) with exactly ``k`` True entries at the largest scores.

    Ties at the threshold are broken by position (lower flat index kept first), so the result is deterministic.

    Args:
        scores: any shape; compared over all entries.
        k: number of entries to keep.
        threshold: the k-th largest score when the caller already knows it (skips the selection).
    """
    flat = scores.reshape(-1)
    if k >= flat.numel() or k <= 0:
        return (torch.ones_like if k > 0 else torch.zeros_like)(scores, dtype=torch.bool)
    if threshold is None:
        threshold = kth_largest(flat, k)
    mask = flat >= threshold
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:  # ties at the threshold: drop the ones with the highest index
        ties = torch.nonzero(flat == threshold).squeeze(1)
        mask[ties[ties.numel() - extra :]] = False
    return mask.reshape(scores.shape)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the 1-D tensor ``values`` (``1 <= k <= numel``), as a 0-d tensor on its device.

    ``torch.kthvalue`` (a quickselect) on the CPU. On CUDA ``kthvalue`` runs one thread block per slice, about 20×
    slower than a sort on a whole layer (PyTorch issue 75599), so there the smaller side is selected with ``topk``
    instead (unsorted) and its extreme taken: the same value.
    """
    n = values.numel()
    if not selects_by_topk(values.device):
        return torch.kthvalue(values, n - k + 1).values
    if k <= n - k + 1:
        return values.topk(k, sorted=False).values.min()
    return values.topk(n - k + 1, largest=False, sorted=False).values.max()


def selects_by_topk(device: torch.device) -> bool:
    """Whether :func:`kth_largest` selects with ``topk`` on ``device`` (CUDA) rather than ``kthvalue``."""
    return device.type == "cuda"


def keep_largest_in_groups(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask ``[rows, m]`` keeping the n largest of each row of ``groups [rows, m]`` (ties: lower index kept).

    For the small m of N:M patterns (m <= 16) every pair of the m columns is compared once, which is about twice as
    fast on CPU as a ``topk`` over a dimension of size m; larger m use ``topk``.
    """
    m = groups.shape[1]
    if m > 16:
        keep = torch.zeros_like(groups, dtype=torch.bool)
        return keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    columns = groups.T.contiguous()
    rank = torch.zeros(columns.shape, dtype=torch.uint8, device=groups.device)  # entries of the group that beat it
    for i in range(m):
        for j in range(i + 1, m):
            j_wins = columns[j] > columns[i]
            rank[i] += j_wins
            rank[j] += ~j_wins
    return (rank < n).T


class Projector:
    """Projection of score matrices ``[out, in]`` onto one sparsity pattern: the bool mask of entries to keep.

    Repeated calls (as in an iterative solver) warm-start the layer-wide threshold off CUDA: the k-th largest score
    is first looked for in a band around the previous one (the band adapts its width), ranking only the scores
    inside it. On CUDA, where counting the band costs host synchronisations, the threshold is selected directly
    (:func:`kth_largest`). The result is always the exact projection.

    Args:
        shape: ``(out, in)``.
        sparsity: fraction removed, compared over the whole layer (``per_row=False``) or within each row.
        nm: ``(n, m)``: keep the n largest of every m consecutive inputs in each row.
        per_row: with ``sparsity``, remove the same count from every row.
    """

    def __init__(
        self, shape: tuple[int, int], sparsity: float | None = None, nm: NM | None = None, per_row: bool = False
    ):
        self.shape = tuple(shape)
        self.nm, self.per_row = nm, per_row
        out_features, in_features = self.shape
        self.k = kept_count(in_features if per_row else out_features * in_features, sparsity) if nm is None else None
        self._threshold: torch.Tensor | None = None
        self._width = 0.02

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        out_features, in_features = self.shape
        if self.nm is not None:
            n, m = self.nm
            return keep_largest_in_groups(scores.reshape(-1, m), n).reshape(out_features, in_features)
        if self.per_row:
            keep = torch.zeros_like(scores, dtype=torch.bool)
            if self.k > 0:
                keep.scatter_(1, scores.topk(self.k, dim=1).indices, True)
            return keep
        flat = scores.reshape(-1)
        threshold = None
        warm = self._threshold is not None and not selects_by_topk(flat.device)  # the band search syncs on CUDA
        if warm and 0 < self.k < flat.numel():
            threshold = self._kth_largest_near(flat, self._threshold)
        if threshold is None and 0 < self.k < flat.numel():
            threshold = kth_largest(flat, self.k)
        self._threshold = threshold
        return keep_largest(scores, self.k, threshold)

    def _kth_largest_near(self, flat: torch.Tensor, guess: torch.Tensor) -> torch.Tensor | None:
        """The k-th largest entry of ``flat`` if it lies within a factor of 2 of ``guess``, else None."""
        k, width = self.k, self._width
        while width <= 1:
            above = flat > guess * (1 + width)
            n_above = int(torch.count_nonzero(above))
            if n_above < k:
                band = (flat > guess * (1 - width)) & ~above
                candidates = flat[band]
                if n_above + candidates.numel() >= k:
                    self._width = max(width / 2, 1e-3)
                    return kth_largest(candidates, k - n_above)
            width *= 4
        self._width = 0.02
        return None


def select_mask(
    scores: torch.Tensor,
    sparsity: float | None = None,
    nm: NM | None = None,
    per_row: bool = False,
) -> torch.Tensor:
    """Project ``scores [out, in]`` onto a pattern once: the bool mask of the entries to keep (see
    :class:`Projector`)."""
    return Projector(scores.shape, sparsity, nm, per_row)(scores)


def check_mask(mask: torch.Tensor, sparsity: float | None = None, nm: NM | None = None, per_row: bool = False) -> None:
    """Raise ``ValueError`` unless ``mask`` follows the pattern exactly (used by tests and callbacks)."""
    out_features, in_features = mask.shape
    if nm is not None:
        counts = mask.reshape(out_features, in_features // nm[1], nm[1]).sum(dim=2)
        if not bool((counts == nm[0]).all()):
            raise ValueError(f"mask is not {nm[0]}:{nm[1]}: a group of {nm[1]} keeps other than {nm[0]}")
    elif per_row:
        k = kept_count(in_features, sparsity)
        if not bool((mask.sum(dim=1) == k).all()):
            raise ValueError(f"mask has a row that does not keep exactly {k} weights")
    else:
        k = kept_count(mask.numel(), sparsity)
        kept = int(torch.count_nonzero(mask))
        if kept != k:
            raise ValueError(f"mask keeps {kept} weights, expected {k}")


def achieved_sparsity(mask: torch.Tensor) -> float:
    """Fraction of entries of ``mask`` that are False (removed)."""
    return 1.0 - int(torch.count_nonzero(mask)) / mask.numel()

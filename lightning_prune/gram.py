"""Streaming accumulation of the Gram matrix ``H = Σ_t x_t x_tᵀ`` of one linear layer's inputs.

The solvers take ``H`` summed (not averaged) over the valid calibration tokens, together with the token count.
"""

from __future__ import annotations

import torch

from .precision import full_precision

GRAM_DTYPES = (torch.float32, torch.float64)

#: Inputs at least this wide accumulate ``xᵀx`` as :data:`TRIANGLE_BANDS` bands of rows of its upper triangle, then
#: mirror it: 5/8 of the multiply-adds of the full product. Measured on 2 CPU cores (torch 2.13, 4096 tokens, float32):
#: 0.52 × the time of one full product at 1536 inputs, 0.76 × at 576. Narrower inputs take one product.
TRIANGLE_MIN_FEATURES = 512
TRIANGLE_BANDS = 4


class GramAccumulator:
    """Sum ``xᵀx`` over the valid tokens of every batch fed to one layer.

    Example::

        acc = GramAccumulator("model.layers.0.mlp.down_proj", in_features=1536)
        acc.add(x, valid=attention_mask.bool())  # x [batch, seq, 1536], valid [batch, seq]
        acc.check_finite()                        # once, after the last batch
        H, tokens = acc.H, acc.tokens

    :meth:`add` never waits for the device: padding rows are zeroed arithmetically (no boolean indexing, whose
    result size the host would have to read) and the token count stays a device tensor until :attr:`tokens` is
    read; NaN or Inf activations are caught by :meth:`check_finite` on the sum, once.

    Args:
        name: the layer's full name, used in error messages.
        in_features: input width ``in`` of the layer.
        device: where ``H`` lives (default CPU); inputs on another device are moved there.
        dtype: accumulation dtype, ``torch.float32`` (default) or ``torch.float64``; inputs are cast to it. With
            float64 each batch's contribution ``xᵀx`` is computed in float64, rounded to float32 precision and
            added to ``H``: sums of such terms are exact in float64 (unless one entry's contributions differ by
            more than ~2²⁹ in magnitude), so ``H`` does not depend on the order the batches are added in, nor on
            how they are split over processes whose accumulators are then summed, and it has no accumulation
            error beyond one float32 rounding per batch.

    Attributes:
        H: ``[in, in]`` running sum of ``xᵀx`` over valid tokens (zeros before the first batch).
        tokens: number of valid tokens accumulated so far (reading it waits for the device).
    """

    def __init__(
        self,
        name: str,
        in_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in GRAM_DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.name = name
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._tokens: int | torch.Tensor = 0

    @property
    def tokens(self) -> int:
        """Valid tokens accumulated so far (kept on the device by :meth:`add`; reading it waits for the device)."""
        return int(self._tokens)

    @tokens.setter
    def tokens(self, value: int) -> None:
        self._tokens = value

    def add(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Accumulate one batch of layer inputs (with autocast disabled: the sum keeps the accumulation dtype).

        Args:
            x: ``[batch, seq, in]`` or ``[tokens, in]`` (any leading shape), any float dtype.
            valid: bool mask over ``x``'s leading dimensions (``[batch, seq]`` or ``[tokens]``), True for real
                tokens; padding tokens are skipped. None: every token counts.

        Memory: a copy of ``x`` in the accumulation dtype on ``H``'s device (none when ``x`` is already that and
        ``valid`` is None).

        Raises:
            ValueError: naming ``x`` or ``valid`` for a wrong shape or dtype.
        """
        in_features = self.H.shape[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor [..., {in_features}] for layer {self.name}, got {shape}")
        rows = x.detach().reshape(-1, in_features)
        if valid is not None:
            if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.numel() != rows.shape[0]:
                shape = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
                raise ValueError(
                    f"valid must be a bool tensor over x's leading dimensions {tuple(x.shape[:-1])} "
                    f"for layer {self.name}, got {shape}"
                )
            keep = valid.reshape(-1, 1).to(self.H.device)
            rows = rows.to(device=self.H.device, dtype=self.H.dtype, copy=True)
            rows.masked_fill_(~keep, 0)  # a padding row adds nothing to xᵀx (NaN or Inf there included)
            self._tokens = self._tokens + keep.sum()
        else:
            rows = rows.to(device=self.H.device, dtype=self.H.dtype)
            self._tokens = self._tokens + rows.shape[0]
        with full_precision(rows.device):
            n = self.H.shape[0]
            step = n if n < TRIANGLE_MIN_FEATURES else -(-n // TRIANGLE_BANDS)
            for start in range(0, n, step):  # the band H[start:stop, start:], upper triangle and diagonal block
                stop = start + step
                if self.H.dtype == torch.float64:  # order-independent sum: see ``dtype``
                    self.H[start:stop, start:].add_((rows[:, start:stop].T @ rows[:, start:]).float())
                else:
                    self.H[start:stop, start:].addmm_(rows[:, start:stop].T, rows[:, start:])
            for start in range(0, n - step, step):  # mirror each band's part right of its diagonal block
                stop = start + step
                self.H[stop:, start:stop].copy_(self.H[start:stop, stop:].T)

    def check_finite(self) -> None:
        """Raise a ValueError naming the layer if a valid token's activation was NaN or Inf (or overflowed ``H``).

        A non-finite activation of input ``j`` makes ``H_jj`` non-finite, so one check of the sum replaces one per
        batch (a host synchronisation each)."""
        if not bool(torch.isfinite(self.H).all()):
            raise ValueError(f"layer {self.name}: calibration activations at its input contain NaN or Inf")

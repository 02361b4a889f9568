"""Wanda: prune by weight magnitude times input activation norm, no weight update.

Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
Models": score S_ij = |W_ij| * ||X_j||_2, compared within each output row.
"""

from __future__ import annotations

from torch import Tensor

from squeezeflow.compression.pruning.sparsity import nm_mask, row_mask


def wanda_scores(W: Tensor, x_norm: Tensor) -> Tensor:
    """W: (out, in); x_norm: (in,) = ||X_j||_2 -> S: (out, in)."""
    return W.abs() * x_norm[None, :]


def wanda_mask(W: Tensor, x_norm: Tensor, sparsity: float, n_m: tuple[int, int] | None) -> Tensor:
    """Keep-mask of W: per row, the highest scores (or the N highest in every M)."""
    S = wanda_scores(W, x_norm)  # (out, in)
    return row_mask(S, sparsity) if n_m is None else nm_mask(S, *n_m)

"""What unstructured and N:M pruning steps share: the sparsity options and the masks.

A step prunes either a fraction of each Linear's weights (`sparsity`) or with an
N:M pattern (`pattern: "2:4"`: at most N non-zero weights in every M consecutive
input columns of a row, the layout sparse tensor cores accelerate). Masks are
boolean keep-masks of the weight's shape (True = kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from squeezeflow.compression.pruning.config import (  # noqa: F401 (re-exported)
    PATTERN,
    SparsityConfig,
    input_widths,
    parse_pattern,
)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the N highest scores in every M consecutive columns of each row.

    scores: (rows, cols) with cols % m == 0 -> bool keep-mask (rows, cols).
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"an {n}:{m} pattern needs a width divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune round(sparsity * cols) lowest scores in each row (Wanda's per-output groups)."""
    rows, cols = scores.shape
    n_prune = int(round(sparsity * cols))
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if n_prune > 0:
        order = torch.argsort(scores, dim=1, stable=True)  # (rows, cols) ascending
        keep.scatter_(1, order[:, :n_prune], False)
    return keep


def is_valid_nm(W: Tensor, n: int, m: int) -> bool:
    """True when every M consecutive weights of each row hold at most N non-zeros."""
    rows, cols = W.shape
    nonzero = (W != 0).reshape(rows, cols // m, m).sum(dim=2)  # (rows, groups)
    return bool((nonzero <= n).all())

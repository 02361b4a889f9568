"""Unstructured magnitude pruning: zero the smallest |W| entries."""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude_mask(W: Tensor, sparsity: float) -> Tensor:
    """Boolean keep-mask of W's shape with exactly round(sparsity * numel) zeros."""
    n_prune = int(round(sparsity * W.numel()))
    keep = torch.ones(W.numel(), dtype=torch.bool)
    if n_prune > 0:
        order = torch.argsort(W.detach().abs().reshape(-1), stable=True)
        keep[order[:n_prune]] = False
    return keep.reshape(W.shape)

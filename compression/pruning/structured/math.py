"""Structured pruning: rank attention heads and MLP channels by the energy they add
to their layer's output on calibration data, then slice them out of the matrices.

A head h writes W_o[:, h] x_h into the residual stream (x_h: its attention output,
head_dim wide), so its importance is E||W_o[:, h] x_h||^2 = tr(W_h C_h W_h^T) with
C_h = E[x_h x_h^T]. An MLP channel c writes W_down[:, c] a_c, importance
E[a_c^2] ||W_down[:, c]||^2. (The same output-energy criterion as Wanda, taken over
whole heads and channels; cf. LLM-Pruner, Ma et al. 2023, and FLAP, An et al. 2024.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def head_importance(W_o: Tensor, C: Tensor) -> Tensor:
    """W_o: (hidden, heads * d); C: (heads, d, d) = E[x_h x_h^T] -> (heads,)."""
    heads, d, _ = C.shape
    W_h = W_o.reshape(W_o.shape[0], heads, d).permute(1, 0, 2)  # (heads, hidden, d)
    return torch.einsum("hod,hde,hoe->h", W_h, C, W_h)


def channel_importance(W_down: Tensor, mean_sq: Tensor) -> Tensor:
    """W_down: (hidden, channels); mean_sq: (channels,) = E[a_c^2] -> (channels,)."""
    return mean_sq * (W_down**2).sum(dim=0)


def keep_lowest_removed(importance: Tensor, remove: int) -> Tensor:
    """Sorted indices of the units kept after removing the `remove` least important."""
    order = torch.argsort(importance, stable=True)  # ascending
    return torch.sort(order[remove:]).values


def unit_indices(units: Tensor, width: int) -> Tensor:
    """Rows/columns of units (heads of `width` rows each): (len(units) * width,)."""
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def slice_linear(linear: nn.Linear, rows: Tensor | None = None, columns: Tensor | None = None) -> nn.Linear:
    """A new Linear holding only `rows` (outputs) and `columns` (inputs) of `linear`."""
    W = linear.weight.detach()  # (out, in)
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        W = W[rows]
        b = b[rows] if b is not None else None
    if columns is not None:
        W = W[:, columns]
    sliced = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        sliced.weight.copy_(W)
        if b is not None and sliced.bias is not None:
            sliced.bias.copy_(b)
    return sliced

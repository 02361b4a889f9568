"""QMoE's ternary quantization (Frantar & Alistarh 2023, "QMoE: Practical Sub-1-Bit
Compression of Trillion-Parameter Models").

Each row r of W: (out, in) gets the grid {min_r, 0, max_r}, min_r = min(0, min_j W[r, j])
and max_r = max(0, max_j W[r, j]) (the paper's ternary `Quantizer`: its `zero` and
`scale` are the row's min and max). Rounding to nearest on it: w > max_r / 2 -> max_r,
w < min_r / 2 -> min_r, else 0. The paper's point is that data-dependent rounding
(GPTQ, run with this grid) beats round-to-nearest on the layer's output and leaves
~90% of the codes zero on its models, which the dictionary coding then turns into
well under one bit per weight.

GPTQ here is the repository's one copy (`quantization/gptq/math.gptq_sweep`): this
module only says how a column is rounded. QMoE's defaults: 10% dampening (its
`--percdamp .1`) and, for an expert no calibration token was routed to, the identity
Hessian, which makes GPTQ round to nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.compression.moe.qmoe.weight import RowLevels, row_levels
from squeezeflow.compression.quantization.gptq.math import drop_dead_inputs, gptq_sweep


@dataclass(frozen=True)
class TernaryResult:
    codes: Tensor  # (out, in) int8 in {-1, 0, 1}
    levels: RowLevels  # each row's stored [min, max]
    row_losses: Tensor  # (out,) GPTQ's objective per row

    def dequantize(self) -> Tensor:
        return ternary_values(self.codes, self.levels.values())


def ternary_grid(W: Tensor) -> Tensor:
    """W: (..., out, in) -> (..., out, 2): each row's stored [min(0, row min), max(0, row max)]
    (`weight.row_levels`: within 2.9% of the exact values)."""
    return row_levels(W).values()


def round_ternary(W: Tensor, grid: Tensor) -> Tensor:
    """Round to nearest on each row's {min, 0, max}: W (..., out, in), grid (..., out, 2)
    -> codes (..., out, in) int8 in {-1, 0, 1}."""
    low, high = grid[..., 0:1], grid[..., 1:2]  # (..., out, 1)
    up = W > high / 2
    down = W < low / 2
    return up.to(torch.int8) - down.to(torch.int8)


def ternary_values(codes: Tensor, grid: Tensor) -> Tensor:
    """Codes (..., out, in) in {-1, 0, 1} on grids (..., out, 2) -> values (..., out, in)."""
    low, high = grid[..., 0:1], grid[..., 1:2]
    codes = codes.to(torch.float32)
    return torch.where(codes > 0, high, torch.where(codes < 0, low, torch.zeros_like(codes)))


def gptq_ternary(
    W: Tensor, H: Tensor, damp: float = 0.1, block_size: int = 128, act_order: bool = False
) -> TernaryResult:
    """GPTQ (Frantar et al. 2022, Alg. 1) with QMoE's per-row ternary grid.

    W: (out, in), H: (in, in) the inputs' Hessian 2/n X^T X (all zeros: no calibration
    data, then the identity, i.e. round to nearest). The grid is found on W before any
    update, as GPTQ's per-row grids are.
    """
    W = W.detach().to(torch.float32, copy=True)  # (out, in)
    H = H.detach().to(torch.float32, copy=True)  # (in, in)
    if not bool(H.diagonal().any()):
        H = torch.eye(W.shape[1])  # an expert no token reached: round to nearest (QMoE)
    drop_dead_inputs(W, H)
    levels = row_levels(W)
    grid = levels.values()  # (out, 2) [min, max]
    low_t, high_t = grid[:, 0].contiguous(), grid[:, 1].contiguous()  # (out,)
    low_half, high_half = low_t / 2, high_t / 2
    zeros = torch.zeros_like(low_t)

    def round_column(column: int, W_ahead: Tensor, code: Tensor, value: Tensor) -> None:
        w = W_ahead[0]  # (out,)
        up, down = w > high_half, w < low_half
        torch.where(up, high_t, torch.where(down, low_t, zeros), out=value)
        torch.sub(up.to(code.dtype), down.to(code.dtype), out=code)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    sweep = gptq_sweep(W, H, round_column, damp=damp, block_size=block_size, perm=perm)
    return TernaryResult(codes=sweep.codes.to(torch.int8).contiguous(), levels=levels, row_losses=sweep.row_losses)

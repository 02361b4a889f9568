"""PV-Tuning on an integer grid: pure tensors in, tensors out.

Malinovskii et al. 2024, "PV-Tuning: Beyond Straight-Through Estimation for Extreme
LLM Compression". A quantized weight x is a partition P (which grid point, i.e. which
code, each weight takes) and the values V of the grid points (here the scales of
`qweight.QuantizedWeight`: value of code c in row i, group g = s[i, g] (c - z[i, g])).
PV-Tuning minimizes the loss phi(x) by alternating

- a V step: P fixed, the continuous parameters descend phi (Adam). The gradient of a
  scale is the chain rule through dequantization with the codes held fixed:
  d phi / d s[i, g] = sum over columns j of group g of G[i, j] (C[i, j] - z[i, g]);
- a P step: V fixed, the codes change. The linearized subspace P step (Sec. 3.3) rounds
  a gradient step onto the grid on a subspace S of the coordinates only. As in the
  authors' code, the gradient steps accumulate in a full-precision buffer Y updated by
  Adam with the gradient of the dequantized weight, and the new codes are the grid
  points nearest to Y on S, at most a fraction tau of the coordinates; every other
  code is kept. Their code takes S as the coordinates farthest from their grid point,
  |Y - W_hat|, a proxy needed for vector codebooks. On a scalar grid the P step's
  objective ||W(C') - Y||^2 is separable, so S here is its exact minimizer under the
  budget: the coordinates whose re-rounding lowers it most. That never spends the
  budget on a coordinate that would keep its code (2-bit test LM, 200 steps: perplexity
  2.778 vs 2.789 farthest-first from RTN, 2.783 vs 2.785 from GPTQ; benchmarks/README.md).

tau = 1 re-rounds every coordinate each step: straight-through estimation (Y is the
latent weight, its rounding the forward weight, its gradient the rounded one's), the
baseline PV-Tuning improves on.

Shapes: W_hat, Y, C, G: (out, in); s, z: (out, groups); g_idx: (in,) group of each
column; input_scale: (in,) SmoothQuant factor or None (the weight is then divided by it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dequantize(C: Tensor, s: Tensor, z: Tensor, g_idx: Tensor, input_scale: Tensor | None = None) -> Tensor:
    """W_hat = s[:, g_idx] * (C - z[:, g_idx]) (/ input_scale): differentiable in s."""
    W_hat = s[:, g_idx] * (C.to(s.dtype) - z[:, g_idx].to(s.dtype))  # (out, in)
    return W_hat if input_scale is None else W_hat / input_scale


def scale_gradient(G: Tensor, C: Tensor, z: Tensor, g_idx: Tensor, groups: int,
                   input_scale: Tensor | None = None) -> Tensor:
    """d phi / d s: the gradient G of the dequantized weight pulled back to the scales."""
    # G, C: (out, in); z: (out, groups)
    offsets = C.to(G.dtype) - z[:, g_idx].to(G.dtype)  # (out, in): C - z
    if input_scale is not None:
        offsets = offsets / input_scale
    grad = torch.zeros(G.shape[0], groups, dtype=G.dtype, device=G.device)  # (out, groups)
    return grad.index_add_(1, g_idx, G * offsets)


def nearest_codes(Y: Tensor, s: Tensor, z: Tensor, g_idx: Tensor, bits: int,
                  input_scale: Tensor | None = None) -> Tensor:
    """The code of the grid point nearest to each weight of Y (same dtype as z)."""
    W = Y if input_scale is None else Y * input_scale  # (out, in): the grid's own space
    codes = torch.round(W / s[:, g_idx]) + z[:, g_idx].to(W.dtype)  # (out, in)
    return codes.clamp(0, 2**bits - 1).to(z.dtype)


def changed_budget(tau: float, count: int) -> int:
    """Coordinates a P step may re-round: ceil(tau * n) (at least one)."""
    return max(1, min(count, math.ceil(tau * count)))


def p_step(C: Tensor, Y: Tensor, W_hat: Tensor, s: Tensor, z: Tensor, g_idx: Tensor, bits: int,
           tau: float, input_scale: Tensor | None = None) -> Tensor:
    """New codes: argmin ||W(C') - Y||^2 over codes C' differing from C in <= ceil(tau * n) places.

    The objective is separable, so the minimizer re-rounds the coordinates whose
    re-rounding lowers it most (gain = (Y - W_hat)^2 - (Y - W_new)^2, >= 0, and 0 where the
    code would not change). Returns a new tensor; C is not modified.
    """
    # C, Y, W_hat: (out, in)
    rounded = nearest_codes(Y, s, z, g_idx, bits, input_scale)  # (out, in)
    if tau >= 1.0:
        return rounded.to(C.dtype)
    W_new = dequantize(rounded, s, z, g_idx, input_scale)  # (out, in): every code re-rounded
    gain = ((Y - W_hat).square() - (Y - W_new).square()).reshape(-1)  # (out * in,) >= 0
    S = torch.topk(gain, changed_budget(tau, gain.numel()), sorted=False).indices  # (|S|,)
    new = C.clone().reshape(-1)
    new[S] = rounded.reshape(-1)[S].to(C.dtype)
    return new.reshape(C.shape)

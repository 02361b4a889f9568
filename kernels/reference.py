"""Plain-torch references: what every packed op must compute, written for clarity.

Weights follow the integer layout of `QuantizedWeight` (GPTQ-style):

    W[i, j] = scale[i, g_idx[j]] * (codes[i, j] - zero[i, g_idx[j]])

and a Linear computes y = x @ W.T + bias. W8A8 additionally rounds the input to
int8 per token (row) with a dynamic scale t = max|x_row| / 127.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127  # symmetric int8 grid [-127, 127]: -128 is unused so that +-amax are exact


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor) -> Tensor:
    """W: (out, in) fp32 from codes (out, in), scale/zero (out, groups), g_idx (in,)."""
    return scale[:, g_idx].to(torch.float32) * (
        codes.to(torch.float32) - zero[:, g_idx].to(torch.float32)
    )


def linear_reference(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    g_idx: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
) -> Tensor:
    """Weight-only quantized Linear in fp32: x (..., in) -> (..., out).

    `input_scale` (in,) is a smoothing factor the weight was multiplied by
    (SmoothQuant); the input is divided by it, so the product is unchanged.
    """
    W = dequantize(codes, scale, zero, g_idx)  # (out, in)
    x = x.to(torch.float32)
    if input_scale is not None:
        x = x / input_scale
    return torch.nn.functional.linear(x, W, None if bias is None else bias.to(torch.float32))


def quantize_per_token(x: Tensor, levels: int = INT8_MAX) -> tuple[Tensor, Tensor]:
    """Symmetric codes in [-levels, levels] per row of x: x (..., k) -> q (..., k) int8,
    t (..., 1) fp32."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    t = amax.to(torch.float32) / levels  # (..., 1)
    q = torch.round(x / t).clamp(-levels, levels).to(torch.int8)
    return q, t


def w8a8_reference(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
    levels: int = INT8_MAX,
) -> Tensor:
    """int8 x int8 Linear with per-token activation scales, computed in float64.

    x: (..., in); weight: (out, in) int8; weight_scale: (out,); input_scale: (in,);
    levels: 127 for int8 activations, 63 for the 7-bit grid of the reduced-range kernel.
    Float64 keeps the integer dot products exact (|sum| < 2**53).
    """
    if input_scale is not None:
        x = x / input_scale
    q, t = quantize_per_token(x.to(torch.float32), levels)  # (..., in), (..., 1)
    accumulated = q.to(torch.float64) @ weight.to(torch.float64).T  # (..., out)
    y = accumulated * t.to(torch.float64) * weight_scale.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)

"""W8A8 weights: symmetric int8 per output channel, optionally of a smoothed W * s."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from squeezeflow.compression.quantization.qweight import QuantizedWeight
from squeezeflow.compression.quantization.rtn.math import quantize_rtn

ACTIVATION_BITS = 8  # int8 x int8 -> int32 is the integer matmul CPUs (VNNI, AMX) accelerate


def quantize_w8a8(W: Tensor, input_scale: Tensor | None = None) -> QuantizedWeight:
    """W: (out, in); input_scale: (in,) SmoothQuant factor s or None.

    The codes encode W * s (per-channel symmetric int8, the layout `torch._int_mm`
    needs); `dequantize()` divides s back out, so the dense model stays equivalent.
    """
    W = W.detach().to(torch.float32)
    smoothed = W if input_scale is None else W * input_scale  # (out, in)
    quantized = quantize_rtn(smoothed, bits=8, group_size=None, symmetric=True)
    return replace(quantized, activation_bits=ACTIVATION_BITS, input_scale=input_scale)

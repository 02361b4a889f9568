"""FineQuant-style adaptive group size (Kim et al. 2023): per weight matrix, the
coarsest group size whose round-to-nearest error stays under a threshold.

Coarse groups cost fewer scales (and run faster); matrices with outliers need fine
groups to keep their error down. Starting from one group per row, the group size
halves until the relative weight error ||W - Q|| / ||W|| is at most `max_error`; a
matrix that never gets there takes the finest size tried.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.compression.quantization.qweight import QuantizedWeight
from squeezeflow.compression.quantization.rtn.math import quantize_rtn


@dataclass(frozen=True)
class AdaptiveResult:
    quantized: QuantizedWeight
    error: float  # relative weight error of the chosen size


def candidate_group_sizes(columns: int, min_group_size: int) -> list[int]:
    """Whole row first, then powers of two below it down to `min_group_size`."""
    sizes = [columns]
    size = 1 << ((columns - 1).bit_length() - 1) if columns > 1 else 1  # largest power of 2 < columns
    if size == columns:
        size //= 2
    while size >= min_group_size:
        sizes.append(size)
        size //= 2
    return sizes


def adaptive_group_quantize(
    W: Tensor, bits: int, symmetric: bool, max_error: float, min_group_size: int
) -> AdaptiveResult:
    """Quantize W: (out, in) with the coarsest group size meeting `max_error`."""
    W = W.detach().to(torch.float32)
    norm = W.norm().clamp(min=1e-12)
    sizes = candidate_group_sizes(int(W.shape[1]), min_group_size)
    for size in sizes:
        quantized = quantize_rtn(W, bits, size, symmetric)
        error = float((W - quantized.dequantize()).norm() / norm)
        if error <= max_error:
            break
    return AdaptiveResult(quantized=quantized, error=error)

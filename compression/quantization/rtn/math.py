"""Round-to-nearest weight quantization: each group rounded onto its own grid."""

from __future__ import annotations

import torch
from torch import Tensor

from squeezeflow.compression.quantization.qweight import (
    QuantizedWeight,
    group_index,
    qparams,
    quantize_codes,
)


def quantize_rtn(W: Tensor, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Quantize W: (out, in) with one grid per output row and input group.

    `group_size=None` means per-channel (one group spanning the whole row). A width
    that `group_size` does not divide gets a shorter last group.
    """
    W = W.detach().to(torch.float32)
    rows, columns = W.shape
    size = columns if group_size is None else min(group_size, columns)
    g_idx = group_index(columns, size)  # (in,)
    groups = int(g_idx[-1]) + 1
    scale = torch.empty(rows, groups)
    zero = torch.empty(rows, groups)
    codes = torch.empty(rows, columns, dtype=torch.uint8)
    for g in range(groups):
        cols = slice(g * size, min((g + 1) * size, columns))
        s, z = qparams(W[:, cols], bits, symmetric)  # (out,), (out,)
        scale[:, g], zero[:, g] = s, z
        codes[:, cols] = quantize_codes(W[:, cols], s, z, bits).to(torch.uint8)
    return QuantizedWeight(
        codes=codes,
        scale=scale,
        zero=zero.to(torch.uint8),
        g_idx=g_idx,
        bits=bits,
        group_size=size,
        symmetric=symmetric,
    )

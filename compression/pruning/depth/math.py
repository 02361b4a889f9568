"""Depth pruning: a block whose output is nearly its input does little; remove it.

Block influence (ShortGPT, Men et al. 2024; the depth criterion FoldGPT starts
from): BI_i = 1 - E_t[cos(x_in_t, x_out_t)] over calibration tokens t. Blocks with
the lowest influence are removed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from squeezeflow.compression.step import real_tokens


class InfluenceMeter:
    """Running mean of 1 - cos(input, output) over the tokens a block sees."""

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def add(self, x_in: Tensor, x_out: Tensor) -> None:
        a = real_tokens(x_in.detach()).to(torch.float64)  # (tokens, hidden), no padding
        b = real_tokens(x_out.detach()).to(torch.float64)  # (tokens, hidden)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # (tokens,)
        self.total += float((1 - cos).sum())
        self.tokens += a.shape[0]

    def influence(self) -> float:
        return self.total / max(self.tokens, 1)


def least_influential(influence: list[float], remove: int) -> list[int]:
    """Indices of the `remove` blocks with the lowest influence, ascending by index."""
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return sorted(order[:remove])

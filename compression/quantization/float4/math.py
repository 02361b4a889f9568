"""The two 4-bit float codebooks of bitsandbytes, built from their definitions.

- NF4 (QLoRA, Dettmers et al. 2023, Sec. 3 and App. E): the quantiles of N(0, 1)
  normalized to [-1, 1], asymmetric so that zero is exact: 8 positive quantiles
  between 0.5 and `NF4_OFFSET`, 7 negative ones, and 0. Information-theoretically
  optimal for normally distributed weights.
- FP4: a sign bit and 3 bits of E2M1 magnitude, normalized by the largest (6), as
  bitsandbytes' dequantization table defines them, including its subnormal 1/192
  (E2M1's own would be 1/12) and both +0 and -0.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (1 - 1/(2*15) + 1 - 1/(2*16)) / 2: the mean of the outermost quantiles of 15 and 16
# levels, which keeps the extreme quantile finite (QLoRA App. E)
NF4_OFFSET = 0.9677083


def nf4_codebook() -> Tensor:
    """16 ascending NF4 values in [-1, 1] with an exact 0."""
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = values / values.abs().max()
    return torch.sort(values).values.to(torch.float32)


def fp4_codebook() -> Tensor:
    """16 ascending FP4 values (bitsandbytes' E2M1 table), +0 and -0 both present."""
    normals = torch.tensor([1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)  # 2^(e-1)(1 + m/2)
    magnitudes = torch.cat([
        torch.zeros(1, dtype=torch.float64),
        torch.tensor([1 / 192], dtype=torch.float64),  # bitsandbytes' subnormal code 0b001
        normals / 6.0,
    ])  # (8,)
    values = torch.cat([-magnitudes, magnitudes])
    return torch.sort(values).values.to(torch.float32)


CODEBOOKS = {"nf4": nf4_codebook, "fp4": fp4_codebook}

"""The stored value of a BitStack Linear: its residual blocks, column scales and their ranks.

    W ~= (sum over loaded blocks i of sign_i * (U_i V_i^T)) diag(s)^-1

`order[i]` is block i's position in the model-wide importance order (the step ranks
every block of every Linear it decomposed): loading under a memory budget takes the
blocks with the smallest positions, a prefix of each Linear's stack. A value read under
a budget holds only the loaded blocks; `niter` still says how many were decomposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.compression.quantization.bitstack.math import block_bytes, reconstruct

BITSTACK_ATTR = "squeezeflow_bitstack"  # attribute carrying a Linear's BitStackWeight


@dataclass(frozen=True)
class BitStackWeight:
    signs: Tensor  # (blocks, ceil(out * in / 8)) uint8 packed sign bits (bit set = negative)
    U: Tensor  # (blocks, out, k) fp16
    V: Tensor  # (blocks, k, in) fp16
    scale: Tensor  # (in,) float32, fp16-exact activation-aware column scales s
    order: Tensor  # (blocks,) int64 positions in the model-wide importance order, increasing
    niter: int  # blocks the decomposition made (>= blocks held here)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[1]), int(self.V.shape[2]))

    @property
    def rank(self) -> int:
        return int(self.U.shape[2])

    @property
    def blocks(self) -> int:
        return int(self.U.shape[0])

    @property
    def block_bytes(self) -> int:
        """Bytes of one block on disk (signs + fp16 factors); the same for every block."""
        return block_bytes(*self.shape, self.rank)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return reconstruct(self.signs, self.U, self.V, self.scale).to(dtype)

    def prefix(self, blocks: int) -> BitStackWeight:
        """The first `blocks` blocks (what a smaller memory budget loads)."""
        if not 0 < blocks <= self.blocks:
            raise ValueError(f"blocks must be in 1..{self.blocks}, got {blocks}")
        return BitStackWeight(
            signs=self.signs[:blocks].contiguous(), U=self.U[:blocks].contiguous(),
            V=self.V[:blocks].contiguous(), scale=self.scale, order=self.order[:blocks].clone(),
            niter=self.niter,
        )

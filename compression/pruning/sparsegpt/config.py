"""The `sparsegpt` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from squeezeflow.compression.config import Needs
from squeezeflow.compression.pruning.config import SparsityConfig

SUPPORTED_BITS = (2, 3, 4, 8)


class SparseGPTConfig(SparsityConfig):
    kind: Literal["sparsegpt"] = "sparsegpt"
    needs: ClassVar[Needs] = Needs.LAYERWISE
    bits: int | None = None  # None keeps fp weights; 4 with 50% sparsity is the paper's joint setting
    group_size: int | None = None  # input columns per grid when quantizing; None = per row
    symmetric: bool = True  # symmetric grids are what fast int kernels expect
    block_size: int = Field(128, ge=1)  # columns per lazy-update block (the paper's B)
    damp: float = Field(0.01, gt=0.0)  # keeps H positive definite on rank-deficient calibration
    # true: each group of Linears sharing an input is pruned before the next group's
    # Hessian is taken (the reference code's --true-sequential), in one calibration
    # forward per block (compression/sequential.py); as gptq's `sequential`
    sequential: bool = False

    @field_validator("bits")
    @classmethod
    def _bits_supported(cls, bits: int | None) -> int | None:
        if bits is not None and bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))} or null")
        return bits

    @field_validator("group_size")
    @classmethod
    def _group_positive(cls, group_size: int | None) -> int | None:
        if group_size is not None and group_size < 1:
            raise ValueError("group_size must be a positive integer or null (per row)")
        return group_size

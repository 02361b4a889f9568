"""Config fields shared by the integer weight quantizers (rtn, gptq, finequant).

One definition of what `bits` and `group_size` accept, so every quantizer's YAML
errors read the same: `stages.0.steps.0.bits: bits must be one of 2, 3, 4, 8 (got 5)`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

SUPPORTED_BITS = (2, 3, 4, 8)  # what the packed artifact and the kernels store


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def _check_group_size(group_size: int | None) -> int | None:
    if group_size is not None and group_size < 1:
        raise ValueError("group_size must be a positive integer or null (per output channel)")
    return group_size


Bits = Annotated[int, AfterValidator(_check_bits)]
GroupSize = Annotated[int | None, AfterValidator(_check_group_size)]

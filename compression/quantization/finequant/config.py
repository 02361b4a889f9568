"""The `finequant` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from squeezeflow.compression.config import Needs, StepConfig
from squeezeflow.compression.quantization.fields import Bits


class FineQuantConfig(StepConfig):
    kind: Literal["finequant"] = "finequant"
    needs: ClassVar[Needs] = Needs.NOTHING
    bits: Bits = 4  # the format FineQuant targets: 4-bit weights, fp16 activations
    max_error: float = Field(0.12, gt=0.0, lt=1.0)  # a g128-like budget on Gaussian weights
    min_group_size: int = Field(32, ge=1)  # finer groups cost more in scales than they save
    symmetric: bool = True

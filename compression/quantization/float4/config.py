"""The `float4` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from squeezeflow.compression.config import Needs, StepConfig


class Float4Config(StepConfig):
    kind: Literal["float4"] = "float4"
    needs: ClassVar[Needs] = Needs.NOTHING
    format: Literal["nf4", "fp4"] = "nf4"  # NF4 fits normally distributed weights best
    block_size: int = Field(64, ge=1)  # 64: bitsandbytes' default, 0.25 extra bits per weight

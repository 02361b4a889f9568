"""The `smoothquant` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from squeezeflow.compression.config import Needs, StepConfig


class SmoothQuantConfig(StepConfig):
    kind: Literal["smoothquant"] = "smoothquant"
    needs: ClassVar[Needs] = Needs.CALIBRATION
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # 0.5: the paper's choice for OPT/BLOOM/Llama
    fold: bool = True  # fold into preceding norms where exact; false keeps every factor runtime

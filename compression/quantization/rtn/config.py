"""The `rtn` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from squeezeflow.compression.config import Needs, StepConfig
from squeezeflow.compression.quantization.fields import Bits, GroupSize


class RTNConfig(StepConfig):
    kind: Literal["rtn"] = "rtn"
    needs: ClassVar[Needs] = Needs.NOTHING
    bits: Bits = 8  # 8 bits keeps encoders within ~1e-3 of fp32 fidelity
    group_size: GroupSize = None  # None = per output channel; 128 is the usual 4-bit choice
    symmetric: bool = True  # symmetric grids are what fast int kernels expect

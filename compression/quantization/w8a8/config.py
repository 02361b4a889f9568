"""The `w8a8` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from squeezeflow.compression.config import Needs, StepConfig


class W8A8Config(StepConfig):
    kind: Literal["w8a8"] = "w8a8"
    needs: ClassVar[Needs] = Needs.NOTHING

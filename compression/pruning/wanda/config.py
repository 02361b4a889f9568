"""The `wanda` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from squeezeflow.compression.config import Needs
from squeezeflow.compression.pruning.config import SparsityConfig


class WandaConfig(SparsityConfig):
    kind: Literal["wanda"] = "wanda"
    needs: ClassVar[Needs] = Needs.LAYERWISE

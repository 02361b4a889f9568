"""The `rps` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from squeezeflow.compression.config import Needs, StepConfig

Mapping = Literal["randomfold", "identity"]  # how weight positions index the shared array


class RPSConfig(StepConfig):
    kind: Literal["rps"] = "rps"
    needs: ClassVar[Needs] = Needs.NOTHING
    changes_structure: ClassVar[bool] = True  # Linears become RPSLinears on one shared z
    ratio: float = Field(0.5, gt=0.0, le=1.0)  # |z| / targeted weights; 0.5 halves them
    seed: int = Field(0, ge=0)  # the map (chunk order, signs) is regenerated from it, never stored
    chunk_size: int = Field(64, ge=1)  # Z: 64 consecutive weights stay together (256 B of fp32)
    mapping: Mapping = "randomfold"  # "identity": h(P) = P mod |z|, g = +1 (folding, no hashing)

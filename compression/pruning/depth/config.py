"""The `depth` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import Needs, StepConfig

PER_LAYER_CONFIG_LISTS = ("layer_types",)  # config lists with one entry per block


class DepthConfig(StepConfig):
    kind: Literal["depth"] = "depth"
    needs: ClassVar[Needs] = Needs.CALIBRATION
    changes_structure: ClassVar[bool] = True
    remove: int = Field(1, ge=1)  # one block is the smallest change depth pruning can make
    fraction: float | None = Field(None, gt=0.0, lt=1.0)  # replaces `remove` when given

    @model_validator(mode="after")
    def _one_amount(self) -> DepthConfig:
        if self.fraction is not None and "remove" in self.model_fields_set:
            raise ValueError("give either remove or fraction, not both")
        return self

    def blocks_removed(self, blocks: int) -> int:
        return self.remove if self.fraction is None else int(round(self.fraction * blocks))

    def check_model(self, config: Any) -> Any:
        blocks = getattr(config, "num_hidden_layers", None)
        if not isinstance(blocks, int):
            raise ValueError(f"remove: model type {config.model_type!r} has no num_hidden_layers")
        removed = self.blocks_removed(blocks)
        field = "remove" if self.fraction is None else "fraction"
        if removed >= blocks:
            raise ValueError(
                f"{field}: {removed} blocks removed but the model has {blocks} "
                "(num_hidden_layers); at least one must remain"
            )
        if removed == 0:
            raise ValueError(f"fraction: {self.fraction} of {blocks} blocks rounds to no block")
        after = copy.deepcopy(config)
        after.num_hidden_layers = blocks - removed
        return after

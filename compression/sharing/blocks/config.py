"""The `share` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from squeezeflow.compression.config import Needs, StepConfig


class ShareConfig(StepConfig):
    kind: Literal["share"] = "share"
    needs: ClassVar[Needs] = Needs.CALIBRATION
    changes_structure: ClassVar[bool] = True
    group_size: int = Field(2, ge=2)  # 2 halves the block weights; FoldGPT's groups are 2-4

    def check_model(self, config: Any) -> Any:
        blocks = getattr(config, "num_hidden_layers", None)
        if not isinstance(blocks, int):
            raise ValueError(f"group_size: model type {config.model_type!r} has no num_hidden_layers")
        if self.group_size > blocks:
            raise ValueError(
                f"group_size: {self.group_size} blocks per group but the model has {blocks} "
                "(num_hidden_layers)"
            )
        return config

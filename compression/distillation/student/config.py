"""The `student` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import Needs, StepConfig


class StudentConfig(StepConfig):
    kind: Literal["student"] = "student"
    needs: ClassVar[Needs] = Needs.NOTHING
    changes_structure: ClassVar[bool] = True
    keep_every: int | None = Field(2, ge=2)  # 2 halves the depth, as DistilBERT does
    keep: tuple[int, ...] | None = None  # explicit block indices; replaces keep_every

    @model_validator(mode="after")
    def _one_choice(self) -> StudentConfig:
        if self.keep is not None:
            if "keep_every" in self.model_fields_set and self.keep_every is not None:
                raise ValueError("give either keep or keep_every, not both")
            if not self.keep:
                raise ValueError("keep: the student needs at least one block")
            if list(self.keep) != sorted(set(self.keep)) or min(self.keep) < 0:
                raise ValueError(f"keep: block indices must be ascending, unique and >= 0, got {list(self.keep)}")
        elif self.keep_every is None:
            raise ValueError("keep_every: give keep_every or keep")
        return self

    def kept(self, blocks: int) -> list[int]:
        if self.keep is not None:
            return list(self.keep)
        assert self.keep_every is not None
        from squeezeflow.compression.distillation.student.math import every_kth  # imports torch

        return every_kth(blocks, self.keep_every)

    def check_model(self, config: Any) -> Any:
        blocks = getattr(config, "num_hidden_layers", None)
        if not isinstance(blocks, int):
            raise ValueError(f"keep: model type {config.model_type!r} has no num_hidden_layers")
        kept = self.kept(blocks)
        if max(kept) >= blocks:
            raise ValueError(
                f"keep: block {max(kept)} does not exist; the model has {blocks} blocks "
                f"(0..{blocks - 1})"
            )
        if len(kept) == blocks:
            raise ValueError(f"keep_every: {self.keep_every} keeps all {blocks} blocks")
        after = copy.deepcopy(config)
        after.num_hidden_layers = len(kept)
        return after

"""`student`: a smaller model made from the teacher by keeping some of its blocks.

The kept blocks keep the teacher's weights (as do the embeddings, final norm and
head); the config's `num_hidden_layers` shrinks to match. It changes the model's
structure, so it is alone in its stage; a `distill` stage after it trains the
student against the base model.

```yaml
- kind: student
  keep_every: 2      # blocks 0, 2, 4, ...
- kind: student
  keep: [0, 3, 5]    # or exactly these blocks
```
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.config import StepConfig
from squeezeflow.compression.distillation.student.math import every_kth, keep_blocks
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.step import Needs, Step, StepReport

log = logging.getLogger(__name__)


class StudentConfig(StepConfig):
    kind: Literal["student"] = "student"
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


@register_step(StudentConfig)
class StudentStep(Step[StudentConfig]):
    needs = Needs.NOTHING
    changes_structure = True

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        self.kept: list[int] = []

    def select(self, root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        """The model's blocks, by full name."""
        name, blocks = find_blocks(root)
        full = f"{prefix}.{name}" if prefix else name
        return {f"{full}.{i}": block for i, block in enumerate(blocks)}

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        """Choose the blocks to keep; `restructure` cuts the others."""
        names = list(modules)
        self.kept = self.config.kept(len(names))
        if max(self.kept) >= len(names):
            raise ValueError(f"keep: block {max(self.kept)} does not exist; the model has {len(names)} blocks")
        per_module = {name: {"kept": float(index in self.kept)} for index, name in enumerate(names)}
        return StepReport(kind=self.config.kind, per_module=per_module)

    def restructure(self, model: nn.Module) -> None:
        keep_blocks(model, self.kept)
        log.info("student: kept blocks %s", self.kept)

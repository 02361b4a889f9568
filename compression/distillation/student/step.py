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

import logging

from torch import nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.distillation.student.config import StudentConfig
from squeezeflow.compression.distillation.student.math import keep_blocks
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.step import Step, StepReport

log = logging.getLogger(__name__)


@register_step(StudentConfig)
class StudentStep(Step[StudentConfig]):
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

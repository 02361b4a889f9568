"""`magnitude`: unstructured pruning of the smallest-magnitude weights per layer.

```yaml
- kind: magnitude
  sparsity: 0.5      # fraction of each Linear's weights set to zero, in [0, 1)
```
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.config import StepConfig
from squeezeflow.compression.pruning.magnitude.math import magnitude_mask
from squeezeflow.compression.step import Needs, Step, StepReport


class MagnitudeConfig(StepConfig):
    kind: Literal["magnitude"] = "magnitude"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)  # 0.5 is where dense kernels stop paying off


@register_step(MagnitudeConfig)
class MagnitudeStep(Step[MagnitudeConfig]):
    needs = Needs.NOTHING

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        per_module = {}
        for name, module in modules.items():
            assert isinstance(module, nn.Linear)
            W = module.weight.detach()  # W: (out, in)
            mask = magnitude_mask(W, self.config.sparsity)
            with torch.no_grad():
                module.weight.mul_(mask)
            per_module[name] = {"sparsity": float((module.weight == 0).float().mean())}
        return StepReport(kind=self.config.kind, per_module=per_module)

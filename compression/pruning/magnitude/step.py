"""`magnitude`: unstructured or N:M pruning of the smallest-magnitude weights per layer.

```yaml
- kind: magnitude
  sparsity: 0.5      # fraction of each Linear's weights set to zero, in [0, 1)
- kind: magnitude
  pattern: "2:4"     # N:M instead: keep the 2 largest of every 4 consecutive input weights
```
"""

from __future__ import annotations

import torch
from torch import nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.pruning.magnitude.config import MagnitudeConfig
from squeezeflow.compression.pruning.magnitude.math import magnitude_mask
from squeezeflow.compression.pruning.sparsity import nm_mask
from squeezeflow.compression.step import Step, StepReport


@register_step(MagnitudeConfig)
class MagnitudeStep(Step[MagnitudeConfig]):
    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        per_module = {}
        for name, module in modules.items():
            assert isinstance(module, nn.Linear)
            W = module.weight.detach()  # W: (out, in)
            n_m = self.config.n_m
            if n_m is None:
                mask = magnitude_mask(W, self.config.sparsity)
            else:
                mask = nm_mask(W.abs(), *n_m)
            with torch.no_grad():
                module.weight.mul_(mask)
            per_module[name] = {"sparsity": float((module.weight == 0).float().mean())}
        return StepReport(kind=self.config.kind, per_module=per_module)

"""`finequant`: round-to-nearest weights with a group size chosen per matrix.

Per Linear, the coarsest group size (one group per row, then halving) whose relative
weight error is at most `max_error` (FineQuant, Kim et al. 2023). The chosen size is
reported per module; the artifact stores each matrix with its own group size.

```yaml
- kind: finequant
  bits: 4
  max_error: 0.12      # relative weight error allowed; int4 RTN of a Gaussian is ~0.11 at g64
  min_group_size: 32   # finest group size tried
  symmetric: true
```
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.quantization.finequant.config import FineQuantConfig
from squeezeflow.compression.quantization.finequant.math import adaptive_group_quantize
from squeezeflow.compression.quantization.qweight import as_stored, attach
from squeezeflow.compression.step import Step, StepReport


@register_step(FineQuantConfig)
class FineQuantStep(Step[FineQuantConfig]):
    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        per_module = {}
        for name, module in modules.items():
            weight = module.weight
            assert isinstance(weight, Tensor)
            W = as_stored(module, weight.detach()).to(torch.float32, copy=True)  # (out, in)
            result = adaptive_group_quantize(W, self.config.bits, self.config.symmetric,
                                             self.config.max_error, self.config.min_group_size)
            attach(module, result.quantized)
            per_module[name] = {
                "weight_rel_error": result.error,
                "group_size": float(result.quantized.group_size),
            }
        return StepReport(kind=self.config.kind, per_module=per_module)

"""`rtn`: round-to-nearest weight quantization of Linear layers.

```yaml
- kind: rtn
  bits: 4            # 2, 3, 4 or 8
  group_size: 128    # input columns sharing one scale; null = per output channel
  symmetric: true
```
"""

from __future__ import annotations

import torch
from torch import nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.quantization.qweight import attach, relative_error
from squeezeflow.compression.quantization.rtn.config import RTNConfig
from squeezeflow.compression.quantization.rtn.math import quantize_rtn
from squeezeflow.compression.step import Step, StepReport


@register_step(RTNConfig)
class RTNStep(Step[RTNConfig]):
    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        per_module = {}
        for name, module in modules.items():
            assert isinstance(module, nn.Linear)
            W = module.weight.detach().to(torch.float32, copy=True)  # W: (out, in)
            quantized = quantize_rtn(W, self.config.bits, self.config.group_size, self.config.symmetric)
            W_hat = attach(module, quantized).to(torch.float32)
            per_module[name] = {
                "weight_rel_error": relative_error(W, W_hat),
            }
        return StepReport(kind=self.config.kind, per_module=per_module)

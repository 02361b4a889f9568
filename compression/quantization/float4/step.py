"""`float4`: 4-bit float weights with block absmax scales, as bitsandbytes stores them.

NF4 (normal-float quantiles, QLoRA) or FP4 (E2M1) codes, one fp16 absmax per block
of `block_size` input columns. Needs no calibration. The artifact keeps the codes
packed (4 bits each) with the codebook and block scales; the runtime dequantizes
to fp32.

```yaml
- kind: float4
  format: nf4          # nf4 or fp4
  block_size: 64       # input columns per absmax scale (bitsandbytes' default)
```
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.quantization.codebook import attach_codebook, quantize_to_codebook
from squeezeflow.compression.quantization.float4.config import Float4Config
from squeezeflow.compression.quantization.float4.math import CODEBOOKS
from squeezeflow.compression.quantization.qweight import as_stored, relative_error
from squeezeflow.compression.step import Step, StepReport


@register_step(Float4Config)
class Float4Step(Step[Float4Config]):
    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        codebook = CODEBOOKS[self.config.format]()  # (16,)
        per_module = {}
        for name, module in modules.items():
            weight = module.weight
            assert isinstance(weight, Tensor)
            W = as_stored(module, weight.detach()).to(torch.float32, copy=True)  # (out, in)
            quantized = quantize_to_codebook(W, codebook, self.config.block_size, self.config.format)
            W_hat = attach_codebook(module, quantized).to(torch.float32)
            per_module[name] = {
                "weight_rel_error": relative_error(W, W_hat),
            }
        return StepReport(kind=self.config.kind, per_module=per_module)

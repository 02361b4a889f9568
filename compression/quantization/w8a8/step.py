"""`w8a8`: int8 weights (symmetric, per output channel) and int8 activations (per
token, dynamic) for the packed runtime's `torch._int_mm` kernel.

```yaml
- kind: w8a8        # after `smoothquant` in the same stage to keep accuracy
```

The step quantizes the weights now and marks the layers; activations are rounded to
int8 at run time by the packed runtime (`squeezeflow.load_compressed`, latency
evaluation). A SmoothQuant factor left on a Linear by a preceding `smoothquant` step
(where it could not be folded into a norm) is applied here: the codes encode W * s
and the kernel divides its input by s while quantizing it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.quantization.qweight import attach, relative_error
from squeezeflow.compression.quantization.smoothquant.step import SMOOTHING_ATTR
from squeezeflow.compression.quantization.w8a8.config import W8A8Config
from squeezeflow.compression.quantization.w8a8.math import quantize_w8a8
from squeezeflow.compression.step import Step, StepReport


@register_step(W8A8Config)
class W8A8Step(Step[W8A8Config]):
    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        per_module = {}
        for name, module in modules.items():
            assert isinstance(module, nn.Linear)
            W = module.weight.detach().to(torch.float32, copy=True)  # W: (out, in)
            input_scale: Tensor | None = getattr(module, SMOOTHING_ATTR, None)
            if input_scale is not None:
                delattr(module, SMOOTHING_ATTR)  # consumed: it now lives in the codes
            W_hat = attach(module, quantize_w8a8(W, input_scale)).to(torch.float32)
            per_module[name] = {
                "weight_rel_error": relative_error(W, W_hat),
                "smoothed": float(input_scale is not None),
            }
        return StepReport(kind=self.config.kind, per_module=per_module)

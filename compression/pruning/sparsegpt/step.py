"""`sparsegpt`: layer-wise OBS pruning with weight updates, optionally quantizing too.

Each Linear is pruned (unstructured or N:M) while the weights it keeps absorb the
error, using the Hessian 2 X^T X of its calibration inputs. With `bits` set, the
kept weights are also rounded onto a GPTQ-style grid in the same pass (joint
sparsity + quantization); the result is packed by the artifact like RTN/GPTQ.

```yaml
- kind: sparsegpt
  sparsity: 0.5      # fraction of each Linear's weights set to zero
- kind: sparsegpt
  pattern: "2:4"     # or N:M
  bits: 4            # joint: also quantize the kept weights (2, 3, 4 or 8; null = fp)
  group_size: 128
  sequential: true   # q/k/v first, then o, ... each pruned on what the pruned ones give
```
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.pruning.observers import InputGram, observe_inputs
from squeezeflow.compression.pruning.sparsegpt.config import SparseGPTConfig
from squeezeflow.compression.pruning.sparsegpt.math import QuantSpec, sparsegpt
from squeezeflow.compression.quantization.qweight import attach
from squeezeflow.compression.step import Step, StepReport


@register_step(SparseGPTConfig)
class SparseGPTStep(Step[SparseGPTConfig]):
    def __init__(self, config: SparseGPTConfig) -> None:
        super().__init__(config)
        self.gram_by_module: dict[str, InputGram] = {}

    @property
    def observes_inputs_only(self) -> bool:
        return True  # forward pre-hooks on the selected Linears only

    @property
    def sequential(self) -> bool:
        return self.config.sequential

    def share_observation(self, name: str, leader: str) -> None:
        self.gram_by_module[name] = self.gram_by_module[leader]

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        with observe_inputs(modules, self.gram_by_module, InputGram):
            yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        config = self.config
        quant = None
        if config.bits is not None:
            quant = QuantSpec(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric)
        per_module = {}
        for name, module in modules.items():
            assert isinstance(module, nn.Linear)
            H = 2 * self.gram_by_module.pop(name).mean()  # (in, in)
            W = module.weight.detach().to(torch.float32)  # (out, in)
            result = sparsegpt(W, H, config.sparsity, config.n_m, quant, config.block_size, config.damp)
            if result.quantized is not None:
                attach(module, result.quantized)
            else:
                module.weight.data.copy_(result.W.to(module.weight.dtype))
            W_hat = module.weight.detach().to(torch.float32)
            # the error that matters is on the layer's output: tr((W - W_hat) H (W - W_hat)^T)
            delta = W - W_hat
            output_error = float(torch.einsum("oi,ij,oj->", delta, H, delta) / 2)
            reference = float(torch.einsum("oi,ij,oj->", W, H, W) / 2)
            per_module[name] = {
                "sparsity": float((W_hat == 0).float().mean()),
                "output_rel_error": output_error / max(reference, 1e-12),
            }
        return StepReport(kind=config.kind, per_module=per_module)

"""`wanda`: pruning by |W| x input activation norm, per output row, no weight update.

Layer-wise: each block is calibrated on the outputs of the already pruned blocks
before it, as in the paper's reference procedure.

```yaml
- kind: wanda
  sparsity: 0.5      # fraction of each row's weights set to zero
- kind: wanda
  pattern: "2:4"     # or N:M: keep the 2 best-scored of every 4 consecutive inputs
```
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.pruning.observers import InputSquares, observe_inputs
from squeezeflow.compression.pruning.wanda.config import WandaConfig
from squeezeflow.compression.pruning.wanda.math import wanda_mask
from squeezeflow.compression.step import Step, StepReport


@register_step(WandaConfig)
class WandaStep(Step[WandaConfig]):
    def __init__(self, config: WandaConfig) -> None:
        super().__init__(config)
        self.squares_by_module: dict[str, InputSquares] = {}

    @property
    def observes_inputs_only(self) -> bool:
        return True  # forward pre-hooks on the selected Linears only

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        with observe_inputs(modules, self.squares_by_module, InputSquares):
            yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        per_module = {}
        for name, module in modules.items():
            assert isinstance(module, nn.Linear)
            W = module.weight.detach()  # W: (out, in)
            x_norm = self.squares_by_module.pop(name).norms()  # (in,)
            mask = wanda_mask(W.float(), x_norm, self.config.sparsity, self.config.n_m)
            with torch.no_grad():
                module.weight.mul_(mask)
            per_module[name] = {"sparsity": float((module.weight == 0).float().mean())}
        return StepReport(kind=self.config.kind, per_module=per_module)

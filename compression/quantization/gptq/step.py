"""`gptq`: second-order weight quantization of Linear layers (Frantar et al. 2022).

Layer-wise: each block is calibrated on what the already-quantized blocks before it
produce. Per layer, the inputs' Hessian is accumulated by a forward hook, then
`math.gptq_quantize` rounds the weights column by column, compensating each error
on the columns not yet rounded. Works on nn.Linear and GPT-2's Conv1D.

```yaml
- kind: gptq
  bits: 4              # 2, 3, 4 or 8
  group_size: 128      # input columns sharing one grid; null = one grid per output row
  symmetric: true
  act_order: false     # quantize the most active input columns first
  static_groups: false # grids from the original weights (keeps g_idx monotone with act_order)
  damp: 0.01           # fraction of mean diag(H) added to the diagonal
  calibration_precision: bf16  # fp32 = exact calibration matmuls (slower on CPUs with native bf16)
  sequential: false    # true: quantize q/k/v, then o, ... each on what the quantized ones give
- kind: gptq
  backend: gptqmodel   # causal LMs: GPTQModel quantizes and writes a standard GPTQ checkpoint
  bits: 4
  group_size: 128
```

Per module the report holds `output_rel_error` (relative error of the layer's output
on the calibration inputs, exact from the Hessian), `weight_rel_error` and
`gptq_loss` (GPTQ's own objective); the stage logs them as metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.quantization.gptq.config import GPTQConfig
from squeezeflow.compression.quantization.gptq.math import Hessian, gptq_quantize, output_error
from squeezeflow.compression.quantization.qweight import as_stored, attach, relative_error
from squeezeflow.compression.step import Precision, Step, StepReport, hooks, real_tokens

log = logging.getLogger(__name__)


REPORT_ROWS = 1024  # output_rel_error of larger Linears is measured on this many rows


@register_step(GPTQConfig)
class GPTQStep(Step[GPTQConfig]):
    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config)
        self.hessian_by_module: dict[str, Hessian] = {}

    @property
    def writes_checkpoint(self) -> bool:
        """With backend gptqmodel the step replaces the whole model and saves it itself."""
        return self.config.backend == "gptqmodel"

    def write_checkpoint(
        self, source: Path, calibration: Sequence[dict[str, Tensor]], output: Path
    ) -> StepReport:
        from squeezeflow.compression.quantization.gptq.gptqmodel_backend import (
            quantize_with_gptqmodel,
        )

        return quantize_with_gptqmodel(self.config, source, calibration, output)

    @property
    def calibration_precision(self) -> Precision:
        return self.config.calibration_precision

    def accepts(self, module: nn.Module) -> bool:
        """Linear layers and GPT-2's Conv1D (a Linear with its weight stored transposed)."""
        return _is_linear(module)

    @property
    def observes_inputs_only(self) -> bool:
        return True  # forward pre-hooks on the selected Linears only

    @property
    def sequential(self) -> bool:
        return self.config.sequential

    def share_observation(self, name: str, leader: str) -> None:
        self.hessian_by_module[name] = self.hessian_by_module[leader]  # one H: one stacked pass

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """Accumulate each module's input Hessian; X^T X is computed once per shared input."""
        last: dict[str, Any] = {}  # the last input seen and its X^T X (q/k/v share one input)

        def accumulate(module: nn.Module, args: tuple[Tensor, ...], name: str) -> None:
            X = args[0]
            if last.get("input") is not X:
                X2 = real_tokens(X.detach()).to(torch.float32)  # (tokens, in), padding left out
                last.update(input=X, product=X2.T @ X2, tokens=int(X2.shape[0]))
            self.hessian_by_module[name].add_product(last["product"], last["tokens"])

        handles = []
        for name, module in modules.items():
            self.hessian_by_module[name] = Hessian.zeros(_in_features(module))
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: accumulate(m, args, name)
            ))
        try:
            with hooks(handles):
                yield
        finally:
            last.clear()

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        if self.writes_checkpoint:
            raise RuntimeError(
                "gptq with backend 'gptqmodel' writes a whole checkpoint; "
                "run it as the only step of its stage"
            )
        per_module = {}
        for names in self._shared_input_groups(modules):
            # Layers fed the same input (q/k/v, gate/up) share H, so one GPTQ pass over
            # their stacked rows gives each layer exactly its own result, faster.
            hessian = self.hessian_by_module[names[0]]
            # the weights themselves (no copy when fp32): read for the report before attach
            Ws = [as_stored(modules[name], _weight(modules[name])).to(torch.float32)
                  for name in names]  # each (out_i, in)
            result = gptq_quantize(
                torch.cat(Ws), hessian.H, self.config.bits, self.config.group_size,
                self.config.symmetric, damp=self.config.damp, block_size=self.config.block_size,
                act_order=self.config.act_order, static_groups=self.config.static_groups,
                overwrite=True,  # torch.cat made W for this call
            )
            start = 0
            for name, W in zip(names, Ws, strict=True):
                rows = slice(start, start + W.shape[0])
                start = rows.stop
                quantized = result.quantized.row_slice(rows)
                W_hat = quantized.dequantize(torch.float32)
                per_module[name] = {
                    "output_rel_error": output_error(W, W_hat, hessian.H, REPORT_ROWS),
                    "weight_rel_error": relative_error(W, W_hat),
                    "gptq_loss": float(result.row_losses[rows].sum()),
                }
                attach(modules[name], quantized, dequantized=W_hat)  # overwrites W in place
                del W_hat
            del Ws, result
            for name in names:  # an 8B down_proj's H is 0.8 GB: free each as soon as used
                del self.hessian_by_module[name]
        return StepReport(kind=self.config.kind, per_module=per_module)

    def _shared_input_groups(self, modules: dict[str, nn.Module]) -> list[list[str]]:
        """Names of `modules` grouped by identical Hessians, in their original order."""
        groups: list[list[str]] = []
        for name in modules:
            hessian = self.hessian_by_module.get(name)
            if hessian is None or hessian.count == 0:
                raise ValueError(f"gptq: {name} saw no calibration inputs (is it used in forward?)")
            for group in groups:
                first = self.hessian_by_module[group[0]]
                if first.count == hessian.count and torch.equal(first.H, hessian.H):
                    group.append(name)
                    break
            else:
                groups.append([name])
        return groups


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.detach()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_features(module: nn.Module) -> int:
    return int(as_stored(module, _weight(module)).shape[1])

"""`lowrank`: replace Linears by two thin Linears from a truncated (whitened) SVD.

The rank of each Linear comes from one of: `energy` (smallest rank keeping that
share of the spectrum's energy), `param_ratio` (largest rank whose factors hold at
most that fraction of the layer's parameters) or a fixed `rank`. A Linear is only
replaced where the factors hold fewer parameters than the dense weight. With
`whiten` (default) the SVD is taken of W L, L L^T = E[x x^T] over calibration
inputs, which minimizes the error on the layer's outputs instead of on W.
Calibration data is required even with `whiten: false` (the step's needs are fixed).

```yaml
- kind: lowrank
  energy: 0.9        # keep 90% of the (whitened) spectrum's energy per layer
- kind: lowrank
  param_ratio: 0.5   # or: factors hold at most half of each layer's parameters
  whiten: true
- kind: lowrank
  rank: 16           # or: one fixed rank
  whiten: false
```
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.lowrank.factorized import FactorizedLinear, replace_module
from squeezeflow.compression.lowrank.svd.config import LowRankConfig
from squeezeflow.compression.lowrank.svd.math import (
    factors,
    saves_parameters,
    spectrum,
    whitening_factor,
)
from squeezeflow.compression.pruning.observers import InputGram, observe_inputs
from squeezeflow.compression.step import Step, StepReport

log = logging.getLogger(__name__)


@register_step(LowRankConfig)
class LowRankStep(Step[LowRankConfig]):
    def __init__(self, config: LowRankConfig) -> None:
        super().__init__(config)
        self.gram_by_module: dict[str, InputGram] = {}
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        if not self.config.whiten:
            yield
            return
        with observe_inputs(modules, self.gram_by_module, InputGram):
            yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        """Factorize each Linear where that saves parameters; `restructure` swaps them in."""
        per_module = {}
        for name, module in modules.items():
            assert isinstance(module, nn.Linear)
            W = module.weight.detach().to(torch.float32)  # (out, in)
            out_features, in_features = W.shape
            L = None
            if self.config.whiten:
                L = whitening_factor(self.gram_by_module.pop(name).mean(), self.config.damp)  # (in, in)
            U, S, Vh = spectrum(W, L)
            rank = min(self.config.rank_of(S, out_features, in_features), S.numel())
            replaced = rank >= 1 and saves_parameters(out_features, in_features, rank)
            metrics = {"rank": float(rank), "factorized": float(replaced)}
            if replaced:
                A, B = factors(U, S, Vh, rank, L)  # (rank, in), (out, rank)
                self.factors[name] = (A, B)
                kept = float(S[:rank].pow(2).sum() / S.pow(2).sum().clamp(min=1e-300))
                metrics |= {
                    "energy_kept": kept,
                    "parameter_ratio": rank * (out_features + in_features) / (out_features * in_features),
                }
            per_module[name] = metrics
        return StepReport(kind=self.config.kind, per_module=per_module)

    def restructure(self, model: nn.Module) -> None:
        for name, (A, B) in self.factors.items():
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            factorized = FactorizedLinear(
                linear.in_features, linear.out_features, A.shape[0], linear.bias is not None,
                linear.weight.dtype,
            )
            with torch.no_grad():
                factorized.in_factor.weight.copy_(A)
                factorized.out_factor.weight.copy_(B)
                if linear.bias is not None and factorized.out_factor.bias is not None:
                    factorized.out_factor.bias.copy_(linear.bias)
            replace_module(model, name, factorized)
        log.info("lowrank: %d Linears factorized", len(self.factors))
        self.factors.clear()

"""`rps`: Stable-RPS parameter sharing: every targeted Linear reads one shared array z.

Each targeted Linear becomes an `RPSLinear` with W = s * g * z[idx] (Desai &
Shrivastava, ICLR 2024; see `math.py`): z holds `ratio` times as many numbers as the
targeted weights, idx (RANDOMFOLD: folds of |z| positions, chunks of `chunk_size`
placed in a hashed order per fold) and the signs g are regenerated from `seed`, so
the saved model is z (once), one scale per layer and the seeds (format `rps`).

The paper applies RPS at the start of training. Here it follows a trained model: z
starts as the least-squares fit to the trained weights (each slot the scale-weighted
average of the weights that read it), which loses much of the model at ratio < 1,
and a `distill` stage after this one heals it: the runtime module computes W from z
while it trains, so distillation trains z itself (and the scales), and the healed z is
what is saved. At `ratio: 1` every slot is read by one weight and the model is
reproduced exactly. Biases stay per layer, as they were. Against depth pruning and
block sharing at the same parameter count (benchmarks/rps.py; `## Stable-RPS` in
benchmarks/README.md) it starts worse before distillation and heals as far, or, with
few distillation steps at 25% of the weights, further.

```yaml
- kind: rps
  ratio: 0.5          # z holds half as many numbers as the targeted Linear weights
- kind: rps
  ratio: 0.25
  seed: 7
  chunk_size: 64
  targets: ["*.mlp.*"]
```
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.lowrank.factorized import replace_module
from squeezeflow.compression.sharing.rps.config import RPSConfig
from squeezeflow.compression.sharing.rps.linear import RPSLinear
from squeezeflow.compression.sharing.rps.math import (
    Hashing,
    initial_memory,
    layer_map,
    load_factor,
    memory_slots,
    power_of_two_scales,
    shared_weight,
)
from squeezeflow.compression.step import Step, StepReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Planned:
    offset: int
    shape: tuple[int, int]
    scale: float


@register_step(RPSConfig)
class RPSStep(Step[RPSConfig]):
    def __init__(self, config: RPSConfig) -> None:
        super().__init__(config)
        self.planned: dict[str, _Planned] = {}
        self.z: nn.Parameter | None = None
        self.hashing: Hashing | None = None
        self.metrics: dict[str, float] = {}

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        """Lay the targeted weights end to end, make the map and fit z; `restructure` swaps."""
        if not modules:
            raise ValueError("rps: targets/ignore select no Linear of this model")
        c = self.config
        weights: list[Tensor] = []
        for name, module in modules.items():
            weight = module.weight
            assert isinstance(weight, Tensor), name
            weights.append(weight.detach())  # (out, in)
        shared = sum(W.numel() for W in weights)  # n
        slots = memory_slots(shared, c.ratio, c.chunk_size)  # m
        hashing = Hashing(seed=c.seed, slots=slots, chunk_size=c.chunk_size, mapping=c.mapping)
        offsets = [0]
        for W in weights[:-1]:
            offsets.append(offsets[-1] + W.numel())
        maps = [
            tuple(t.to(W.device) for t in layer_map(hashing, o, (W.shape[0], W.shape[1])))
            for o, W in zip(offsets, weights, strict=True)
        ]
        scales = power_of_two_scales(weights)
        z = initial_memory(weights, maps, scales, slots).to(weights[0].dtype)  # (m,)

        per_module: dict[str, dict[str, float]] = {}
        for name, W, offset, (idx, g), s in zip(modules, weights, offsets, maps, scales, strict=True):
            W_hat = shared_weight(z, idx, g, torch.tensor([s], dtype=z.dtype, device=z.device))  # (out, in)
            error = float((W_hat - W).norm() / W.norm().clamp(min=1e-12))
            per_module[name] = {"weight_rel_error": error, "log2_scale": math.log2(s)}
            self.planned[name] = _Planned(offset=offset, shape=(W.shape[0], W.shape[1]), scale=s)
        counts = load_factor(maps, slots)
        self.z, self.hashing = nn.Parameter(z), hashing
        self.metrics = {
            "shared_weights": float(shared),
            "slots": float(slots),
            "stored_ratio": slots / shared,
            "max_load": float(counts.max()),
            "min_load": float(counts.min()),
        }
        log.info("rps: %d weights of %d Linears share %d slots (%.3f), load %d-%d",
                 shared, len(modules), slots, slots / shared, int(counts.min()), int(counts.max()))
        return StepReport(kind=c.kind, per_module=per_module)

    def restructure(self, model: nn.Module) -> None:
        assert self.z is not None and self.hashing is not None, "apply() runs before restructure()"
        for name, planned in self.planned.items():
            linear = model.get_submodule(name)
            bias = getattr(linear, "bias", None)
            scale = nn.Parameter(torch.tensor([planned.scale], dtype=self.z.dtype, device=self.z.device))
            replace_module(model, name, RPSLinear(
                self.z, scale, planned.shape, planned.offset, self.hashing,
                bias if isinstance(bias, nn.Parameter) else None,
            ))

    def finalize(self, model: nn.Module, reports: list[StepReport]) -> StepReport:
        report = super().finalize(model, reports)
        return report.model_copy(update={"metrics": {**report.metrics, **self.metrics}})

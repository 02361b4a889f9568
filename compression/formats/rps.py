"""`rps`: Stable-RPS shared weights (`RPSWeight`): W = s * g * z[idx] over one shared z.

    W[r, c] = scale * g(P) * z[h(P)],   P = offset + r * in + c

Stored per Linear `NAME`:
- `NAME.z`: (m,) the shared array, the same tensor for every RPS layer of a model, so
  the artifact writes it once (under the first layer) and `tied` points the others at
  it; loading hands every layer the one tensor again, and the layers one Parameter;
- `NAME.scale`: (1,) the layer's scale s;
and in squeezeflow.json its shape, offset, seed, chunk size, mapping and |z| (`slots`).
The map h and the signs g are regenerated from those (`sharing/rps/math.py`), never
stored: the artifact is z, the scales and the seeds.

The runtime module (`RPSLinear`) is also what later stages train: a dense load builds
it too (`dense_is_runtime`), so that a `distill` stage after `rps` trains z, not a
dense copy of the weights.

Accuracy contract: the runtime module computes exactly the reference weight (the same
gather and products as `reference`), so its output is within 1e-5 relative error of
the reference product (fp32 summation order only); a wrong map, sign or scale errs by
O(1).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from squeezeflow.compression.formats.base import Take, WeightFormat, register_format
from squeezeflow.compression.sharing.rps.linear import RPS_ATTR, RPSLinear, RPSWeight


@register_format
class RPSFormat(WeightFormat[RPSWeight]):
    name = "rps"
    attr = RPS_ATTR
    stored_type = RPSWeight
    tolerance = 1e-5  # same fp32 weight as the reference; only the summation order differs
    dense_is_runtime: ClassVar[bool] = True  # a dense load builds RPSLinear: z stays trainable

    def current(self, module: nn.Module) -> RPSWeight | None:
        if isinstance(module, RPSLinear):
            return module.stored()  # computed from z at every call: always current
        return super().current(module)

    def attached(self, module: nn.Module) -> bool:
        return isinstance(module, RPSLinear) or super().attached(module)

    def spec(self, stored: RPSWeight) -> dict[str, Any]:
        return {
            "shape": list(stored.shape),
            "offset": stored.offset,
            "seed": stored.seed,
            "chunk_size": stored.chunk_size,
            "mapping": stored.mapping,
            "slots": stored.z.numel(),
        }

    def tensors(self, name: str, stored: RPSWeight) -> dict[str, Tensor]:
        # z is not copied: every layer hands the same storage, which the artifact writes once
        return {f"{name}.z": stored.z.detach(), f"{name}.scale": stored.scale.detach().contiguous()}

    def read(self, name: str, spec: dict[str, Any], take: Take) -> RPSWeight:
        z, scale = take("z"), take("scale")
        if z is None or scale is None:
            raise ValueError(f"packed tensors of {name} are incomplete (z, scale)")
        if z.numel() != spec["slots"]:
            raise ValueError(f"{name}: z has {z.numel()} slots, squeezeflow.json says {spec['slots']}")
        out_features, in_features = spec["shape"]
        return RPSWeight(
            z=z, scale=scale, shape=(int(out_features), int(in_features)), offset=int(spec["offset"]),
            seed=int(spec["seed"]), chunk_size=int(spec["chunk_size"]), mapping=spec["mapping"],
        )

    def runtime(self, module: nn.Module, stored: RPSWeight, *, fuse: bool = True) -> nn.Module:
        if isinstance(module, RPSLinear):
            return module
        bias = getattr(module, "bias", None)
        return RPSLinear.from_stored(stored, bias if isinstance(bias, Tensor) else None)

    def reference(self, stored: RPSWeight, dtype: torch.dtype = torch.float32) -> Tensor:
        return stored.dequantize(dtype)

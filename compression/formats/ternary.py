"""`qmoe`: ternary weights, dictionary coded (QMoE's sub-1-bit format; `TernaryWeight`).

    W[r, j] = min_r, 0 or max_r  (per row r of every matrix; codes t in {-1, 0, +1})

The codes, read in pairs, are coded as 16-bit indices into a dictionary of 2^16 runs of
up to 14 pairs (compression/moe/qmoe/coding.py). A format for whole modules: a Linear's
`weight`, or stacked MoE experts' `gate_up_proj` and `down_proj` (the module has no
`weight`), one stream and one dictionary per module.

Stored per module `NAME` (the module's parameters are not stored dense):
- `NAME.codewords`: (words,) int16, the 16-bit codewords of every matrix in order;
- `NAME.offsets`: (matrices + 1,) int32, where each matrix's codewords start;
- `NAME.levels`: each row's |min| and max as 6-bit log-scale codes, bit-packed
  (`qweight.pack_bits`; compression/moe/qmoe/weight.py explains the scale);
- `NAME.level_scales`: (matrices,) fp16, each matrix's largest level;
- `NAME.pair_costs`: (9,) int32, the integer costs the dictionary is rebuilt from;
and in squeezeflow.json the parameters' names and shapes (stream order), the dictionary
size, the longest run and the level code (bits, steps per octave).

Accuracy contract: the runtime modules (`TernaryLinear`, `TernaryExperts`, which decode
the stream on every call and multiply in fp32) give the reference product
(`TernaryWeight.tensor`, the decoded values) up to fp32 summation order: within 1e-5
relative error; a wrong codeword, offset or row level errs by O(1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.formats.base import Take, WeightFormat, register_format
from squeezeflow.compression.moe.qmoe.coding import DICTIONARY_SIZE, MAX_PAIRS
from squeezeflow.compression.moe.qmoe.runtime import TernaryExperts, TernaryLinear
from squeezeflow.compression.moe.qmoe.weight import (
    LEVEL_BITS,
    LEVEL_STEPS,
    TERNARY_ATTR,
    WEIGHT,
    TernaryWeight,
)
from squeezeflow.compression.quantization.qweight import SCALE_DTYPE, pack_bits, unpack_bits


@register_format
class TernaryFormat(WeightFormat[TernaryWeight]):
    name = "qmoe"
    attr = TERNARY_ATTR
    stored_type = TernaryWeight
    tolerance = 1e-5  # exact decoding; only the matmul's fp32 summation order differs

    def current(self, module: nn.Module) -> TernaryWeight | None:
        """The module's TernaryWeight if every parameter it stores still holds its values."""
        stored = getattr(module, self.attr, None)
        if not isinstance(stored, TernaryWeight):
            return None
        for name, shape in stored.shapes:
            parameter = getattr(module, name, None)
            if not isinstance(parameter, Tensor) or tuple(parameter.shape) != shape:
                return None
            if not torch.equal(stored.tensor(name, parameter.dtype), parameter.detach()):
                return None
        return stored

    def parameter_names(self, stored: TernaryWeight) -> tuple[str, ...]:
        return stored.names

    def dense(self, module: nn.Module, stored: TernaryWeight) -> dict[str, Tensor]:
        return {name: stored.tensor(name) for name in stored.names}

    def spec(self, stored: TernaryWeight) -> dict[str, Any]:
        return {
            "parameters": [[name, list(shape)] for name, shape in stored.shapes],
            "dictionary_size": stored.dictionary_size,
            "max_pairs": stored.max_pairs,
            "level_bits": LEVEL_BITS,
            "level_steps": LEVEL_STEPS,
        }

    def tensors(self, name: str, stored: TernaryWeight) -> dict[str, Tensor]:
        return {
            f"{name}.codewords": stored.stream.contiguous(),
            f"{name}.offsets": stored.offsets.to(torch.int32).contiguous(),
            f"{name}.levels": pack_bits(stored.level_codes, LEVEL_BITS),
            f"{name}.level_scales": stored.level_scales.to(SCALE_DTYPE).contiguous(),
            f"{name}.pair_costs": stored.pair_costs.to(torch.int32).contiguous(),
        }

    def read(self, name: str, spec: dict[str, Any], take: Take) -> TernaryWeight:
        if (spec.get("level_bits"), spec.get("level_steps")) != (LEVEL_BITS, LEVEL_STEPS):
            raise ValueError(f"{name}: row levels coded with {spec.get('level_bits')} bits, "
                             f"{spec.get('level_steps')} steps per octave; this squeezeflow reads "
                             f"{LEVEL_BITS} bits, {LEVEL_STEPS} steps")
        stream, offsets, costs = take("codewords"), take("offsets"), take("pair_costs")
        levels, scales = take("levels"), take("level_scales")
        if stream is None or offsets is None or levels is None or scales is None or costs is None:
            raise ValueError(f"packed tensors of {name} are incomplete "
                             "(codewords, offsets, levels, level_scales, pair_costs)")
        shapes = tuple((str(p), tuple(int(s) for s in shape)) for p, shape in spec["parameters"])
        rows = sum(math.prod(shape[:-1]) for _, shape in shapes)
        return TernaryWeight(
            shapes=shapes,
            stream=stream,
            offsets=offsets,
            level_codes=unpack_bits(levels, LEVEL_BITS, (rows, 2)),
            level_scales=scales.to(torch.float32),
            pair_costs=costs,
            dictionary_size=int(spec.get("dictionary_size", DICTIONARY_SIZE)),
            max_pairs=int(spec.get("max_pairs", MAX_PAIRS)),
        )

    def runtime(self, module: nn.Module, stored: TernaryWeight, *, fuse: bool = True) -> nn.Module:
        if stored.names == (WEIGHT,):
            bias = getattr(module, "bias", None)
            return TernaryLinear(stored, bias.detach() if isinstance(bias, Tensor) else None)
        return TernaryExperts(module, stored)

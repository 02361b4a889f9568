"""`quantized`: the integer grid (`QuantizedWeight`, GPTQ's layout) of RTN, GPTQ, W8A8, ...

    W[i, j] ~= scale[i, g_idx[j]] * (codes[i, j] - zero[i, g_idx[j]])   (/ input_scale[j])

Stored per Linear `NAME` (byte layout of FORMAT_VERSION 1, unchanged):
- `NAME.qweight`: codes bit-packed into uint8 (`qweight.pack_bits`, `bits` per code);
- `NAME.scales`: (out, groups) fp16; the scales are fp16-exact, so nothing is lost;
- `NAME.qzeros`: zero points bit-packed like the codes;
- `NAME.g_idx`: (in,) int32, only when columns were reordered (act_order);
- `NAME.input_scale`: (in,) fp32, only for SmoothQuant-scaled W8A8 layers;
and in squeezeflow.json its bits, shape, group size, symmetry and activation bits.

Accuracy contract: the runtime module (`kernels.pack_linear`: int4/int8/W8A8 kernels
or the dequantizing fallback) is within `QuantLinear.tolerance` (2%) relative error of
the reference product on Gaussian inputs; bf16 activations and scales round at 2**-9
each, while a wrong zero point, scale layout or group map errs by O(1). W8A8 layers
also round their inputs to int8 per token, which the contract test allows for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.formats.base import Take, WeightFormat, register_format
from squeezeflow.compression.quantization.qweight import (
    QUANTIZED_ATTR,
    QuantizedWeight,
    group_index,
    pack_bits,
    unpack_bits,
)
from squeezeflow.kernels import QuantLinear, pack_linear


@register_format
class IntegerFormat(WeightFormat[QuantizedWeight]):
    name = "quantized"
    attr = QUANTIZED_ATTR
    stored_type = QuantizedWeight
    tolerance = QuantLinear.tolerance

    def spec(self, stored: QuantizedWeight) -> dict[str, Any]:
        return {
            "bits": stored.bits,
            "shape": list(stored.shape),
            "group_size": stored.group_size,
            "symmetric": stored.symmetric,
            "activation_bits": stored.activation_bits,
        }

    def tensors(self, name: str, stored: QuantizedWeight) -> dict[str, Tensor]:
        tensors = {
            f"{name}.qweight": pack_bits(stored.codes, stored.bits),
            f"{name}.scales": stored.scale.to(torch.float16).contiguous(),
            f"{name}.qzeros": pack_bits(stored.zero, stored.bits),
        }
        columns = stored.shape[1]
        if not torch.equal(stored.g_idx, group_index(columns, stored.group_size)):
            tensors[f"{name}.g_idx"] = stored.g_idx.to(torch.int32)
        if stored.input_scale is not None:  # SmoothQuant factor kept for the W8A8 runtime
            tensors[f"{name}.input_scale"] = stored.input_scale.to(torch.float32).contiguous()
        return tensors

    def read(self, name: str, spec: dict[str, Any], take: Take) -> QuantizedWeight:
        bits, (rows, columns) = spec["bits"], spec["shape"]
        scales, qweight, qzeros = take("scales"), take("qweight"), take("qzeros")
        if scales is None or qweight is None or qzeros is None:
            raise ValueError(f"packed tensors of {name} are incomplete (qweight, scales, qzeros)")
        scale = scales.to(torch.float32)  # (out, groups)
        g_idx_stored = take("g_idx")
        g_idx = (
            group_index(columns, spec["group_size"])
            if g_idx_stored is None
            else g_idx_stored.to(torch.int64)
        )  # (in,)
        return QuantizedWeight(
            codes=unpack_bits(qweight, bits, (rows, columns)),
            scale=scale,
            zero=unpack_bits(qzeros, bits, tuple(scale.shape)),
            g_idx=g_idx,
            bits=bits,
            group_size=spec["group_size"],
            symmetric=spec["symmetric"],
            activation_bits=spec.get("activation_bits"),
            input_scale=take("input_scale"),
        )

    def runtime(self, module: nn.Module, stored: QuantizedWeight, *, fuse: bool = True) -> nn.Module:
        return packed_layer(module, stored, fuse)


def packed_layer(module: nn.Module, quantized: QuantizedWeight, fuse: bool = True) -> QuantLinear:
    """The `QuantLinear` that runs `quantized` with `module`'s bias (module's weight unused)."""
    bias = getattr(module, "bias", None)
    return pack_linear(
        quantized.codes, quantized.scale, quantized.zero, quantized.g_idx, quantized.bits,
        bias.detach() if isinstance(bias, torch.Tensor) else None,
        activation_bits=quantized.activation_bits, input_scale=quantized.input_scale,
        fuse=fuse,
    )

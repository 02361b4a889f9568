"""`codebook`: 4-bit float codebooks (NF4, FP4) with block absmax scales (`CodebookWeight`).

    W[i, j] ~= scale[i, j // block_size] * codebook[codes[i, j]]

Stored per Linear `NAME` (byte layout of FORMAT_VERSION 1, unchanged):
- `NAME.qweight`: codebook indices bit-packed into uint8 (`qweight.pack_bits`);
- `NAME.scales`: (out, blocks) fp16 block absmax; the scales are fp16-exact;
- `NAME.codebook`: (2**bits,) fp32 codebook values;
and in squeezeflow.json its bits, shape, block size and codebook name.

Accuracy contract: the runtime module (`kernels.codebook.CodebookLinear`) is within
2% relative error of the reference product on Gaussian and adversarial inputs: bf16
activations and scales round at 2**-9 each, while a wrong code, block or scale errs by
O(1). Its kernels (fused decode-and-reduce loops, dequantize + GEMM) are chosen per
machine like every packed layer's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.formats.base import Take, WeightFormat, register_format
from squeezeflow.compression.quantization.codebook import CODEBOOK_ATTR, CodebookWeight
from squeezeflow.compression.quantization.qweight import pack_bits, unpack_bits
from squeezeflow.kernels.codebook import CodebookLinear


@register_format
class CodebookFormat(WeightFormat[CodebookWeight]):
    name = "codebook"
    attr = CODEBOOK_ATTR
    stored_type = CodebookWeight
    tolerance = 0.02  # bf16 activations and scales: 2**-9 relative each, with margin

    def spec(self, stored: CodebookWeight) -> dict[str, Any]:
        return {
            "bits": stored.bits,
            "shape": list(stored.shape),
            "block_size": stored.block_size,
            "format": stored.format,
        }

    def tensors(self, name: str, stored: CodebookWeight) -> dict[str, Tensor]:
        return {
            f"{name}.qweight": pack_bits(stored.codes, stored.bits),
            f"{name}.scales": stored.scale.to(torch.float16).contiguous(),
            f"{name}.codebook": stored.codebook.contiguous(),
        }

    def read(self, name: str, spec: dict[str, Any], take: Take) -> CodebookWeight:
        qweight, scales, codebook = take("qweight"), take("scales"), take("codebook")
        if qweight is None or scales is None or codebook is None:
            raise ValueError(f"packed tensors of {name} are incomplete (qweight, scales, codebook)")
        return CodebookWeight(
            codes=unpack_bits(qweight, spec["bits"], tuple(spec["shape"])),  # (out, in)
            scale=scales.to(torch.float32),  # (out, blocks)
            codebook=codebook,  # (2**bits,)
            bits=spec["bits"],
            block_size=spec["block_size"],
            format=spec["format"],
        )

    def runtime(self, module: nn.Module, stored: CodebookWeight, *, fuse: bool = True) -> nn.Module:
        bias = getattr(module, "bias", None)
        return CodebookLinear.from_weight(stored, bias.detach() if isinstance(bias, Tensor) else None)

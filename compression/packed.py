"""The packed runtime: swap every quantized Linear of a model for a `QuantLinear`.

A quantized model from the compression steps is a regular `transformers` model
whose Linear weights hold dequantized values, with the integer codes attached
(`QuantizedWeight`, see `quantization/qweight.py`). `to_packed_runtime` replaces
those Linears (and GPT-2 Conv1D layers) by modules holding packed weights that call
the fast ops of `squeezeflow.kernels`. It is what `squeezeflow.load_compressed`
returns by default and what latency evaluation measures.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from squeezeflow.compression.quantization.qweight import (
    QUANTIZED_ATTR,
    QuantizedWeight,
    current_quantized,
)
from squeezeflow.kernels import QuantLinear, pack_linear


log = logging.getLogger(__name__)


def to_packed_runtime(model: nn.Module, fuse: bool = True) -> dict[str, str]:
    """Replace quantized layers of `model` in place; returns {module name: format}.

    Layers whose weight changed after quantization (stale codes) stay dense. Each
    layer's kernels are chosen on first use (kernels/choice.py); `fuse` compiles the
    W8A8 kernels' quantization with torch.compile.
    """
    formats: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            continue
        quantized = current_quantized(module)
        if quantized is None:
            if getattr(module, QUANTIZED_ATTR, None) is not None:
                log.warning("%s changed after quantization; it runs dense", name)
            continue
        packed = packed_layer(module, quantized, fuse)
        replace_module(model, name, packed)
        formats[name] = packed.format
    if formats:
        counts = Counter(formats.values())
        log.info("packed runtime: %s", ", ".join(f"{n} {f}" for f, n in sorted(counts.items())))
    return formats


def packed_layer(module: nn.Module, quantized: QuantizedWeight, fuse: bool = True) -> QuantLinear:
    """The `QuantLinear` that runs `quantized` with `module`'s bias (module's weight unused)."""
    bias = getattr(module, "bias", None)
    return pack_linear(
        quantized.codes, quantized.scale, quantized.zero, quantized.g_idx, quantized.bits,
        bias.detach() if isinstance(bias, torch.Tensor) else None,
        activation_bits=quantized.activation_bits, input_scale=quantized.input_scale,
        fuse=fuse,
    )


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, module)

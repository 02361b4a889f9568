"""The packed runtime: swap every stored-format Linear of a model for its runtime module.

A quantized model from the compression steps is a regular `transformers` model
whose Linear weights hold dequantized values, with the stored format attached
(`QuantizedWeight`, `CodebookWeight`, ...; see `compression/formats/`).
`to_packed_runtime` replaces those Linears (and GPT-2 Conv1D layers) by the runtime
module of their format (for the integer grid a `QuantLinear` calling the fast ops of
`squeezeflow.kernels`). It is what `load_compressed(runtime="packed")` builds and what
latency evaluation measures. Linears sharing one weight Parameter (block sharing)
share one runtime module, so the packed weight is held once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.formats import WeightFormat, stored_linears
from squeezeflow.compression.formats.integer import packed_layer

log = logging.getLogger(__name__)

__all__ = ["install_runtime", "packed_layer", "replace_module", "share_tensors", "to_packed_runtime"]


def to_packed_runtime(model: nn.Module, fuse: bool = True) -> dict[str, str]:
    """Replace stored-format layers of `model` in place; returns {module name: format}.

    Layers whose weight changed after quantization (stale codes) stay dense, and so do
    layers whose format has no runtime module here. Each layer's kernels are chosen on
    first use (kernels/choice.py); `fuse` compiles the W8A8 kernels' quantization with
    torch.compile.
    """
    formats: dict[str, str] = {}
    for weight in stored_linears(model):
        names = (weight.owner, *weight.sharers)
        before = {name: model.get_submodule(name) for name in names}
        installed = install_runtime(model, weight.format, weight.stored, weight.owner,
                                    weight.sharers, fuse)
        for name, runtime in installed.items():
            if runtime is not before[name]:
                formats[name] = str(getattr(runtime, "format", weight.format.name))
    if formats:
        counts = Counter(formats.values())
        log.info("packed runtime: %s", ", ".join(f"{n} {f}" for f, n in sorted(counts.items())))
    return formats


def install_runtime(
    model: nn.Module, weight_format: WeightFormat[Any], stored: Any, owner: str,
    sharers: Sequence[str] = (), fuse: bool = True,
) -> dict[str, nn.Module]:
    """Swap `owner` and its `sharers` (modules on the very same weight) for runtime modules.

    Returns {module name: the module now there}. Sharers whose bias equals the owner's
    get the owner's runtime module itself; the others get their own module whose
    packed tensors are the owner's (`share_tensors`), so the weight is held once.
    """
    module = model.get_submodule(owner)
    runtime = weight_format.runtime(module, stored, fuse=fuse)
    if runtime is not module:
        replace_module(model, owner, runtime)
    installed = {owner: runtime}
    for name in sharers:
        sharer = model.get_submodule(name)
        if runtime is module:  # the format runs dense here: share the dense weight
            sharer.weight = module.weight
            weight_format.attach(sharer, stored)
            installed[name] = sharer
            continue
        if _same_bias(sharer, module):
            shared = runtime
        else:
            shared = weight_format.runtime(sharer, stored, fuse=fuse)
            share_tensors(runtime, shared)
        replace_module(model, name, shared)
        installed[name] = shared
    return installed


def share_tensors(source: nn.Module, target: nn.Module) -> int:
    """Point `target`'s tensors at `source`'s equal ones (all but biases); returns bytes freed.

    For two runtime modules of one stored weight with different biases. Caches a
    kernel keeps outside its buffers (e.g. a oneDNN prepacked weight) stay per module.
    """
    source_modules = dict(source.named_modules())
    freed = 0
    for kind in ("_buffers", "_parameters"):
        for holder_name, holder in target.named_modules():
            source_holder = source_modules.get(holder_name)
            if source_holder is None:
                continue
            own: dict[str, Tensor | None] = getattr(holder, kind)
            theirs: dict[str, Tensor | None] = getattr(source_holder, kind)
            for attribute, tensor in own.items():
                shared = theirs.get(attribute)
                if attribute == "bias" or tensor is None or shared is None or shared is tensor:
                    continue
                if shared.shape != tensor.shape or shared.dtype != tensor.dtype \
                        or shared.device != tensor.device or not torch.equal(shared, tensor):
                    continue
                own[attribute] = shared
                freed += tensor.numel() * tensor.element_size()
    return freed


def _same_bias(a: nn.Module, b: nn.Module) -> bool:
    bias_a, bias_b = getattr(a, "bias", None), getattr(b, "bias", None)
    if bias_a is bias_b:
        return True  # both None, or one shared Parameter
    if not isinstance(bias_a, Tensor) or not isinstance(bias_b, Tensor):
        return False
    return bias_a.shape == bias_b.shape and torch.equal(bias_a, bias_b)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, module)

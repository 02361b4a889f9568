"""Export quantized Linear layers as a standard Hugging Face GPTQ checkpoint.

The format GPTQ, AutoGPTQ and GPTQModel write and `transformers` (+ optimum and
gptqmodel) loads. Per quantized layer `NAME` with `in` inputs, `out` outputs:
- `NAME.qweight` (in * bits / 32, out) int32: codes packed along the input axis,
  a little-endian bit stream per output column (3-bit codes straddle words);
- `NAME.qzeros` (groups, out * bits / 32) int32: zero points packed along the output
  axis; checkpoint format "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself;
- `NAME.scales` (groups, out) fp16;
- `NAME.g_idx` (in,) int32: the group of each input column (non-monotone with act_order);
plus every other tensor as is, and a `quantization_config` in config.json.

The layers come from the integer weight format (`compression/formats/integer.py`):
`IntegerFormat.current` on a model in memory, `IntegerFormat.read` (through
`load_compressed`) for a saved squeezeflow folder. Linears that share one quantized
weight (block sharing) are each written out, since GPTQ checkpoints cannot tie them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from squeezeflow.compression.formats import (
    FORMATS,
    IntegerFormat,
    remaining_tensors,
    stored_linears,
)
from squeezeflow.compression.integrity import atomic_folder, write_manifest
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.quantization.qweight import QuantizedWeight, group_index

WORD_BITS = 32  # GPTQ packs into int32 words


def export_gptq(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """Write `model`, whose Linear layers were quantized by gptq or rtn, as a GPTQ checkpoint."""
    quantized = integer_layers(model)
    if not quantized:
        raise ValueError("export_gptq: the model has no quantized Linear layers")
    scaled = sorted(n for n, q in quantized.items() if getattr(q, "input_scale", None) is not None)
    if scaled:
        raise ValueError(
            f"export_gptq: {scaled[0]} carries a SmoothQuant input scale, which GPTQ "
            "checkpoints cannot express; save it with save_compressed instead"
        )
    bits, group_size, symmetric = _shared_settings(quantized)
    prefix, _ = find_blocks(model)
    outside = sorted(name for name in quantized if not name.startswith(f"{prefix}."))
    if outside:
        raise ValueError(f"export_gptq: GPTQ checkpoints quantize block layers only, not {outside}")
    # v1 stores zero - 1, which wraps for a zero point of 0 (possible only when asymmetric)
    zero_is_zero = any(bool((q.zero == 0).any()) for q in quantized.values())
    checkpoint_format = "gptq_v2" if zero_is_zero else "gptq"

    # tied weights (lm_head = embeddings) are stored once, under the first name
    tensors, _ = remaining_tensors(model, {f"{name}.weight" for name in quantized})
    for name, q in quantized.items():
        tensors.update(gptq_tensors(name, q, v1_zeros=checkpoint_format == "gptq"))

    with atomic_folder(path) as partial:  # whole or not at all: a killed export leaves no half folder
        _write_gptq_folder(model, tokenizer, partial, tensors, prefix, quantized,
                           (bits, group_size, symmetric, checkpoint_format))
    return path


def _write_gptq_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path,
    tensors: dict[str, Tensor], prefix: str, quantized: dict[str, QuantizedWeight],
    settings: tuple[int, int, bool, str],
) -> None:
    bits, group_size, symmetric, checkpoint_format = settings
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    block_linears = [
        name for name, module in model.named_modules()
        if name.startswith(f"{prefix}.") and (isinstance(module, nn.Linear)
                                              or type(module).__name__ == "Conv1D")
    ]
    quantization_config: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": symmetric,
        "desc_act": any(not _monotone(q) for q in quantized.values()),
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": False,
        "block_name_to_quantize": prefix,
        "meta": {"quantizer": ["squeezeflow"]},
    }
    if set(block_linears) != set(quantized):
        # layers left dense (targets / ignore) stay nn.Linear when loading
        quantization_config["modules_in_block_to_quantize"] = [sorted(quantized)]
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (path / "quantize_config.json").write_text(json.dumps(quantization_config, indent=2))
    tokenizer.save_pretrained(path)
    write_manifest(path)


def integer_layers(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{Linear name: its integer-grid weight}, sharers of one weight included, in model order."""
    integer = FORMATS.of(IntegerFormat)
    layers = {
        name: linear.stored
        for linear in stored_linears(model) if linear.format is integer
        for name in (linear.owner, *linear.sharers)
    }
    order = {name: index for index, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    return dict(sorted(layers.items(), key=lambda item: order.get(item[0], len(order))))


def gptq_tensors(name: str, q: QuantizedWeight, v1_zeros: bool = True) -> dict[str, Tensor]:
    """The four GPTQ tensors of one quantized layer."""
    rows, columns = q.shape
    if (columns * q.bits) % WORD_BITS or (rows * q.bits) % WORD_BITS:
        raise ValueError(
            f"export_gptq: {name} ({rows} x {columns}) cannot be packed into int32 words at "
            f"{q.bits} bits; input and output widths must be multiples of {WORD_BITS // _gcd(q.bits)}"
        )
    zeros = q.zero.to(torch.int64)  # (out, groups)
    if v1_zeros:
        zeros = zeros - 1  # GPTQ v1 convention (loaders add the 1 back)
    return {
        f"{name}.qweight": pack_int32(q.codes.T.to(torch.int64), q.bits),  # (in*bits/32, out)
        f"{name}.qzeros": pack_int32(zeros, q.bits).T.contiguous(),  # (groups, out*bits/32)
        f"{name}.scales": q.scale.T.to(torch.float16).contiguous(),  # (groups, out)
        f"{name}.g_idx": q.g_idx.to(torch.int32).contiguous(),  # (in,)
    }


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Pack `bits`-bit values along dim 0: (n, m) -> (n * bits / 32, m) int32.

    Value i of a column occupies bits [i * bits, (i + 1) * bits) of the column's bit
    stream, word w holding stream bits [32 w, 32 w + 32), least significant first.
    """
    n, m = values.shape
    values = values & (2**bits - 1)  # (n, m); v1 zero points of 0 become all ones
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = (values[:, None, :] >> shifts[None, :, None]) & 1  # (n, bits, m)
    stream = stream.reshape(n * bits // WORD_BITS, WORD_BITS, m)  # (words, 32, m)
    weights = (1 << torch.arange(WORD_BITS, dtype=torch.int64))[None, :, None]
    words = (stream * weights).sum(dim=1)  # (words, m), in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _shared_settings(quantized: dict[str, QuantizedWeight]) -> tuple[int, int, bool]:
    """bits, group_size (-1 = per row) and symmetry common to every layer, or an error."""
    bits = {q.bits for q in quantized.values()}
    symmetric = {q.symmetric for q in quantized.values()}
    grouped = {q.group_size for q in quantized.values() if q.group_size < q.shape[1]}
    if len(bits) > 1 or len(symmetric) > 1 or len(grouped) > 1:
        raise ValueError(
            "export_gptq: a GPTQ checkpoint has one bits/group_size/sym for all layers; "
            f"found bits {sorted(bits)}, group sizes {sorted(grouped)}, sym {sorted(symmetric)}"
        )
    group_size = grouped.pop() if grouped else -1
    if group_size != -1:
        too_wide = [n for n, q in quantized.items() if q.group_size == q.shape[1] > group_size]
        if too_wide:
            raise ValueError(f"export_gptq: {too_wide[0]} has one group per row, others {group_size}")
    return bits.pop(), group_size, symmetric.pop()


def _monotone(q: QuantizedWeight) -> bool:
    return torch.equal(q.g_idx, group_index(q.shape[1], q.group_size))


def _gcd(bits: int) -> int:
    from math import gcd

    return gcd(bits, WORD_BITS)

"""`compressed-tensors`: a packed squeezeflow folder written as a compressed-tensors checkpoint.

The checkpoint is what vLLM serves and what transformers (with the `compressed-tensors`
package) loads with `AutoModelForCausalLM.from_pretrained`: config.json carries a
`quantization_config` with quant_method "compressed-tensors" and format
"pack-quantized", and per quantized Linear `NAME` the safetensors hold
- `NAME.weight_packed` (out, ceil(in * bits / 32)) int32: the codes as signed integers
  q = code - 2**(bits-1), 32 consecutive inputs packed into `bits` words;
- `NAME.weight_scale` (out, groups) in the model's dtype (groups = 1 per channel);
- `NAME.weight_zero_point` (ceil(out * bits / 32), groups) int32, asymmetric grids only:
  the zero points as signed integers, packed along the output axis;
- `NAME.weight_shape` (2,) int64: (out, in);
so that W = scale * (q - zero) = our scale * (code - zero). The packing and the config
objects are compressed-tensors' own (`pack_to_int32`, `QuantizationConfig`,
`ModelCompressor.update_config`); the codes, scales and zero points are read through the
integer weight format (`compression/formats/integer.py`). Each layer is decompressed
again by compressed-tensors' `PackedQuantizationCompressor` while exporting, and its
difference to our reference weight is returned (`max_abs_diff`).

2:4 sparsity: compressed-tensors 0.20.1 keeps the sparse formats (`sparse-24-bitmask`,
`marlin-24`) only as names, with no compressor to decompress them ("legacy format"
in `compressed_tensors/config/base.py`; `ModelCompressor.update_config` writes an empty
`sparsity_config`), so transformers cannot load such a checkpoint. A 2:4 sparse model is
written pack-quantized (a pruned weight is the zero point's code, which decompresses to
an exact 0) with a `sparsity_config` of format "dense" and sparsity_structure "2:4"
naming the sparse layers: the checkpoint loads, and the structure is declared for
runtimes that read it.

Refused, with the reason: layers in other weight formats (codebooks, ternary, RPS, ...),
SmoothQuant input scales and W8A8 activation quantization, act-order column orders
(a non-monotone g_idx), a last group shorter than the others, and GPT-2 Conv1D layers
(compressed-tensors quantizes nn.Linear and nn.Embedding only).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.quantization.qweight import QuantizedWeight, group_index

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
# Files of a model folder besides config and weights that a runtime reads as they are.
COPIED_FILES = ("generation_config.json",)
SPARSE_N, SPARSE_M = 2, 4  # the semi-structured pattern sparse kernels accelerate


class NotExportableError(ValueError):
    """The model cannot be written in this format; the message says why."""


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors weight scheme: the settings a config group shares."""

    bits: int
    group_size: int | None  # None = one scale per output row ("channel")
    symmetric: bool

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"


def export(source: Path, out: Path) -> dict[str, float]:
    """Write the squeezeflow folder `source` as a compressed-tensors checkpoint at `out`.

    Returns the export's figures: `quantized_layers`, `dense_linears` (left in the
    model's dtype, listed in `ignore`), `bits` (the widest), `sparse_24_layers` and
    their `sparsity_24`, `max_abs_diff` (compressed-tensors' decompressed weights
    against our reference weights) and `bytes` written.
    """
    from safetensors.torch import save_file

    from squeezeflow.compression.artifact import load_compressed, size_on_disk
    from squeezeflow.compression.formats import remaining_tensors
    from squeezeflow.compression.integrity import atomic_folder

    source, out = Path(source), Path(out)
    loaded = load_compressed(source)  # dense runtime: each Linear carries its stored value
    model = loaded.model
    layers = _integer_layers(model)
    if not layers:
        raise NotExportableError(
            f"{source} has no integer-quantized Linear layers (quantize it with the gptq or "
            "rtn step): pack-quantized checkpoints store int codes, scales and zero points"
        )
    dtype = _checkpoint_dtype(model)
    schemes = {name: _scheme(name, q) for name, q in layers.items()}

    # tied weights (lm_head = embeddings) are stored once, as HF saves them
    tensors, _ = remaining_tensors(model, {f"{name}.weight" for name in layers})
    max_abs_diff = 0.0
    for name, q in layers.items():
        packed = pack_layer(q, schemes[name], dtype)
        max_abs_diff = max(max_abs_diff, _decompression_error(q, schemes[name], packed))
        tensors.update({f"{name}.{suffix}": tensor for suffix, tensor in packed.items()})

    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    dense_linears = sorted(set(linears) - set(layers))
    sparse = _sparse_24_layers(model, layers, linears)
    with atomic_folder(out) as partial:  # whole or not at all: a killed export leaves no half folder
        save_file(tensors, str(partial / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(partial)
        _write_quantization_config(partial, schemes, dense_linears, sparse)
        loaded.tokenizer.save_pretrained(partial)
        for file_name in COPIED_FILES:
            if (source / file_name).is_file():
                shutil.copy2(source / file_name, partial / file_name)
    figures = {
        "quantized_layers": float(len(layers)),
        "dense_linears": float(len(dense_linears)),
        "bits": float(max(q.bits for q in layers.values())),
        "sparse_24_layers": float(len(sparse)),
        "sparsity_24": _sparsity(sparse),
        "max_abs_diff": max_abs_diff,
        "bytes": float(size_on_disk(out)),
    }
    log.info("compressed-tensors export of %s: %s", source, figures)
    return figures


def pack_layer(q: QuantizedWeight, scheme: Scheme, dtype: torch.dtype) -> dict[str, Tensor]:
    """The pack-quantized tensors of one layer, keyed by their suffix (`weight_packed`, ...).

    compressed-tensors stores signed integers in [-2**(bits-1), 2**(bits-1)): our
    unsigned code c and zero point z become c - 2**(bits-1) and z - 2**(bits-1), which
    leaves every difference c - z, hence every weight, unchanged.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 2 ** (q.bits - 1)
    codes = (q.codes.to(torch.int16) - offset).to(torch.int8)  # (out, in), signed
    rows, columns = q.shape
    tensors = {
        "weight_packed": pack_to_int32(codes, q.bits),  # (out, ceil(in * bits / 32))
        "weight_scale": q.scale.to(dtype).contiguous(),  # (out, groups)
        "weight_shape": torch.tensor([rows, columns], dtype=torch.int64),
    }
    if not scheme.symmetric:
        zero = (q.zero.to(torch.int16) - offset).to(torch.int8)  # (out, groups), signed
        tensors["weight_zero_point"] = pack_to_int32(zero, q.bits, packed_dim=0)
    return tensors


def _integer_layers(model: nn.Module) -> dict[str, QuantizedWeight]:
    """{Linear name: its integer grid}, sharers of one weight included; other formats refused."""
    from squeezeflow.compression.formats import FORMATS, IntegerFormat, stored_linears

    integer = FORMATS.of(IntegerFormat)
    layers: dict[str, QuantizedWeight] = {}
    for linear in stored_linears(model):
        if linear.format is not integer:
            raise NotExportableError(
                f"{linear.owner} is stored as {linear.format.name!r}; compressed-tensors "
                "pack-quantized checkpoints hold integer grids only (quantize with gptq or rtn)"
            )
        for name in (linear.owner, *linear.sharers):  # a checkpoint cannot tie them: each written
            layers[name] = linear.stored
    return layers


def _scheme(name: str, q: QuantizedWeight) -> Scheme:
    """The compressed-tensors scheme of one layer, or the reason it has none."""
    rows, columns = q.shape
    if q.input_scale is not None or q.activation_bits is not None:
        raise NotExportableError(
            f"{name} is a W8A8 layer (SmoothQuant input scale or int8 activations); the "
            "pack-quantized export holds weight-only grids"
        )
    if not torch.equal(q.g_idx, group_index(columns, q.group_size)):
        raise NotExportableError(
            f"{name} has reordered input columns (act_order); pack-quantized checkpoints "
            "decompress contiguous groups only (quantize with act_order: false or static_groups)"
        )
    if q.group_size < columns and columns % q.group_size:
        raise NotExportableError(
            f"{name}: {columns} inputs are not a multiple of group size {q.group_size}; "
            "compressed-tensors needs equal groups"
        )
    if q.symmetric and not bool((q.zero == 2 ** (q.bits - 1)).all()):
        raise NotExportableError(f"{name} is marked symmetric but its zero points are not "
                                 f"{2 ** (q.bits - 1)}")
    return Scheme(bits=q.bits, group_size=q.group_size if q.group_size < columns else None,
                  symmetric=q.symmetric)


def _checkpoint_dtype(model: nn.Module) -> torch.dtype:
    """The dtype transformers loads the checkpoint in (config `dtype`, else float32): the
    dtype compressed-tensors gives `weight_scale`, so scales are stored in it."""
    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _ct_scheme(scheme: Scheme, targets: list[str]) -> Any:
    """compressed-tensors' QuantizationScheme for `scheme` on `targets`."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
        strategy=scheme.strategy, group_size=scheme.group_size if scheme.group_size else None,
        dynamic=False,
    )
    return QuantizationScheme(targets=targets, weights=weights,
                              format=CompressionFormat.pack_quantized.value)


def _decompression_error(q: QuantizedWeight, scheme: Scheme, packed: dict[str, Tensor]) -> float:
    """max |W_ct - W| of one layer: compressed-tensors' own decompression of the packed
    tensors against our reference weight (both in float32)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    state = {key: value.clone() for key, value in packed.items()}
    W_ct = PackedQuantizationCompressor.decompress(state, _ct_scheme(scheme, ["Linear"]))["weight"]
    W = q.dequantize(torch.float32)  # (out, in)
    return float((W_ct.to(torch.float32) - W).abs().max())


def _write_quantization_config(
    folder: Path, schemes: dict[str, Scheme], dense_linears: list[str], sparse: dict[str, Tensor],
) -> None:
    """Add compressed-tensors' `quantization_config` (and the 2:4 `sparsity_config`) to
    the config.json in `folder`, through its own config objects and writer."""
    import json

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    by_scheme: dict[Scheme, list[str]] = {}
    for name, scheme in schemes.items():
        by_scheme.setdefault(scheme, []).append(name)
    if len(by_scheme) == 1:
        # the usual form (llm-compressor's): every Linear but those ignored
        (scheme,) = by_scheme
        groups = {"group_0": _ct_scheme(scheme, ["Linear"])}
    else:  # one group per setting, naming its layers
        groups = {f"group_{index}": _ct_scheme(scheme, names)
                  for index, (scheme, names) in enumerate(by_scheme.items())}
    config = QuantizationConfig(
        config_groups=groups, format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED, ignore=dense_linears,
    )
    ModelCompressor(quantization_config=config).update_config(str(folder))
    if not sparse:
        return
    sparsity = SparsityCompressionConfig.load_from_registry(
        CompressionFormat.dense.value, targets=sorted(sparse), global_sparsity=_sparsity(sparse),
        sparsity_structure=f"{SPARSE_N}:{SPARSE_M}",
    )
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["sparsity_config"] = sparsity.model_dump()
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _sparse_24_layers(
    model: nn.Module, layers: dict[str, QuantizedWeight], linears: list[str]
) -> dict[str, Tensor]:
    """{Linear name: its weight} of every Linear whose weight (as exported) is 2:4 sparse."""
    from squeezeflow.compression.pruning.sparsity import is_valid_nm

    sparse: dict[str, Tensor] = {}
    for name in linears:
        q = layers.get(name)
        weight = model.get_submodule(name).weight
        assert isinstance(weight, Tensor)
        W = q.dequantize(torch.float32) if q is not None else weight.detach()  # (out, in)
        if W.dim() == 2 and W.shape[1] % SPARSE_M == 0 and is_valid_nm(W, SPARSE_N, SPARSE_M):
            sparse[name] = W
    return sparse


def _sparsity(weights: dict[str, Tensor]) -> float:
    """Fraction of zeros over all of `weights` (0 when there are none)."""
    total = sum(W.numel() for W in weights.values())
    zeros = sum(int((W == 0).sum()) for W in weights.values())
    return zeros / total if total else 0.0

"""The compressed-model folder: a Hugging Face folder whose quantized weights are packed.

Layout of a saved folder:
- `config.json`, tokenizer files: as Hugging Face writes them;
- `model.safetensors`: every dense tensor, and for each quantized Linear `NAME`
  the tensors `NAME.qweight` (codes bit-packed into uint8), `NAME.scales` (fp16),
  `NAME.qzeros` (zero points bit-packed), only when columns were reordered
  `NAME.g_idx`, and only for SmoothQuant-scaled W8A8 layers `NAME.input_scale`;
  NF4/FP4 Linears (`quantization/codebook.py`) store `NAME.qweight` (4-bit codes),
  `NAME.scales` (fp16 block absmax) and `NAME.codebook` (16 fp32 values);
- `squeezeflow.json`: the format version, the model kind and, per quantized
  Linear, its bits, shape, group size, symmetry and activation bits (8 = W8A8);
  `codebook`: per NF4/FP4 Linear its bits, shape, block size and format; `tied`: tensors stored once
  and shared (loading makes the modules share one Parameter again); `factorized`:
  Linears replaced by two thin ones (`FactorizedLinear`) and their rank, rebuilt
  before the weights load.
A folder without `squeezeflow.json` is a plain HF model and loads as one.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, nullcontext
from importlib import import_module
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from squeezeflow.compression.lowrank.factorized import FactorizedLinear, factorize_modules
from squeezeflow.compression.models import (
    LoadedModel,
    ModelKind,
    load_pretrained,
    load_tokenizer,
    model_class,
)
from squeezeflow.compression.packed import packed_layer, replace_module, to_packed_runtime
from squeezeflow.compression.quantization.codebook import (
    CODEBOOK_ATTR,
    CodebookWeight,
    current_codebook,
)
from squeezeflow.compression.quantization.qweight import (
    QUANTIZED_ATTR,
    QuantizedWeight,
    as_stored,
    current_quantized,
    group_index,
    pack_bits,
    unpack_bits,
)
from squeezeflow.compression.tensorfile import TensorFile

log = logging.getLogger(__name__)

FORMAT_FILE = "squeezeflow.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1

# "dense": quantized Linears hold dequantized fp32 weights (what compression steps
# work on); "packed": they are QuantLinear modules calling packed int kernels (what
# a user runs; see compression/packed.py).
Runtime = Literal["dense", "packed"]


def save_compressed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    kind: ModelKind,
    path: Path,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` to `path` with every still-valid quantized Linear packed."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)

    tensors: dict[str, torch.Tensor] = {}
    quantized_specs: dict[str, dict[str, Any]] = {}
    codebook_specs: dict[str, dict[str, Any]] = {}
    packed_weights: set[str] = set()
    for name, module in model.named_modules():
        coded = current_codebook(module)
        if coded is not None:  # 4-bit float codes (NF4/FP4) with block scales
            tensors.update({
                f"{name}.qweight": pack_bits(coded.codes, coded.bits),
                f"{name}.scales": coded.scale.to(torch.float16).contiguous(),
                f"{name}.codebook": coded.codebook.contiguous(),
            })
            codebook_specs[name] = {"bits": coded.bits, "shape": list(coded.shape),
                                    "block_size": coded.block_size, "format": coded.format}
            packed_weights.add(f"{name}.weight")
            continue
        quantized = current_quantized(module)
        if quantized is None:
            if getattr(module, QUANTIZED_ATTR, None) or getattr(module, CODEBOOK_ATTR, None):
                log.warning("%s changed after quantization; stored dense", name)
            continue
        tensors.update(_packed_tensors(name, quantized))
        quantized_specs[name] = {
            "bits": quantized.bits,
            "shape": list(quantized.shape),
            "group_size": quantized.group_size,
            "symmetric": quantized.symmetric,
            "activation_bits": quantized.activation_bits,
        }
        packed_weights.add(f"{name}.weight")

    seen_storage: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in model.state_dict().items():
        if name in packed_weights:
            continue
        pointer = tensor.data_ptr()
        if pointer in seen_storage and tensor.numel() > 0:
            tied[name] = seen_storage[pointer]  # tied weights are stored once
            continue
        seen_storage[pointer] = name
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    description = {
        "format": "squeezeflow.packed",
        "version": FORMAT_VERSION,
        "kind": kind,
        "quantized": quantized_specs,
        "codebook": codebook_specs,
        "tied": tied,
        "factorized": {
            name: module.rank for name, module in model.named_modules()
            if isinstance(module, FactorizedLinear)
        },
        "metadata": metadata or {},
    }
    (path / FORMAT_FILE).write_text(json.dumps(description, indent=2, sort_keys=True))
    return path


def load_compressed(path: str | Path, runtime: Runtime = "dense") -> LoadedModel:
    """Load a folder written by `save_compressed` (or a plain HF model folder).

    `runtime="packed"` swaps quantized Linears for packed QuantLinear modules; the
    default keeps them dense so that further compression stages can change them.
    """
    path = Path(path)
    if runtime not in ("dense", "packed"):
        raise ValueError(f"runtime must be 'dense' or 'packed', got {runtime!r}")
    if not (path / FORMAT_FILE).exists():
        return load_pretrained(path)
    description = json.loads((path / FORMAT_FILE).read_text())
    if description.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / FORMAT_FILE}: format version {description.get('version')} is not "
            f"supported (this squeezeflow reads version {FORMAT_VERSION})"
        )
    kind: ModelKind = description["kind"]
    config = AutoConfig.from_pretrained(path)
    with _no_weight_init():  # every weight comes from the file; random init is wasted work
        model = model_class(kind).from_config(config, dtype=torch.float32)
    factorize_modules(model, description.get("factorized", {}))
    tied: dict[str, str] = description["tied"]
    loaded: set[str] = set()

    # One tensor at a time: peak memory stays near what the model holds. Packed layers
    # are read into their own buffers (`stored`) since they are unpacked anyway; plain
    # tensors stay memory-mapped (`mapped`), so only the pages a model touches (the
    # embedding rows of the tokens it sees) become resident, as with from_pretrained.
    with TensorFile(path / WEIGHTS_FILE) as stored, \
            safe_open(str(path / WEIGHTS_FILE), framework="pt") as mapped:
        names = set(stored.keys())
        quantized_specs = dict(description["quantized"])
        if runtime == "packed":
            # Packed layers are built straight from the file: the dense weight allocated
            # by from_config is never written, so it never becomes resident memory.
            loaded |= _load_packed_layers(model, quantized_specs, stored, names, tied)
        params = dict(model.state_dict(keep_vars=True))

        def assign(name: str, value: torch.Tensor) -> None:
            if name not in params:
                raise ValueError(f"{path}: stored tensor {name} is not in the model's config")
            target = params[name]
            if value.shape != target.shape:
                raise ValueError(f"{path}: {name} is stored as {tuple(value.shape)}, "
                                 f"the config makes it {tuple(target.shape)}")
            # The read tensor becomes the parameter's storage: no second copy, and the
            # uninitialized one from_config allocated is freed without being touched.
            target.data = value.to(target.dtype).contiguous()  # Conv1D weights come transposed
            loaded.add(name)

        modules = dict(model.named_modules())
        for name, spec in quantized_specs.items():
            quantized = _unpack(name, spec, stored, names)
            assign(f"{name}.weight", as_stored(modules[name], quantized.dequantize()))
            setattr(modules[name], QUANTIZED_ATTR, quantized)
        for name, spec in description.get("codebook", {}).items():
            coded = _unpack_codebook(name, spec, stored, names)
            assign(f"{name}.weight", as_stored(modules[name], coded.dequantize()))
            setattr(modules[name], CODEBOOK_ATTR, coded)
        for name in sorted(names):
            assign(name, mapped.get_tensor(name))
    for name, source in tied.items():
        _tie(model, name, source)
        loaded.add(name)
    missing = set(params) - loaded - _non_persistent(model)
    if missing:
        raise ValueError(f"{path}: weights missing from {WEIGHTS_FILE}: {sorted(missing)[:5]}")
    model.eval()
    if runtime == "packed":
        to_packed_runtime(model)  # quantized layers the early path left (tied ones)
    return LoadedModel(model=model, tokenizer=load_tokenizer(path), kind=kind, path=path)


def _load_packed_layers(
    model: nn.Module, specs: dict[str, Any], stored: Any, names: set[str], tied: dict[str, str]
) -> set[str]:
    """Swap each quantized layer for its packed runtime module, read from `stored`.

    Consumes the layers' entries of `specs` and `names`; returns the state-dict names
    the packed modules now provide. Layers whose weight is tied to another stay in
    `specs` for the dense path (the tie needs the dense Parameter).
    """
    in_ties = {name.rpartition(".")[0] for pair in tied.items() for name in pair}
    provided: set[str] = set()
    for name in [n for n in specs if n not in in_ties]:
        module = model.get_submodule(name)
        quantized = _unpack(name, specs.pop(name), stored, names)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and f"{name}.bias" in names:
            names.discard(f"{name}.bias")
            with torch.no_grad():
                bias.copy_(stored.get_tensor(f"{name}.bias"))
        packed = packed_layer(module, quantized)
        replace_module(model, name, packed)
        provided |= {f"{name}.{key}" for key in packed.state_dict()}
    return provided


def _no_weight_init() -> AbstractContextManager[Any]:
    """transformers' switch that skips random initialization, where this version has it."""
    for module_name in ("transformers.initialization", "transformers.modeling_utils"):
        switch = getattr(import_module(module_name), "no_init_weights", None)
        if switch is not None:
            return cast(AbstractContextManager[Any], switch())
    return nullcontext()


def size_on_disk(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _packed_tensors(name: str, quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    tensors = {
        f"{name}.qweight": pack_bits(quantized.codes, quantized.bits),
        f"{name}.scales": quantized.scale.to(torch.float16).contiguous(),
        f"{name}.qzeros": pack_bits(quantized.zero, quantized.bits),
    }
    columns = quantized.shape[1]
    if not torch.equal(quantized.g_idx, group_index(columns, quantized.group_size)):
        tensors[f"{name}.g_idx"] = quantized.g_idx.to(torch.int32)
    if quantized.input_scale is not None:  # SmoothQuant factor kept for the W8A8 runtime
        tensors[f"{name}.input_scale"] = quantized.input_scale.to(torch.float32).contiguous()
    return tensors


def _unpack(name: str, spec: dict[str, Any], stored: Any, names: set[str]) -> QuantizedWeight:
    """Read one packed Linear from an open safetensors file; consumes its names."""

    def take(suffix: str) -> torch.Tensor | None:
        key = f"{name}.{suffix}"
        if key not in names:
            return None
        names.discard(key)
        tensor: torch.Tensor = stored.get_tensor(key)
        return tensor

    bits, (rows, columns) = spec["bits"], spec["shape"]
    scales, qweight, qzeros = take("scales"), take("qweight"), take("qzeros")
    if scales is None or qweight is None or qzeros is None:
        raise ValueError(f"packed tensors of {name} are incomplete")
    scale = scales.to(torch.float32)  # (out, groups)
    g_idx_stored = take("g_idx")
    g_idx = (
        group_index(columns, spec["group_size"])
        if g_idx_stored is None
        else g_idx_stored.to(torch.int64)
    )
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


def _unpack_codebook(name: str, spec: dict[str, Any], stored: Any, names: set[str]) -> CodebookWeight:
    """Read one NF4/FP4 Linear from an open safetensors file; consumes its names."""
    keys = {suffix: f"{name}.{suffix}" for suffix in ("qweight", "scales", "codebook")}
    if not set(keys.values()) <= names:
        raise ValueError(f"packed tensors of {name} are incomplete")
    names.difference_update(keys.values())
    return CodebookWeight(
        codes=unpack_bits(stored.get_tensor(keys["qweight"]), spec["bits"], tuple(spec["shape"])),
        scale=stored.get_tensor(keys["scales"]).to(torch.float32),  # (out, blocks)
        codebook=stored.get_tensor(keys["codebook"]),
        bits=spec["bits"],
        block_size=spec["block_size"],
        format=spec["format"],
    )


def _tie(model: nn.Module, name: str, source: str) -> None:
    """Make parameter `name` the very Parameter object `source` (shared, stored once)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    shared = model.get_parameter(source) if attribute in module._parameters else None
    if shared is None:  # a tied buffer: copy the value
        with torch.no_grad():
            getattr(module, attribute).copy_(model.get_buffer(source))
        return
    setattr(module, attribute, shared)


def _non_persistent(model: nn.Module) -> set[str]:
    """Buffers that HF models rebuild themselves (e.g. position ids)."""
    names = set()
    for module_name, module in model.named_modules():
        for buffer_name in getattr(module, "_non_persistent_buffers_set", set()):
            names.add(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    return names

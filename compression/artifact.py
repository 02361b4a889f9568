"""The compressed-model folder: a Hugging Face folder whose stored-format weights are packed.

Layout of a saved folder:
- `config.json`, tokenizer files: as Hugging Face writes them;
- `model.safetensors`: every dense tensor, and for each Linear `NAME` whose weight a
  registered weight format still describes, that format's packed tensors
  `NAME.<suffix>` instead of `NAME.weight` (`compression/formats/`: `quantized`, the
  integer grid, stores `qweight`/`scales`/`qzeros` [+ `g_idx`, `input_scale`];
  `codebook`, NF4/FP4, stores `qweight`/`scales`/`codebook`; `rps` stores the shared
  `z` once and each layer's `scale`; `qmoe`, QMoE's coded ternary weights, stores
  `codewords`/`offsets`/`levels`/`level_scales`/`pair_costs`, also for stacked MoE
  experts, instead of the parameters it names: `gate_up_proj`, `down_proj`);
- `squeezeflow.json`: the format version, the model kind, under each weight format's
  name {Linear name: its spec} (e.g. bits, shape, group size); `tied`: tensors stored
  once and shared (loading makes the modules share one Parameter again; Linears
  sharing one packed weight share, with `runtime="packed"`, one runtime module, or
  its packed buffers where their biases differ);
  `factorized`: Linears replaced by two thin ones (`FactorizedLinear`) and their
  rank, rebuilt before the weights load.
- `manifest.sha256.json`: {file: sha256} of every other file (`compression/integrity.py`);
  loading verifies it and refuses a folder whose files changed since.
A folder without `squeezeflow.json` is a plain HF model and loads as one.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from squeezeflow.compression.formats import (
    FORMATS,
    Take,
    UnknownFormatError,
    remaining_tensors,
    stored_linears,
)
from squeezeflow.compression.formats.bitstack import fit_memory_budget
from squeezeflow.compression.integrity import has_manifest, verify_folder, write_manifest
from squeezeflow.compression.lowrank.factorized import FactorizedLinear, factorize_modules
from squeezeflow.compression.models import (
    LoadedModel,
    ModelKind,
    detect_kind,
    load_pretrained,
    load_tokenizer,
    model_class,
)
from squeezeflow.compression.packed import install_runtime
from squeezeflow.compression.shards import Shards, is_sharded

log = logging.getLogger(__name__)

FORMAT_FILE = "squeezeflow.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
# Keys of squeezeflow.json besides the weight formats' own (one per format name).
DESCRIPTION_KEYS = ("format", "version", "kind", "tied", "factorized", "metadata")

# "dense": stored-format Linears hold dequantized fp32 weights (what compression steps
# work on), except formats whose runtime module is what later stages train (`rps`:
# RPSLinear, W computed from the shared z); "packed": they are their format's runtime
# modules, e.g. QuantLinear calling packed int kernels (what a user runs; see
# compression/packed.py).
Runtime = Literal["dense", "packed"]


def save_compressed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    kind: ModelKind,
    path: Path,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` to `path` with every still-valid stored-format Linear packed."""
    clash = sorted(set(DESCRIPTION_KEYS) & set(FORMATS.names()))
    if clash:
        raise ValueError(f"weight format name {clash[0]!r} is a reserved key of {FORMAT_FILE}")
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)

    part = packed_tensors(model)
    save_file(part.tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    write_description(path, kind, part.specs, part.tied, factorized_ranks(model), metadata)
    write_manifest(path)  # last: it hashes every file written above
    return path


@dataclass
class PackedPart:
    """What a model (or one block of it) stores: its tensors, the weight formats' specs
    of its stored-format Linears and the names tied to a tensor stored once."""

    tensors: dict[str, torch.Tensor]
    specs: dict[str, dict[str, dict[str, Any]]]
    tied: dict[str, str]


def packed_tensors(module: nn.Module, prefix: str = "") -> PackedPart:
    """The tensors `save_compressed` writes for `module`, named under `prefix`: every
    stored-format Linear packed, every other tensor as it is, tied ones once."""
    def full(name: str) -> str:
        return f"{prefix}.{name}" if prefix and name else (prefix or name)

    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, dict[str, dict[str, Any]]] = {f.name: {} for f in FORMATS}
    tied: dict[str, str] = {}
    stored_weights: set[str] = set()  # state-dict names a format stores instead
    written: dict[tuple[Any, ...], str] = {}  # storage of each packed tensor written -> its name
    for linear in stored_linears(module):
        weight_format = linear.format
        owner = full(linear.owner)
        packed = weight_format.tensors(owner, linear.stored)
        for key, tensor in packed.items():
            first = written.setdefault(_storage(tensor), key) if tensor.numel() else key
            if first != key:  # held by several layers' stored values (RPS's z): written once
                tied[key] = first
            else:
                _add(tensors, {key: tensor})
        specs[weight_format.name][owner] = weight_format.spec(linear.stored)
        # the parameters the format stores instead (a Linear's weight; stacked experts' own)
        stored_weights.update(f"{owner}.{p}" for p in weight_format.parameter_names(linear.stored))
        stored_weights.update(packed)  # a runtime module's own tensors (RPS: z, scale)
        for sharer in linear.sharers:  # a shared quantized weight is stored once, packed
            tied[f"{full(sharer)}.weight"] = f"{owner}.weight"
            stored_weights.add(f"{full(sharer)}.weight")

    rest, rest_tied = remaining_tensors(module, stored_weights, prefix)  # tied weights stored once
    _add(tensors, rest)
    tied.update(rest_tied)
    return PackedPart(tensors=tensors, specs=specs, tied=tied)


def factorized_ranks(model: nn.Module) -> dict[str, int]:
    return {name: module.rank for name, module in model.named_modules()
            if isinstance(module, FactorizedLinear)}


def write_description(
    path: Path, kind: ModelKind, specs: dict[str, dict[str, dict[str, Any]]],
    tied: dict[str, str], factorized: dict[str, int], metadata: dict[str, Any] | None,
) -> None:
    """Write squeezeflow.json, then the manifest over every file of `path` (last)."""
    description = {
        "format": "squeezeflow.packed",
        "version": FORMAT_VERSION,
        "kind": kind,
        **specs,
        "tied": tied,
        "factorized": factorized,
        "metadata": metadata or {},
    }
    (path / FORMAT_FILE).write_text(json.dumps(description, indent=2, sort_keys=True))
    write_manifest(path)  # last: it hashes every file written above


def stored_kind(path: str | Path) -> ModelKind:
    """The model kind of a folder `load_compressed` reads, from its description or
    config.json alone (no weights)."""
    path = Path(path)
    if (path / FORMAT_FILE).exists():
        kind: ModelKind = json.loads((path / FORMAT_FILE).read_text())["kind"]
        return kind
    return detect_kind(AutoConfig.from_pretrained(path))


def load_compressed(
    path: str | Path, runtime: Runtime = "dense", *, verify: bool = True,
    memory_budget_mb: float | None = None,
) -> LoadedModel:
    """Load a folder written by `save_compressed` (or a plain HF model folder).

    `memory_budget_mb` (BitStack models): read only the residual blocks that fit in this
    many MiB of stored tensors, in the stored importance order (`formats/bitstack.py`).

    A folder with a manifest (every folder `save_compressed` writes) is checked file by
    file first (`verify=False` skips it where the caller just checked the folder).

    `runtime="packed"` builds each stored-format Linear's runtime module straight from
    the file (e.g. a packed QuantLinear); the default keeps them dense, with the stored
    value attached, so that further compression stages can change them.
    """
    path = Path(path)
    if runtime not in ("dense", "packed"):
        raise ValueError(f"runtime must be 'dense' or 'packed', got {runtime!r}")
    if verify and has_manifest(path):
        verify_folder(path)  # IntegrityError naming the file that changed since it was saved
    if not (path / FORMAT_FILE).exists():
        return load_pretrained(path)
    description = json.loads((path / FORMAT_FILE).read_text())
    if description.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / FORMAT_FILE}: format version {description.get('version')} is not "
            f"supported (this squeezeflow reads version {FORMAT_VERSION})"
        )
    specs = _format_specs(description, path / FORMAT_FILE)
    not_read: frozenset[str] = frozenset()  # tensors a memory budget leaves on disk
    if memory_budget_mb is not None:
        if is_sharded(path):
            raise ValueError(f"{path}: a memory budget needs a single {WEIGHTS_FILE}, "
                             "and this folder is sharded")
        specs, not_read = fit_memory_budget(specs, path / WEIGHTS_FILE, memory_budget_mb)
    kind: ModelKind = description["kind"]
    config = AutoConfig.from_pretrained(path)
    with _no_weight_init():  # every weight comes from the file; random init is wasted work
        model = model_class(kind).from_config(config, dtype=torch.float32)
    factorize_modules(model, description.get("factorized", {}))
    tied: dict[str, str] = description["tied"]
    modules = dict(model.named_modules())
    stored_layers = {name for layers in specs.values() for name in layers}
    sharers = _weight_sharers(tied, stored_layers)
    runtime_layers = stored_layers | {name for group in sharers.values() for name in group}
    # Formats whose layers get their runtime module here: all of them for the packed
    # runtime; for the dense one those whose runtime module is what later stages train.
    installing = {f for f in specs if runtime == "packed" or _dense_is_runtime(FORMATS.get(f))}
    installed = {name for f in installing for name in specs[f]}
    installed |= {name for owner in installed for name in sharers.get(owner, [])}
    tied_sources = set(tied.values())
    absent = sorted(runtime_layers - set(modules))
    if absent:
        raise ValueError(f"{path}: stored layer {absent[0]} is not in the model's config")
    params = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()

    # One tensor at a time: peak memory stays near what the model holds. Packed layers
    # are read into their own buffers (`stored`) since they are unpacked anyway; plain
    # tensors stay memory-mapped (`mapped`), so only the pages a model touches (the
    # embedding rows of the tokens it sees) become resident, as with from_pretrained.
    with Shards(path) as weights:
        names = set(weights.keys()) - not_read

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

        shared_reads: dict[str, torch.Tensor] = {}  # packed tensors several layers hold

        def taker(layer: str) -> Take:
            def take(suffix: str) -> torch.Tensor | None:
                key = f"{layer}.{suffix}"
                source = tied.get(key, key)  # a packed tensor stored once for several layers
                if source != key:
                    loaded.add(key)
                if source in shared_reads:
                    return shared_reads[source]  # the very same tensor for every holder
                if source not in names:
                    return None
                names.discard(source)
                tensor: torch.Tensor = weights.read(source)
                if source in tied_sources:
                    shared_reads[source] = tensor
                return tensor
            return take

        if installed:
            # A runtime module copies its bias when built: those biases (and what they
            # are tied to) are loaded first.
            for module_name in sorted(installed):
                key = f"{module_name}.bias"
                if key not in params:
                    continue
                source = tied.get(key, key)
                if source in names:
                    names.discard(source)
                    assign(source, weights.mapped(source))
                if source != key:
                    _tie(model, params, key, source)
                    loaded.add(key)

        for format_name, layers in specs.items():
            weight_format = FORMATS.get(format_name)
            for name, spec in layers.items():
                value = weight_format.read(name, spec, taker(name))
                group = sharers.get(name, [])
                if format_name in installing:
                    # Built straight from the file: the dense weight from_config allocated
                    # is never written, so it never becomes resident memory.
                    install_runtime(model, weight_format, value, name, group)
                    for module_name in (name, *group):
                        for parameter in weight_format.parameter_names(value):
                            loaded.add(f"{module_name}.{parameter}")
                            params.pop(f"{module_name}.{parameter}", None)
                    continue
                module = modules[name]
                for parameter, dense in weight_format.dense(module, value).items():
                    assign(f"{name}.{parameter}", dense)  # a Linear's weight: as_stored layout
                for module_name in (name, *group):  # the sharers' weights are tied below
                    weight_format.attach(modules[module_name], value)
        _one_parameter_per_storage([model.get_submodule(name) for name in sorted(installed)])
        for name in sorted(names):
            assign(name, weights.mapped(name))
    for name, source in tied.items():
        if name in loaded:
            continue  # tied already (packed runtime: biases, shared packed weights)
        _tie(model, params, name, source)
        loaded.add(name)
    missing = set(params) - loaded - _non_persistent(model)
    if missing:
        raise ValueError(f"{path}: weights missing from {WEIGHTS_FILE}: {sorted(missing)[:5]}")
    model.eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(path), kind=kind, path=path)


def _format_specs(description: dict[str, Any], where: Path) -> dict[str, dict[str, Any]]:
    """{format name: {layer name: spec}} of a squeezeflow.json, in registration order."""
    unknown = sorted(set(description) - set(DESCRIPTION_KEYS) - set(FORMATS.names()))
    if unknown:
        raise UnknownFormatError(
            f"{where}: unknown weight format {unknown[0]!r} (written by a newer squeezeflow "
            f"or a plugin not installed); known formats: {', '.join(FORMATS.names())}"
        )
    return {f.name: dict(description[f.name]) for f in FORMATS if description.get(f.name)}


def _weight_sharers(tied: dict[str, str], owners: set[str]) -> dict[str, list[str]]:
    """{owner layer: layers whose weight is tied to its stored (packed) weight}."""
    sharers: dict[str, list[str]] = {}
    for name, source in tied.items():
        module_name, _, attribute = name.rpartition(".")
        owner, _, source_attribute = source.rpartition(".")
        if attribute == source_attribute == "weight" and owner in owners:
            sharers.setdefault(owner, []).append(module_name)
    return sharers


def _dense_is_runtime(weight_format: Any) -> bool:
    """Whether a format's dense load builds its runtime module too (RPS: the module that
    computes W from the shared z is also what a later `distill` stage trains)."""
    return bool(getattr(weight_format, "dense_is_runtime", False))


def _storage(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What identifies a tensor's memory: two tensors with this key hold the same numbers."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype, tensor.device)


def _one_parameter_per_storage(modules: list[nn.Module]) -> None:
    """Parameters of `modules` on one storage become one Parameter (RPS's z, read once and
    handed to every layer): the optimizer then sees, and updates, it once."""
    first: dict[tuple[Any, ...], nn.Parameter] = {}
    for module in modules:
        for submodule in module.modules():
            for attribute, parameter in list(submodule._parameters.items()):
                if parameter is None or parameter.numel() == 0:
                    continue
                kept = first.setdefault(_storage(parameter), parameter)
                if kept is not parameter:
                    setattr(submodule, attribute, kept)


def _add(tensors: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    """Add `new` to the tensors to write; a name written twice is a bug, not an overwrite."""
    clash = sorted(set(tensors) & set(new))
    if clash:
        raise ValueError(f"tensor {clash[0]} would be written twice to {WEIGHTS_FILE}")
    tensors.update(new)


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


def _tie(model: nn.Module, params: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Make parameter `name` the very Parameter object `source` (shared, stored once)."""
    if source not in params:
        raise ValueError(f"tied tensor {name}: its source {source} is not in the model's config")
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    shared = params[source]
    if attribute in module._parameters and isinstance(shared, nn.Parameter):
        setattr(module, attribute, shared)
        return
    with torch.no_grad():  # a tied buffer: copy the value
        getattr(module, attribute).copy_(shared)


def _non_persistent(model: nn.Module) -> set[str]:
    """Buffers that HF models rebuild themselves (e.g. position ids)."""
    names = set()
    for module_name, module in model.named_modules():
        for buffer_name in getattr(module, "_non_persistent_buffers_set", set()):
            names.add(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    return names

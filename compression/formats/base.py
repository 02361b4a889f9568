"""The weight-format contract and its registry (`FORMATS`).

A weight format is one way a Linear weight is stored: an integer grid, an NF4/FP4
codebook, ... It is one class, registered with `@register_format` like a step is with
`@register_step`, and it alone knows its byte layout:

- `name`: its key in `squeezeflow.json` ({module name: spec} under that key);
- `attr`: the module attribute its stored value rides on, and `stored_type`, the
  frozen dataclass of that value;
- `current(module)`: the stored value if it still describes the weight exactly;
- `spec(stored)` (JSON) and `tensors(name, stored)` (safetensors): pack;
- `read(name, spec, take)`: unpack, taking its tensors by suffix;
- `runtime(module, stored)`: the module that runs the stored weight (packed runtime);
- `reference(stored)`: the plain-torch dense weight (out, in) every runtime is checked
  against, and `tolerance`, its accuracy contract.

Save and load (`compression/artifact.py`), the packed runtime (`compression/packed.py`)
and the exporters loop over `FORMATS`: a new format is one file in this folder plus
its import line in `formats/__init__.py`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from squeezeflow.compression.quantization.qweight import Dequantizable, as_stored, current_stored

log = logging.getLogger(__name__)

StoredT = TypeVar("StoredT", bound=Dequantizable)

# `take(suffix)`: the tensor `NAME.suffix` of the layer being read, or None when the
# file lacks it; each tensor taken is consumed (it is not loaded as a plain tensor).
Take = Callable[[str], Tensor | None]


class UnknownFormatError(ValueError):
    """A weight format name that is not registered."""


class WeightFormat(ABC, Generic[StoredT]):
    """One stored weight format. Subclasses set the class attributes and the methods.

    Accuracy contract (each subclass states its own): `runtime(module, stored)(x)` is
    within relative error `tolerance` of `x @ reference(stored).T + bias` on Gaussian
    inputs, and `read(name, spec(stored), take from tensors(name, stored))` gives back
    `stored` exactly (pack/unpack is lossless).
    """

    name: ClassVar[str]  # key in squeezeflow.json
    attr: ClassVar[str]  # module attribute carrying the stored value
    stored_type: type[StoredT]  # the frozen dataclass that attribute holds
    tolerance: ClassVar[float]  # relative error of the runtime module against `reference`

    def current(self, module: nn.Module) -> StoredT | None:
        """The module's stored value if it still describes its weight exactly."""
        return current_stored(module, self.attr, self.stored_type)

    def attached(self, module: nn.Module) -> bool:
        """Whether the module carries a value of this format (current or stale)."""
        return getattr(module, self.attr, None) is not None

    def attach(self, module: nn.Module, stored: StoredT) -> None:
        """Remember `stored` on a module whose weight already holds `reference(stored)`."""
        setattr(module, self.attr, stored)

    def reference(self, stored: StoredT, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight (out, in) that `stored` encodes: plain torch, the ground truth."""
        return stored.dequantize(dtype)

    def parameter_names(self, stored: StoredT) -> tuple[str, ...]:
        """The module's parameters that `stored` stands for (saved packed, not dense).

        A Linear's `weight`; a format for modules without one (stacked MoE experts:
        `gate_up_proj`, `down_proj`) names its own and overrides `current` and `dense`.
        """
        return ("weight",)

    def dense(self, module: nn.Module, stored: StoredT) -> dict[str, Tensor]:
        """{parameter name: value} in the module's own layout: what a dense load assigns."""
        return {"weight": as_stored(module, self.reference(stored))}

    @abstractmethod
    def spec(self, stored: StoredT) -> dict[str, Any]:
        """The JSON-able description of one layer (its entry in squeezeflow.json)."""

    @abstractmethod
    def tensors(self, name: str, stored: StoredT) -> dict[str, Tensor]:
        """The packed tensors of layer `name` for safetensors, keyed `name.suffix`."""

    @abstractmethod
    def read(self, name: str, spec: dict[str, Any], take: Take) -> StoredT:
        """Inverse of `spec` + `tensors`: the stored value of layer `name`."""

    @abstractmethod
    def runtime(self, module: nn.Module, stored: StoredT, *, fuse: bool = True) -> nn.Module:
        """The module that runs `stored` with `module`'s bias (`module`'s weight unused).

        Returning `module` itself means this format runs dense here: its weight then
        holds `reference(stored)`. `fuse` lets kernels compile their fused parts.
        """


FormatT = TypeVar("FormatT", bound=WeightFormat[Any])


class FormatRegistry:
    """Registered weight formats by name. One instance lives in this module (`FORMATS`)."""

    def __init__(self) -> None:
        self._formats: dict[str, WeightFormat[Any]] = {}

    def add(self, weight_format: WeightFormat[Any]) -> None:
        name, attr = weight_format.name, weight_format.attr
        if name in self._formats:
            raise ValueError(
                f"weight format {name!r} is already registered by "
                f"{type(self._formats[name]).__qualname__}; known formats: {', '.join(self.names())}"
            )
        clash = [f.name for f in self._formats.values() if f.attr == attr]
        if clash:
            raise ValueError(f"weight format {name!r}: attribute {attr!r} is already used by {clash[0]!r}")
        self._formats[name] = weight_format

    def remove(self, name: str) -> None:
        """Unregister `name` (tests registering a temporary format)."""
        self._formats.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._formats)

    def get(self, name: str) -> WeightFormat[Any]:
        if name not in self._formats:
            raise UnknownFormatError(
                f"unknown weight format {name!r}; known formats: {', '.join(self.names())}"
            )
        return self._formats[name]

    def of(self, format_cls: type[FormatT]) -> FormatT:
        """The registered instance of `format_cls` (typed access for exporters)."""
        for weight_format in self._formats.values():
            if type(weight_format) is format_cls:
                return weight_format
        raise UnknownFormatError(
            f"weight format class {format_cls.__qualname__} is not registered; "
            f"known formats: {', '.join(self.names())}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._formats

    def __iter__(self) -> Iterator[WeightFormat[Any]]:
        """Formats in registration order (the order save and load visit them)."""
        return iter(list(self._formats.values()))

    def __len__(self) -> int:
        return len(self._formats)

    def current(self, module: nn.Module) -> tuple[WeightFormat[Any], Any] | None:
        """The format and stored value that still describe `module`'s weight, if any."""
        for weight_format in self._formats.values():
            stored = weight_format.current(module)
            if stored is not None:
                return weight_format, stored
        return None

    def attached(self, module: nn.Module) -> bool:
        return any(f.attached(module) for f in self._formats.values())


FORMATS = FormatRegistry()


def register_format(format_cls: type[FormatT]) -> type[FormatT]:
    """Class decorator: `@register_format class IntegerFormat(WeightFormat[QuantizedWeight])`."""
    FORMATS.add(format_cls())
    return format_cls


@dataclass(frozen=True)
class StoredLinear:
    """One stored weight of a model and every module that runs it.

    `owner` carries the stored value (its `format.attr`); `sharers` are modules whose
    `weight` is the very same Parameter (block sharing, ties), so the weight is stored,
    and run, once.
    """

    format: WeightFormat[Any]
    stored: Any
    owner: str
    sharers: tuple[str, ...] = ()


def stored_linears(model: nn.Module, formats: FormatRegistry = FORMATS) -> list[StoredLinear]:
    """Every weight of `model` that a registered format still describes exactly.

    A module sharing an owner's weight Parameter is one of its sharers when it is of
    the owner's type (a Linear tied to a Linear); anything else sharing it (an
    embedding tied to a quantized head) keeps its own dense copy. A module whose
    stored value no longer matches its weight is logged and left dense.
    """
    found: list[StoredLinear] = []
    owner_of: dict[int, tuple[int, type[nn.Module]]] = {}  # id(weight) -> (index, owner type)
    owner_weights: list[Tensor] = []  # held, so that a computed weight's id is never reused
    others: list[tuple[str, nn.Module, Tensor]] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            # A module without a weight (stacked MoE experts) is stored by a format that
            # names its own parameters (`parameter_names`); no other module shares them.
            hit = formats.current(module) if formats.attached(module) else None
            if hit is not None:
                found.append(StoredLinear(format=hit[0], stored=hit[1], owner=name))
            elif formats.attached(module):
                log.warning("%s changed after quantization; it is kept dense", name)
            continue
        hit = None if id(weight) in owner_of else formats.current(module)
        if hit is None:
            others.append((name, module, weight))
            continue
        owner_of[id(weight)] = (len(found), type(module))
        owner_weights.append(weight)
        found.append(StoredLinear(format=hit[0], stored=hit[1], owner=name))
    sharers: dict[int, list[str]] = {}
    for name, module, weight in others:
        index, owner_type = owner_of.get(id(weight), (-1, nn.Module))
        if index >= 0 and type(module) is owner_type:
            sharers.setdefault(index, []).append(name)
        elif formats.attached(module):
            log.warning("%s changed after quantization; it is kept dense", name)
    return [
        StoredLinear(s.format, s.stored, s.owner, tuple(sharers.get(i, ())))
        for i, s in enumerate(found)
    ]


def remaining_tensors(module: nn.Module, replaced: set[str], prefix: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """What a checkpoint stores besides the `replaced` weights (those a format writes in
    its own layout): every other state-dict tensor, each storage once, as HF saves tied
    weights. Returns (name -> tensor, tied name -> the name it is stored under)."""
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[int, str] = {}  # data pointer -> the name that stores it
    for name, tensor in module.state_dict(prefix=f"{prefix}." if prefix else "").items():
        if name in replaced:
            continue
        pointer = tensor.data_ptr()
        if pointer in first and tensor.numel() > 0:
            tied[name] = first[pointer]
            continue
        first[pointer] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, tied

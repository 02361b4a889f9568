"""The step catalog: maps a config `kind` to its config class and step class.

Steps register with `@register_step(Config)`. Built-in steps are imported
explicitly in `compression/steps.py`; third-party packages add steps through the
`squeezeflow.steps` entry-point group. Unknown or duplicate kinds are errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar, get_args

from pydantic import ValidationError

from squeezeflow.compression.config import StepConfig

if TYPE_CHECKING:
    from squeezeflow.compression.step import Step

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "squeezeflow.steps"


class UnknownStepError(ValueError):
    """A recipe names a step kind that is not in the catalog."""


@dataclass(frozen=True)
class CatalogEntry:
    kind: str
    config_cls: type[StepConfig]
    step_cls: type[Step[Any]]


class Catalog:
    """Registered steps by kind. One instance lives in this module (`CATALOG`)."""

    def __init__(self) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        self._builtins_loaded = False

    def add(self, config_cls: type[StepConfig], step_cls: type[Step[Any]]) -> None:
        kind = _kind_of(config_cls)
        if kind in self._entries:
            existing = self._entries[kind].step_cls.__qualname__
            raise ValueError(f"step kind {kind!r} is already registered by {existing}")
        self._entries[kind] = CatalogEntry(kind, config_cls, step_cls)

    def remove(self, kind: str) -> None:
        """Unregister `kind` (plugins reloading, tests registering a temporary step)."""
        self._entries.pop(kind, None)

    def kinds(self) -> list[str]:
        self._load_builtin_and_plugins()
        return sorted(self._entries)

    def entry(self, kind: str) -> CatalogEntry:
        self._load_builtin_and_plugins()
        if kind not in self._entries:
            raise UnknownStepError(
                f"unknown step kind {kind!r}; known kinds: {', '.join(self.kinds())}"
            )
        return self._entries[kind]

    def parse(self, raw: Any) -> StepConfig:
        """Validate one step mapping from a recipe into its config object."""
        if isinstance(raw, StepConfig):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"a step must be a mapping with a 'kind' key, got {type(raw).__name__}")
        if "kind" not in raw:
            raise UnknownStepError(f"step has no 'kind'; known kinds: {', '.join(self.kinds())}")
        return self.entry(str(raw["kind"])).config_cls.model_validate(raw)

    def build(self, config: StepConfig) -> Step[Any]:
        return self.entry(config.kind).step_cls(config)

    def _load_builtin_and_plugins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        import_module("squeezeflow.compression.steps")
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                point.load()
            except (ImportError, AttributeError) as error:
                # A broken plugin must not hide the built-in steps, but it must be visible.
                log.error("could not load step plugin %s: %s", point.value, error)


CATALOG = Catalog()

ConfigT = TypeVar("ConfigT", bound=StepConfig)
StepT = TypeVar("StepT", bound="type[Step[Any]]")


def register_step(config_cls: type[StepConfig]):  # type: ignore[no-untyped-def]
    """Class decorator: `@register_step(RTNConfig) class RTNStep(Step[RTNConfig])`."""

    def decorate(step_cls: StepT) -> StepT:
        CATALOG.add(config_cls, step_cls)
        return step_cls

    return decorate


def _kind_of(config_cls: type[StepConfig]) -> str:
    annotation = config_cls.model_fields["kind"].annotation
    args = get_args(annotation)
    if len(args) != 1 or not isinstance(args[0], str):
        raise TypeError(f"{config_cls.__name__}.kind must be Literal['<kind>']")
    kind: str = args[0]
    return kind


__all__ = ["CATALOG", "Catalog", "UnknownStepError", "ValidationError", "register_step"]

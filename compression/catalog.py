"""The step catalog: maps a config `kind` to its config class and step class.

Steps register with `@register_step(Config)`. Built-in steps are listed explicitly in
`compression/steps.py`: each one's config class (pydantic only, no torch) and the
module of its step, which is imported the first time the step class is needed. So a
recipe is parsed and checked (`squeeze validate`) without importing torch or any
step's dependencies. Third-party packages add steps through the `squeezeflow.steps`
entry-point group. Unknown or duplicate kinds are errors.
"""

from __future__ import annotations

import logging
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar, get_args

from pydantic import ValidationError

from squeezeflow.compression.config import StepConfig

if TYPE_CHECKING:
    from squeezeflow.compression.step import Step

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "squeezeflow.steps"
DECLARED_BY_CONFIG = ("needs", "changes_structure")  # step facts a recipe check reads


class UnknownStepError(ValueError):
    """A recipe names a step kind that is not in the catalog."""


class CatalogEntry:
    """One kind: its config class now, its step class when first asked for.

    `step_module` names the module whose `@register_step` registers the step class
    (built-in steps); an entry added with its step class has none.
    """

    def __init__(self, kind: str, config_cls: type[StepConfig],
                 step_cls: type[Step[Any]] | None = None, step_module: str | None = None) -> None:
        self.kind = kind
        self.config_cls = config_cls
        self._step_cls = step_cls
        self.step_module = step_module

    @property
    def step_cls(self) -> type[Step[Any]]:
        if self._step_cls is None:
            assert self.step_module is not None  # an entry has a step class or a module
            import_module(self.step_module)  # its @register_step fills in the class
            if self._step_cls is None:
                raise TypeError(f"{self.step_module} does not register a step for {self.config_cls.__name__}")
        return self._step_cls


class Catalog:
    """Registered steps by kind. One instance lives in this module (`CATALOG`)."""

    def __init__(self) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        self._builtins_loaded = False

    def declare(self, config_cls: type[StepConfig], step_module: str) -> None:
        """Name a step by its config class and the module that registers its step class."""
        kind = _kind_of(config_cls)
        existing = self._entries.get(kind)
        if existing is not None and existing.config_cls is not config_cls:
            raise ValueError(f"step kind {kind!r} is already registered by "
                             f"{existing.config_cls.__qualname__}")
        if existing is None:
            self._entries[kind] = CatalogEntry(kind, config_cls, step_module=step_module)

    def add(self, config_cls: type[StepConfig], step_cls: type[Step[Any]]) -> None:
        kind = _kind_of(config_cls)
        existing = self._entries.get(kind)
        declared = existing is not None and existing._step_cls is None and existing.config_cls is config_cls
        if existing is not None and not declared:
            holder = existing._step_cls or existing.config_cls
            raise ValueError(f"step kind {kind!r} is already registered by {holder.__qualname__}")
        _take_declarations(config_cls, step_cls)
        if existing is not None and declared:
            existing._step_cls = step_cls
        else:
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
        from squeezeflow.compression.steps import BUILTIN_STEPS

        for config_cls, step_module in BUILTIN_STEPS:
            self.declare(config_cls, step_module)
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                point.load()
            except (ImportError, AttributeError, TypeError, ValueError) as error:
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


def _take_declarations(config_cls: type[StepConfig], step_cls: type[Step[Any]]) -> None:
    """The step class gets `needs` and `changes_structure` from its config class, where
    they are declared so that a recipe is checked without importing the step. A step
    class that declares them itself (written before configs did) must agree."""
    for name in DECLARED_BY_CONFIG:
        declared = getattr(config_cls, name)
        own = step_cls.__dict__.get(name, declared)
        if own != declared:
            raise TypeError(f"{step_cls.__qualname__}.{name} = {own!r} but {config_cls.__name__}."
                            f"{name} = {declared!r}; declare it on the config class")
        setattr(step_cls, name, declared)


def _kind_of(config_cls: type[StepConfig]) -> str:
    annotation = config_cls.model_fields["kind"].annotation
    args = get_args(annotation)
    if len(args) != 1 or not isinstance(args[0], str):
        raise TypeError(f"{config_cls.__name__}.kind must be Literal['<kind>']")
    kind: str = args[0]
    return kind


__all__ = ["CATALOG", "Catalog", "CatalogEntry", "UnknownStepError", "ValidationError", "register_step"]

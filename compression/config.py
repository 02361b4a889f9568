"""Configuration base classes shared by recipes and steps.

Every config is a frozen pydantic model that rejects unknown keys with a message
naming the key and the valid ones, so a YAML typo fails before any weights load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class StrictModel(BaseModel):
    """A frozen model whose unknown keys are errors that list the valid keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = {name for name in cls.model_fields} | {
                f.alias for f in cls.model_fields.values() if f.alias
            }
            unknown = [key for key in data if key not in valid]
            if unknown:
                keys = ", ".join(sorted(valid))
                raise ValueError(f"unknown key {unknown[0]!r}; valid keys: {keys}")
        return data


DEFAULT_IGNORE = ("*lm_head*", "*embed*", "*pooler*")  # output/embedding layers hurt most


class StepConfig(StrictModel):
    """Base of every step's config. Subclasses set `kind: Literal["..."]`."""

    kind: str
    targets: tuple[str, ...] = ("*",)  # glob patterns on module names selecting Linear layers
    ignore: tuple[str, ...] = DEFAULT_IGNORE  # glob patterns excluded after `targets`

    # Set by subclasses for the catalog's error messages; not a field.
    summary: ClassVar[str] = ""

    def check_model(self, config: PretrainedConfig) -> PretrainedConfig:
        """Check this step against the model's config.json (no weights are loaded).

        Raise ValueError starting with the offending field's name when the model
        cannot meet the config (e.g. `remove: 5 blocks but the model has 4`).
        Return the config as the model will be after this step, so that checks of
        later steps see it (a step that changes no shape returns `config` as is).
        """
        return config


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """Render a pydantic error as `field.path: message (got value)` lines."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"] if part != "__root__")
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"{loc or '<recipe>'}: {message}{shown}")
    return "\n".join(lines)

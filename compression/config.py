"""Configuration base classes shared by recipes and steps.

Every config is a frozen pydantic model that rejects unknown keys with a message
naming the key and the valid ones, so a YAML typo fails before any weights load.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Needs(enum.Enum):
    """What a step requires from the runner, in increasing order of cost."""

    NOTHING = "nothing"  # weights only (RTN, magnitude pruning)
    CALIBRATION = "calibration"  # one forward pass over calibration data, all observers at once
    LAYERWISE = "layerwise"  # block-by-block: block k sees outputs of compressed blocks < k
    TRAINING = "training"  # gradient steps on training data
    TEACHER = "teacher"  # training against a teacher model


Precision = Literal["fp32", "bf16"]  # of the matmuls in calibration forward passes


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
    # What the step needs from the runner and whether it removes, shrinks, replaces or
    # ties modules (depth, heads, low-rank: such a step runs alone in its stage, so no
    # other step holds modules that disappear). Declared here, not on the step class,
    # so that a recipe is checked without importing the step (torch); the catalog
    # copies them onto the step class.
    needs: ClassVar[Needs] = Needs.NOTHING
    changes_structure: ClassVar[bool] = False

    @property
    def needs_whole_model(self) -> bool:
        """True when the step runs the whole model itself (a model-wide score in its
        `finalize`, say): its stage cannot stream block by block and loads the model.
        Here, not on the step, for the same reason as `needs`."""
        return False

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

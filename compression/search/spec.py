"""The `search:` section of a recipe: what varies, what is measured, how trials are chosen.

```yaml
search:
  parameters:                          # <stage>.<step index or kind>.<field>
    quantize.rtn.bits: {choices: [2, 3, 4, 8]}
    prune.magnitude.sparsity: {range: [0.3, 0.7], step: 0.1}
  optional_stages: [prune]             # each trial runs with or without it
  layers:                              # per-layer overrides: these modules get their own value
    - {at: quantize.rtn, targets: ["*mlp*"], field: bits, choices: [4, 8]}
  objectives:
    - {metric: perplexity_ratio, goal: minimize}
    - {metric: weights_mb}             # goal from the metric table (lower is better)
  constraints:                         # gates: a trial passes when all of them pass
    - {metric: perplexity_ratio, max: 1.2}
  strategy: grid                       # grid | random | optuna | mixed_precision
  budget: {max_trials: 8, max_minutes: 60}
  stop_when: goals_met                 # stop at the first trial passing every constraint
```
Pure validation (pydantic, no torch): `check_against` ties the section to the recipe's
stages so an error names the field, the value and the valid options.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from squeezeflow.compression.catalog import CATALOG, UnknownStepError
from squeezeflow.compression.config import StepConfig, StrictModel, format_validation_error
from squeezeflow.evaluation.gates import Gate
from squeezeflow.evaluation.metrics import METRICS, describe_evaluated, is_evaluated

Goal = Literal["minimize", "maximize"]
RANGE_DECIMALS = 10  # range values are rounded so 0.1 steps give 0.3, not 0.30000000000000004


class Choices(StrictModel):
    choices: tuple[Any, ...] = Field(min_length=1)

    def values(self) -> list[Any]:
        return list(dict.fromkeys(self.choices))  # repeated choices would be repeated trials


class Range(StrictModel):
    range: tuple[float, float]
    step: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        low, high = self.range
        if low > high:
            raise ValueError(f"range [{low:g}, {high:g}]: the low end is above the high end")
        return self

    def values(self) -> list[Any]:
        """low, low + step, ... up to high (inclusive); ints stay ints."""
        low, high = self.range
        count = math.floor((high - low) / self.step + 1e-9) + 1  # 1e-9: float steps that land on high
        values = [round(low + index * self.step, RANGE_DECIMALS) for index in range(count)]
        if all(float(v).is_integer() for v in (low, high, self.step)):
            return [int(v) for v in values]
        return values


Domain = Choices | Range


class LayerOverride(StrictModel):
    """Modules matching `targets` of the step at `at` take their own value of `field`."""

    at: str  # <stage>.<step index or kind>
    targets: tuple[str, ...] = Field(min_length=1)  # glob patterns on module names
    field: str
    choices: tuple[Any, ...] | None = None
    range: tuple[float, float] | None = None
    step: float | None = None

    @model_validator(mode="after")
    def _one_domain(self) -> LayerOverride:
        if (self.choices is None) == (self.range is None):
            raise ValueError("give exactly one of 'choices' or 'range' (with 'step')")
        if self.range is not None and self.step is None:
            raise ValueError("'range' needs 'step'")
        self.domain()  # validates the range
        return self

    def domain(self) -> Domain:
        if self.choices is not None:
            return Choices(choices=self.choices)
        assert self.range is not None and self.step is not None
        return Range(range=self.range, step=self.step)

    @property
    def name(self) -> str:
        """The dimension's name (an MLflow param): `quantize.rtn[*mlp*].bits`."""
        return f"{self.at}[{','.join(self.targets)}].{self.field}"


class Objective(StrictModel):
    metric: str
    goal: Goal | None = None  # None: the metric table's direction
    target: float | None = None  # `stop_when: goals_met` also needs this value reached

    @model_validator(mode="after")
    def _known(self) -> Objective:
        if not is_evaluated(self.metric):
            raise ValueError(f"metric: unknown metric {self.metric!r}; known metrics: "
                             f"{describe_evaluated()}")
        known = METRICS.get(self.metric)
        if self.goal is None and (known is None or known.direction is None):
            raise ValueError(f"goal: {self.metric!r} has no direction in the metric table; "
                             "say 'goal: minimize' or 'goal: maximize'")
        return self

    @property
    def minimize(self) -> bool:
        if self.goal is not None:
            return self.goal == "minimize"
        return METRICS[self.metric].direction == "lower"

    def met(self, value: float | None) -> bool:
        if self.target is None:
            return True
        if value is None or value != value:  # NaN never meets a target
            return False
        return value <= self.target if self.minimize else value >= self.target


class Budget(StrictModel):
    max_trials: int | None = Field(None, ge=1)  # None: every point of the space (grid/random)
    max_minutes: float | None = Field(None, gt=0)  # checked between batches of trials


class SearchSpec(StrictModel):
    parameters: dict[str, Domain] = {}
    optional_stages: tuple[str, ...] = ()
    layers: tuple[LayerOverride, ...] = ()
    objectives: tuple[Objective, ...] = Field(min_length=1)
    constraints: tuple[Gate, ...] = ()
    strategy: str = "grid"
    seed: int = 0  # random order / sampler seed
    budget: Budget = Budget()
    stop_when: Literal["goals_met"] | None = None

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        from squeezeflow.compression.search.strategies import STRATEGIES

        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(sorted(STRATEGIES))}")
        return name

    @model_validator(mode="after")
    def _something_varies(self) -> SearchSpec:
        if not (self.parameters or self.optional_stages or self.layers) and self.strategy != "mixed_precision":
            raise ValueError("parameters: nothing to search; give 'parameters', "
                             "'optional_stages' or 'layers'")
        for index, gate in enumerate(self.constraints):
            if not is_evaluated(gate.metric):
                raise ValueError(f"constraints.{index}.metric: unknown metric {gate.metric!r}; "
                                 f"known metrics: {describe_evaluated()}")
        return self

    def dimensions(self) -> dict[str, list[Any]]:
        """Every searched value by name, in a fixed order: stages, parameters, layers."""
        dims: dict[str, list[Any]] = {f"{name}.enabled": [True, False] for name in self.optional_stages}
        dims |= {name: domain.values() for name, domain in self.parameters.items()}
        dims |= {layer.name: layer.domain().values() for layer in self.layers}
        return dims

    def check_against(self, stages: list[tuple[str, tuple[StepConfig, ...]]]) -> list[str]:
        """Errors (each naming its `search.` field) where the section does not fit the
        recipe's stages [(name, steps)]: unknown stage, step or field, or a value the
        step's config rejects."""
        errors: list[str] = []
        by_name = dict(stages)
        names = ", ".join(by_name)
        for index, stage in enumerate(self.optional_stages):
            if stage not in by_name:
                errors.append(f"search.optional_stages.{index}: no stage {stage!r}; stages: {names}")
        if len(self.optional_stages) == len(stages) and stages:
            errors.append("search.optional_stages: every stage is optional; a trial needs one")
        for name, domain in self.parameters.items():
            where = f"search.parameters.{name}"
            at, _, field = name.rpartition(".")
            step, problem = _locate(at, by_name, names)
            if problem:
                errors.append(f"{where}: {problem}")
                continue
            assert step is not None
            errors += _check_values(step, field, domain.values(), where)
        for index, layer in enumerate(self.layers):
            where = f"search.layers.{index}"
            step, problem = _locate(layer.at, by_name, names)
            if problem:
                errors.append(f"{where}.at: {problem}")
                continue
            assert step is not None
            errors += _check_values(step, layer.field, layer.domain().values(), f"{where}.field")
        return errors


def _locate(at: str, stages: dict[str, tuple[StepConfig, ...]], names: str) -> tuple[StepConfig | None, str]:
    """The step named by `<stage>.<index or kind>`, or why there is none."""
    stage, _, which = at.partition(".")
    if not which:
        return None, f"{at!r} is not <stage>.<step>.<field> (step: its index or kind)"
    if stage not in stages:
        return None, f"no stage {stage!r}; stages: {names}"
    steps = stages[stage]
    found = locate_step(steps, which)
    if isinstance(found, str):
        return None, f"stage {stage!r}: {found}"
    return steps[found], ""


def locate_step(steps: tuple[StepConfig, ...] | list[Any], which: str) -> int | str:
    """The index of step `which` (an index or a kind that occurs once), or why none."""
    kinds = [step.kind if isinstance(step, StepConfig) else step.get("kind") for step in steps]
    if which.isdigit():
        index = int(which)
        return index if index < len(steps) else f"no step {index}; it has {len(steps)}"
    matches = [i for i, kind in enumerate(kinds) if kind == which]
    if len(matches) == 1:
        return matches[0]
    if matches:
        return f"{len(matches)} steps are {which!r}; name one by its index"
    return f"no step {which!r}; its steps: {', '.join(str(k) for k in kinds)}"


def _check_values(step: StepConfig, field: str, values: list[Any], where: str) -> list[str]:
    if field not in type(step).model_fields or field == "kind":
        valid = ", ".join(sorted(f for f in type(step).model_fields if f != "kind"))
        return [f"{where}: {step.kind} has no field {field!r}; its fields: {valid}"]
    errors = []
    for value in values:
        try:
            CATALOG.parse({**step.model_dump(mode="json"), field: value})
        except ValidationError as error:
            errors.append(f"{where}: value {value!r} is invalid: "
                          f"{format_validation_error(error).replace(chr(10), '; ')}")
        except (UnknownStepError, ValueError) as error:
            errors.append(f"{where}: value {value!r} is invalid: {error}")
    return errors

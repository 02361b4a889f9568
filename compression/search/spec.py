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
`strategy: mixed_precision` plans its trials instead (no `parameters`): one per budget,
each an ordinary recipe with one format per layer (`compression/search/mixed_precision.py`):
```yaml
search:
  strategy: mixed_precision
  mixed_precision:
    at: quantize.rtn                   # the rtn or gptq step planned per layer (alone in the first stage)
    formats: [2, 3, 4, {bits: 8, group_size: 128}]   # a bare number: bits at the step's group_size
    budget_bits: [3.0, 3.5, 4.0]       # average stored bits per weight; or budget_mb; one trial each
    sensitivity: kl                    # kl (output distribution) | hessian (cheap layer proxy)
  objectives: [{metric: perplexity_ratio}, {metric: weights_mb}]
```
Pure validation (pydantic, no torch): `check_against` ties the section to the recipe's
stages so an error names the field, the value and the valid options.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from squeezeflow.compression.catalog import CATALOG, UnknownStepError
from squeezeflow.compression.config import StepConfig, StrictModel, format_validation_error
from squeezeflow.compression.quantization.fields import Bits, GroupSize
from squeezeflow.evaluation.gates import Gate
from squeezeflow.evaluation.metrics import METRICS, describe_evaluated, is_evaluated

Goal = Literal["minimize", "maximize"]
RANGE_DECIMALS = 10  # range values are rounded so 0.1 steps give 0.3, not 0.30000000000000004
PLANNED_STRATEGIES = ("mixed_precision",)  # trials planned by a task, not asked of a Strategy
PLANNED_KINDS = ("rtn", "gptq")  # the integer quantizers a mixed precision plan can assign
SCALE_BITS = 16  # each group stores an fp16 scale (compression/quantization/qweight.py)


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


class FormatChoice(StrictModel):
    """One format a layer may get; `group_size` left out: the planned step's."""

    bits: Bits
    group_size: GroupSize = None  # None = one grid per output row

    def resolved(self, step_group_size: int | None) -> tuple[int, int | None]:
        """(bits, group_size) with an omitted group size taken from the step."""
        return self.bits, self.group_size if "group_size" in self.model_fields_set else step_group_size


def least_bits_per_weight(bits: int, group_size: int | None) -> float:
    """The fewest stored bits per weight of a format on any layer: codes plus one scale
    and one zero point per group (a layer narrower than the group only stores more)."""
    return bits + ((SCALE_BITS + bits) / group_size if group_size else 0.0)


class MixedPrecisionSpec(StrictModel):
    """Per-layer mixed precision: one format per layer under each budget (one trial each)."""

    at: str  # <stage>.<step index or kind>: the rtn or gptq step planned per layer
    formats: tuple[FormatChoice, ...] = Field(min_length=2)
    budget_bits: tuple[float, ...] | None = None  # average stored bits per weight of the planned layers
    budget_mb: tuple[float, ...] | None = None  # MiB stored by the planned layers
    sensitivity: Literal["kl", "hessian"] = "kl"  # kl ranks layers by what perplexity feels

    @field_validator("formats", mode="before")
    @classmethod
    def _bare_bits(cls, raw: Any) -> Any:
        if isinstance(raw, list | tuple):
            return [{"bits": item} if isinstance(item, int) else item for item in raw]
        return raw

    @field_validator("budget_bits", "budget_mb", mode="before")
    @classmethod
    def _one_or_many(cls, raw: Any) -> Any:
        return [raw] if isinstance(raw, int | float) else raw

    @field_validator("budget_bits", "budget_mb")
    @classmethod
    def _positive_distinct(cls, budgets: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if budgets is None:
            return None
        if not budgets or any(b <= 0 for b in budgets):
            raise ValueError("give one or more budgets, each above 0")
        repeated = sorted({b for b in budgets if budgets.count(b) > 1})
        if repeated:
            raise ValueError(f"repeated budgets would be repeated trials: {', '.join(f'{b:g}' for b in repeated)}")
        return budgets

    @model_validator(mode="after")
    def _one_budget_unit(self) -> MixedPrecisionSpec:
        if (self.budget_bits is None) == (self.budget_mb is None):
            raise ValueError("give exactly one of 'budget_bits' (average bits per weight) and 'budget_mb'")
        return self

    @property
    def budgets(self) -> list[tuple[str, float]]:
        """(unit, value) of each trial's budget: unit 'bits' or 'mb'."""
        if self.budget_bits is not None:
            return [("bits", b) for b in self.budget_bits]
        assert self.budget_mb is not None
        return [("mb", b) for b in self.budget_mb]

    def check_against(self, stages: dict[str, tuple[StepConfig, ...]], names: str) -> list[str]:
        """Errors where the planned step cannot take the formats or the bits budget."""
        where = "search.mixed_precision"
        step, problem = _locate(self.at, stages, names)
        if problem:
            return [f"{where}.at: {problem}"]
        assert step is not None
        stage = self.at.partition(".")[0]
        if step.kind not in PLANNED_KINDS:
            return [f"{where}.at: {step.kind} cannot be planned per layer; plannable kinds: "
                    f"{', '.join(PLANNED_KINDS)}"]
        # sensitivity is measured on the base model, with nothing else changing it
        if stage != next(iter(stages)):
            return [f"{where}.at: the planned step must be in the first stage, which sees the "
                    f"base model; stage {stage!r} is not (stages: {names})"]
        if len(stages[stage]) > 1:
            return [f"{where}.at: the planned step must be the only step of stage {stage!r} "
                    f"(it has {len(stages[stage])}: {', '.join(s.kind for s in stages[stage])})"]
        errors: list[str] = []
        step_group = getattr(step, "group_size", None)
        resolved = [f.resolved(step_group) for f in self.formats]
        for index, (bits, group_size) in enumerate(resolved):
            first = resolved.index((bits, group_size))
            if first < index:
                errors.append(f"{where}.formats.{index}: repeats formats.{first} "
                              f"(bits {bits}, group_size {group_size})")
                continue
            try:  # the per-layer step the plan writes: the step with this format and exact targets
                CATALOG.parse({**step.model_dump(mode="json"), "bits": bits, "group_size": group_size,
                               "targets": ["planned.layer"]})
            except ValidationError as error:
                errors.append(f"{where}.formats.{index}: {step.kind} with bits {bits}, group_size "
                              f"{group_size} and per-layer targets is invalid: "
                              f"{format_validation_error(error).replace(chr(10), '; ')}")
        least = min(least_bits_per_weight(bits, group_size) for bits, group_size in resolved)
        for index, budget in enumerate(self.budget_bits or ()):
            if budget < least:
                errors.append(f"{where}.budget_bits.{index}: {budget:g} bits per weight is below the "
                              f"smallest format, which stores at least {least:.3f} (codes plus an fp16 "
                              "scale and a zero point per group)")
        return errors


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
    # validated with the default too: `strategy: mixed_precision` needs it, others refuse it
    mixed_precision: MixedPrecisionSpec | None = Field(None, validate_default=True)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        from squeezeflow.compression.search.strategies import STRATEGIES

        if name not in STRATEGIES and name not in PLANNED_STRATEGIES:
            valid = sorted([*STRATEGIES, *PLANNED_STRATEGIES])
            raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(valid)}")
        return name

    @field_validator("mixed_precision")
    @classmethod
    def _planned_by_its_strategy(cls, block: MixedPrecisionSpec | None, info: ValidationInfo) -> MixedPrecisionSpec | None:
        strategy = info.data.get("strategy")  # absent when the strategy itself was invalid
        if strategy == "mixed_precision" and block is None:
            raise ValueError("strategy 'mixed_precision' needs this section "
                             "(at, formats, budget_bits or budget_mb)")
        if strategy is not None and strategy != "mixed_precision" and block is not None:
            raise ValueError(f"only used by strategy 'mixed_precision' (strategy is {strategy!r})")
        if block is not None and (info.data.get("parameters") or info.data.get("optional_stages")
                                  or info.data.get("layers")):
            raise ValueError("the mixed_precision strategy plans its own trials; remove "
                             "'parameters', 'optional_stages' and 'layers'")
        return block

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
        if self.mixed_precision is not None:
            errors += self.mixed_precision.check_against(by_name, names)
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

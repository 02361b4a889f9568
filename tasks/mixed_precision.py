"""Trials of a `strategy: mixed_precision` search: one planned recipe per budget.

The search flow calls `plan_trial_recipes` (in a task) instead of asking a strategy for
points. It loads the base model and the calibration text the way a stage does, measures
each layer group's sensitivity to each format once (kept in the workspace, so a resumed
search does not measure again), solves every budget on that one table, and writes each
plan as a readable recipe under the workspace:
`$SQUEEZEFLOW_HOME/plans/<recipe name>/<budget>-<unit>-<trial key>.yaml`, which
`squeeze run` runs as it is (its paths are absolute) and a person may edit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import Any

import torch

from squeezeflow.compression.artifact import load_compressed
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.integrity import atomic_write_text
from squeezeflow.compression.search.mixed_precision import (
    Candidate,
    Measure,
    Plan,
    SensitivityTable,
    measure_sensitivity,
    plan_to_recipe,
    solve,
    write_recipe,
)
from squeezeflow.compression.search.space import trial_key
from squeezeflow.compression.search.spec import MixedPrecisionSpec, SearchSpec, locate_step
from squeezeflow.recipe import Recipe
from squeezeflow.tasks.refs import code_version, workspace
from squeezeflow.tasks.stages import materialize_data, materialize_model, read_texts

log = logging.getLogger("squeezeflow")


def plan_trial_recipes(recipe: Recipe, raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One raw trial recipe per budget of `recipe.search.mixed_precision`.

    `raw` is `recipe.model_dump(mode="json")`. Each returned mapping is `raw` without
    `search:`, the planned step's stage replaced by one step per format used (targets:
    exact layer names), and a description giving the budget and the bits achieved.
    """
    spec = _spec(recipe)
    stage_name, _, which = spec.at.partition(".")
    stage = next(s for s in raw["stages"] if s["name"] == stage_name)
    index = locate_step(stage["steps"], which)
    assert isinstance(index, int), index  # checked by SearchSpec.check_against
    template = {k: v for k, v in stage["steps"][index].items() if k != "ignore"}  # targets are exact names
    planned = recipe.stages[[s.name for s in recipe.stages].index(stage_name)].steps[index]
    candidates = [Candidate(planned.kind, *f.resolved(getattr(planned, "group_size", None)),  # type: ignore[arg-type]
                            symmetric=getattr(planned, "symmetric", True))
                  for f in spec.formats]

    table = sensitivity_table(recipe, candidates, spec.sensitivity, planned.targets, planned.ignore)
    base_raw = {k: v for k, v in raw.items() if k != "search"}
    trials = []
    for unit, budget in spec.budgets:
        where = f"search.mixed_precision.budget_{unit}"
        try:
            plan = solve(table, budget_bits=budget if unit == "bits" else None,
                         budget_mb=budget if unit == "mb" else None)
        except ValueError as error:  # a budget below the smallest assignment of this model
            raise ValueError(f"{where}: {budget:g}: {error}") from None
        trial = plan_to_recipe(plan, base_raw, stage_name, template)
        trial["description"] = _describe(plan, unit, budget)
        path = workspace() / "plans" / recipe.name / f"{budget:g}-{unit}-{trial_key(trial)}.yaml"
        write_recipe(trial, path, plan)
        log.info("mixed precision at %g %s: %.3f bits per weight, recipe %s", budget, unit,
                 plan.average_bits, path)
        trials.append(trial)
    return trials


def sensitivity_table(
    recipe: Recipe, candidates: list[Candidate], measure: Measure, targets: tuple[str, ...],
    ignore: tuple[str, ...],
) -> SensitivityTable:
    """The base model's sensitivity to each candidate on the recipe's calibration text.

    Kept in the workspace under the hash of everything it depends on (model and text
    content, tokenization, candidates, measure, layers, code version), so a resumed or
    repeated search plans new budgets without measuring again.
    """
    if recipe.calibration is None:
        raise ValueError("calibration: a mixed precision search measures each layer's sensitivity "
                         "on calibration text; add a 'calibration' section")
    base = materialize_model.fn(recipe.model, recipe.registration.tracking_uri)
    data = materialize_data.fn(recipe.calibration)
    key = hashlib.sha256(json.dumps({
        "model": base.sha256, "calibration": data.sha256, "seed": recipe.seed,
        "tokens": [recipe.calibration.batch_size, recipe.calibration.max_length],
        "candidates": [asdict(c) for c in candidates], "measure": measure,
        "targets": targets, "ignore": ignore, "code": code_version(),
    }, sort_keys=True).encode()).hexdigest()
    cached = workspace() / "sensitivity" / f"{key}.json"
    if cached.exists():
        log.info("mixed precision: sensitivity reused from %s", cached)
        return SensitivityTable.from_json(json.loads(cached.read_text()))
    loaded = load_compressed(base.path, verify=False)  # materialize_model checked its hash
    calibration = list(tokenized_batches(read_texts(data), loaded.tokenizer,
                                         batch_size=recipe.calibration.batch_size,
                                         max_length=recipe.calibration.max_length))
    torch.manual_seed(recipe.seed)
    table = measure_sensitivity(loaded.model, calibration, candidates, measure, targets, ignore)
    atomic_write_text(cached, json.dumps(table.to_json()))
    return table


def _spec(recipe: Recipe) -> MixedPrecisionSpec:
    search: SearchSpec | None = recipe.search
    if search is None or search.mixed_precision is None:
        raise ValueError("search.mixed_precision: the recipe plans no mixed precision "
                         "(strategy 'mixed_precision' with a 'mixed_precision' section)")
    return search.mixed_precision


def _describe(plan: Plan, unit: str, budget: float) -> str:
    """One line: the search's trial table shows it as the trial's values."""
    used = sorted({c.bits for c in plan.per_layer.values()})
    return (f"mixed precision, budget {budget:g} {'bits per weight' if unit == 'bits' else 'MiB'}: "
            f"achieved {plan.average_bits:.3f} bits per weight with {'/'.join(map(str, used))}-bit "
            f"layers ({plan.table.measure} sensitivity)")

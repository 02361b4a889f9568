"""From a search's space to trial recipes: points, their recipes, their keys.

A point is {dimension name: value}; `trial_recipe` applies it to the recipe (as the
mapping `Recipe.model_dump(mode="json")` gives, without its `search:`) and returns a
mapping that `squeezeflow.recipe.parse_recipe` validates like any recipe. Pure code.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
from typing import Any

from pydantic import BaseModel, Field

from squeezeflow.compression.search.spec import SearchSpec, locate_step

Point = dict[str, Any]


class TrialOutcome(BaseModel):
    """A finished trial: what was tried, what it measured, what it cost."""

    number: int
    key: str  # trial_key of its recipe: the same point always has the same key
    values: Point
    metrics: dict[str, float]
    passed: bool  # every constraint passed
    cache_hits: int = 0  # stages reused from the workspace
    stages_computed: int = 0
    seconds: float = 0.0
    run_id: str = ""  # its nested MLflow run
    record: dict[str, Any] = Field(default_factory=dict)  # what registering it needs (RunRecord)


def grid_points(spec: SearchSpec) -> list[Point]:
    """Every point of the space, the last dimension varying fastest."""
    dims = spec.dimensions()
    names = list(dims)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*dims.values())]


def random_points(spec: SearchSpec) -> list[Point]:
    """Every point of the space in an order shuffled by `spec.seed` (no repeats)."""
    points = grid_points(spec)
    random.Random(spec.seed).shuffle(points)
    return points


def trial_recipe(base: dict[str, Any], spec: SearchSpec, point: Point, number: int) -> dict[str, Any]:
    """The recipe mapping of one trial: `base` with the point's values applied.

    Optional stages left out are removed; a layer override splits its step in two:
    a copy restricted to the override's targets with the override's value, then the
    original with those targets added to its `ignore`.
    """
    raw = copy.deepcopy(base)
    raw.pop("search", None)
    stages: list[dict[str, Any]] = raw["stages"]
    by_name = {stage["name"]: stage for stage in stages}
    for name, value in point.items():
        if name.endswith(".enabled") and name.removesuffix(".enabled") in spec.optional_stages:
            continue
        if name in spec.parameters:
            at, _, field = name.rpartition(".")
            _step(by_name, at)[field] = value
    for layer in spec.layers:  # after the parameters: the copy inherits their values
        stage_name, _, which = layer.at.partition(".")
        steps = by_name[stage_name]["steps"]
        index = locate_step(steps, which)
        assert isinstance(index, int)
        original = steps[index]
        override = {**copy.deepcopy(original), "targets": list(layer.targets), layer.field: point[layer.name]}
        original["ignore"] = [*original.get("ignore", []), *layer.targets]
        steps.insert(index, override)
    raw["stages"] = [
        stage for stage in stages
        if point.get(f"{stage['name']}.enabled", True) or stage["name"] not in spec.optional_stages
    ]
    raw["description"] = f"trial {number} of search {base.get('name', '')}: {describe(point)}"
    return raw


def _step(by_name: dict[str, dict[str, Any]], at: str) -> dict[str, Any]:
    stage_name, _, which = at.partition(".")
    steps = by_name[stage_name]["steps"]
    index = locate_step(steps, which)
    assert isinstance(index, int), index  # checked by SearchSpec.check_against
    step: dict[str, Any] = steps[index]
    return step


def describe(point: Point) -> str:
    return ", ".join(f"{name}={value}" for name, value in point.items())


def trial_key(raw: dict[str, Any]) -> str:
    """Content address of a trial recipe (its description aside): resume finds finished
    trials by it."""
    canonical = {key: value for key, value in raw.items() if key != "description"}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]

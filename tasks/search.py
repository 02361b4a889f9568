"""Thin Prefect tasks of a search: one trial, the mixed-precision plan; and where an
adaptive strategy keeps its study."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from squeezeflow.compression.search.space import Point, TrialOutcome, trial_key
from squeezeflow.compression.search.spec import Objective
from squeezeflow.evaluation.gates import Gate, check_gates
from squeezeflow.recipe import Recipe, parse_recipe
from squeezeflow.registry.search import pareto_markdown, pareto_rows
from squeezeflow.tasks.refs import workspace


@task(name="trial", cache_policy=NONE)
def run_trial(raw: dict[str, Any], number: int, values: Point, constraints: tuple[Gate, ...],
              threads: int | None = None) -> TrialOutcome:
    """Build and evaluate one trial recipe without registering it. Stages it shares with
    earlier trials (same input, same config) are reused from the workspace.

    `threads`: torch's intra-op threads in this worker; the flow gives each of its N
    concurrent trials cores / N, so N workers do not each spread over every core."""
    import torch

    from squeezeflow.tasks.measure import measure_recipe  # the compress flow's own steps

    if threads is not None:
        torch.set_num_threads(threads)

    start = time.perf_counter()
    measured = measure_recipe(parse_recipe(raw))
    metrics = measured.record.metrics
    return TrialOutcome(
        number=number, key=trial_key(raw), values=values, metrics=metrics,
        passed=all(result.passed for result in check_gates(list(constraints), metrics)),
        cache_hits=measured.cache_hits,
        stages_computed=len(measured.stages) - measured.cache_hits,
        seconds=time.perf_counter() - start,
        record=measured.record.model_dump(mode="json"),
    )


@task(name="plan-mixed-precision", cache_policy=NONE)
def plan_trials(recipe: Recipe, raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial recipes of `strategy: mixed_precision` (per-layer formats under a budget)."""
    from squeezeflow.tasks.mixed_precision import plan_trial_recipes

    return plan_trial_recipes(recipe, raw)


def study_storage(tracking_uri: str) -> str:
    """The Optuna study's database: `search.db` beside a SQLite registry, else in the
    workspace (a registry server's database is not ours to write into)."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return prefix + str(Path(tracking_uri.removeprefix(prefix)).with_name("search.db"))
    return prefix + str(workspace() / "search.db")



def publish_front(search_name: str, outcomes: list[TrialOutcome], objectives: Sequence[Objective],
                  front: list[int]) -> None:
    """The Pareto table (the one logged on the MLflow parent run) as a Prefect artifact of
    the search's flow run, beside its trials."""
    key = re.sub(r"[^a-z0-9-]+", "-", search_name.lower()).strip("-") or "search"
    create_markdown_artifact(pareto_markdown(pareto_rows(outcomes, objectives, front), len(front)),
                             key=f"{key}-pareto", description=f"Pareto front of search {search_name}")

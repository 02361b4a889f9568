"""The `compress` flow: recipe -> stages -> evaluation -> registry.

Orchestration only; the work is in tasks/ (thin) and the library below them.
"""

from __future__ import annotations

from pydantic import BaseModel

from squeezeflow.settings import apply_defaults

apply_defaults()

from prefect import flow  # noqa: E402

from squeezeflow.recipe import Recipe, load_recipe  # noqa: E402
from squeezeflow.registry.records import RegisteredVersion  # noqa: E402
from squeezeflow.tasks.measure import measure_recipe  # noqa: E402
from squeezeflow.tasks.stages import StageResult, publish_report, register  # noqa: E402


class CompressResult(BaseModel):
    registered: RegisteredVersion
    metrics: dict[str, float]
    stages: list[StageResult]
    model_dir: str


@flow(name="compress", log_prints=False)
def compress(recipe_path: str, use_cache: bool = True, device: str | None = None) -> CompressResult:
    """Run the recipe at `recipe_path` and register the compressed model.

    Stages whose inputs are unchanged since an earlier run are reused from the
    workspace unless `use_cache` is False. `device` overrides the recipe's.
    """
    recipe = load_recipe(recipe_path)
    if device is not None:
        recipe = recipe.model_copy(update={"device": device})
    return compress_recipe(recipe, use_cache=use_cache)


def compress_recipe(recipe: Recipe, use_cache: bool = True) -> CompressResult:
    measured = measure_recipe(recipe, use_cache=use_cache)
    record = measured.record
    # retried inside (registry.runs.RetryPolicy, $SQUEEZEFLOW_REGISTRY_RETRY_DELAYS) on
    # one parent run; a task-level retry on top would multiply the attempts
    registered = register(record)
    publish_report(record, registered)
    return CompressResult(
        registered=registered, metrics=record.metrics, stages=measured.stages, model_dir=record.model_dir
    )

"""The `watch-base` flow: run a recipe when its base model gets a new registered version.

Polling, run on an interval schedule (`squeeze serve RECIPE --watch-base NAME`): each
run looks up the newest version of the base registered model; if the recipe's target
model has not yet been built from it, the recipe runs with `models:/NAME/VERSION` as
its base, and the target model remembers that version (tag on the registered model).
"""

from __future__ import annotations

from squeezeflow.settings import apply_defaults

apply_defaults()

from prefect import flow, task  # noqa: E402

from squeezeflow.flows.compress import CompressResult, compress_recipe  # noqa: E402
from squeezeflow.recipe import ModelSpec, load_recipe  # noqa: E402
from squeezeflow.registry.lineage import (  # noqa: E402
    last_built_base_version,
    latest_version,
    remember_built_base_version,
)


@task(name="latest-base-version")
def newest_unbuilt(base_model_name: str, target_model_name: str,
                   tracking_uri: str | None) -> str | None:
    newest = latest_version(base_model_name, tracking_uri)
    if newest is None or newest == last_built_base_version(
        target_model_name, base_model_name, tracking_uri
    ):
        return None
    return newest


@flow(name="watch-base")
def watch_base(recipe_path: str, base_model_name: str) -> CompressResult | None:
    recipe = load_recipe(recipe_path)
    target = recipe.registration.model_name
    tracking_uri = recipe.registration.tracking_uri
    version = newest_unbuilt(base_model_name, target, tracking_uri)
    if version is None:
        return None
    source = f"models:/{base_model_name}/{version}"
    recipe = recipe.model_copy(update={"model": ModelSpec(source=source, kind=recipe.model.kind)})
    result = compress_recipe(recipe)
    remember_built_base_version(target, base_model_name, version, tracking_uri)
    return result

"""The memory preflight on the command line: `squeeze validate` prints each phase's
estimated peak, `squeeze run` refuses (exit 2, before anything loads) a recipe whose
estimate exceeds `--memory-limit` or the machine's available memory
(`compression/preflight.py` holds the estimate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from squeezeflow.compression.preflight import Plan
    from squeezeflow.recipe import Recipe

EXIT_INVALID = 2  # the same code as an invalid recipe: nothing was loaded


def memory_plan(recipe: Recipe, headers_only: bool = False) -> Plan | str:
    """The recipe's phases on its base model for the memory preflight, or why there is none.

    Shapes come from the base model's safetensors headers; without them (a hub id not
    downloaded, .bin weights) from the model built on the meta device, unless
    `headers_only` (validate: it must not import torch when its checks are remembered).
    """
    from squeezeflow.compression.preflight import DataSize, ModelShape, Plan
    from squeezeflow.compression.sources import (
        hub_commit,
        hub_config_path,
        resolve_source,
        source_kind,
    )

    source = recipe.model.source
    kind = source_kind(source)
    if kind == "registry":
        return f"the base {source} is a registered version, sized only once it is downloaded"
    try:
        folder = (hub_config_path(source, hub_commit(source, recipe.model.revision)).parent
                  if kind == "hub" else resolve_source(source))
    except (OSError, RuntimeError) as error:  # the hub unreachable: the run will say it again
        return f"the base's config cannot be read: {error}"
    if any(folder.glob("*.safetensors")):
        shape = ModelShape.from_folder(folder)
    elif headers_only:
        return f"{folder} has no safetensors headers to read the shapes from"
    else:
        from transformers import AutoConfig

        from squeezeflow.compression.models import skeleton

        config = AutoConfig.from_pretrained(folder)
        model_kind = None if recipe.model.kind == "auto" else recipe.model.kind
        shape = ModelShape.from_module(skeleton(config, model_kind), config.to_dict())
    calibration, training = (
        None if spec is None else DataSize(spec.num_samples, spec.max_length, spec.batch_size)
        for spec in (recipe.calibration, recipe.training)
    )
    return Plan(
        shape=shape, stages=tuple((stage.name, stage.steps) for stage in recipe.stages),
        calibration=calibration, training=training,
        evaluation=DataSize(recipe.evaluation.data.num_samples, recipe.evaluation.max_length,
                            recipe.evaluation.batch_size),
    )


def memory_lines(recipe: Recipe) -> list[str]:
    """`squeeze validate`'s lines: each phase's estimated peak and what holds it."""
    plan = memory_plan(recipe, headers_only=True)
    if isinstance(plan, str):
        return [f"memory: not estimated ({plan})"]
    return [f"memory {estimate.describe()}" for estimate in plan.estimates()]


def preflight_or_exit(recipe: Recipe, memory_limit: str | None, errors: Console) -> None:
    """Exit 2, naming the phase, its estimate and settings that fit, when a phase's
    estimated peak exceeds the limit (`--memory-limit`, else what is available)."""
    from squeezeflow.compression.preflight import available_memory, format_bytes, parse_bytes

    try:
        limit = parse_bytes(memory_limit) if memory_limit else available_memory()
    except (ValueError, OSError) as error:
        errors.print(f"--memory-limit: {error}")
        raise typer.Exit(EXIT_INVALID) from None
    plan = memory_plan(recipe)
    if isinstance(plan, str):
        errors.print(f"[yellow]warning[/] memory preflight skipped: {escape(plan)}")
        return
    over = [estimate for estimate in plan.estimates() if estimate.total > limit]
    if not over:
        return
    where = "--memory-limit" if memory_limit else "available memory"
    for estimate in over:
        errors.print(f"[bold red]not enough memory[/] for {escape(estimate.describe())}; "
                     f"limit {format_bytes(limit)} ({where}); mostly {estimate.dominant}",
                     highlight=False, soft_wrap=True)
        fits = [fit for fit in plan.fitting_settings(estimate.phase, limit) if fit.value is not None]
        if fits:
            errors.print(f"  would fit: {'; '.join(fit.describe() for fit in fits)}",
                         highlight=False, soft_wrap=True)
        else:
            errors.print(f"  no data setting fits: the {estimate.dominant} alone exceeds the limit",
                         highlight=False, soft_wrap=True)
    errors.print("nothing was loaded; lower those settings, raise --memory-limit, or skip "
                 "this check with --no-preflight")
    raise typer.Exit(EXIT_INVALID)

"""Did a stage change the model? A stage that changed nothing must not become a version.

A misspelled `targets`/`ignore` glob selects no module, and the stage then saves its
input unchanged; registered, that copy would pass for a compressed model. The stage
executor takes a baseline before the steps run and calls `require_change` after them:

    baseline = stage_baseline(model, stage.steps)
    reports = run_stage_steps(model, steps, ...)
    require_change(stage.name, baseline, model)

The comparison is exact: a digest of every parameter and buffer (bytes, dtype, shape)
and of every stored weight format a step attached (`squeezeflow_*` module attributes),
so re-quantizing weights that already sit on the grid is a change only if it changes
how they are stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.config import StepConfig

log = logging.getLogger(__name__)

STORED_PREFIX = "squeezeflow_"  # module attributes carrying stored formats (codes, factors)


class UnchangedStageError(RuntimeError):
    """A stage whose output equals its input: nothing to register as compressed."""


@dataclass(frozen=True)
class StageBaseline:
    """The model as a stage received it: digests, and what each step selects in it."""

    digests: dict[str, str]  # parameter, buffer or stored attribute -> digest
    selected: tuple[tuple[StepConfig, int], ...]  # (step config, modules it selects)


def stage_baseline(model: nn.Module, steps: Sequence[StepConfig]) -> StageBaseline:
    """Digest `model` and count each step's selected modules, before the stage runs.

    Selection runs on fresh step instances, so the steps the stage runs keep no state
    from it.
    """
    selected = tuple((config, _count_selected(config, model)) for config in steps)
    return StageBaseline(digests=model_digests(model), selected=selected)


def require_change(stage: str, baseline: StageBaseline, model: nn.Module) -> None:
    """Raise UnchangedStageError when `model` is exactly what the stage started from."""
    if model_digests(model) != baseline.digests:
        return
    raise unchanged_error(stage, list(baseline.selected))


def unchanged_error(stage: str, selected: list[tuple[StepConfig, int]]) -> UnchangedStageError:
    """The error for a stage that changed nothing; `selected`: (step config, modules it
    selected), so that a step whose globs matched nothing is named."""
    empty = [(i, config) for i, (config, count) in enumerate(selected) if count == 0]
    if empty:
        reasons = "; ".join(
            f"steps.{i} ({config.kind}) selected no module: targets {list(config.targets)}, "
            f"ignore {list(config.ignore)}"
            for i, config in empty
        )
    else:
        reasons = "its steps left every weight as it was"
    return UnchangedStageError(
        f"stage {stage} changed nothing ({reasons}); fix its targets/ignore globs or its "
        "settings: an unchanged model is not registered as compressed"
    )


def model_digests(model: nn.Module) -> dict[str, str]:
    """Name -> digest of every parameter, buffer and stored format attribute.

    A tensor shared by several names (tied embeddings, shared blocks) is hashed once.
    """
    by_storage: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    digests: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        data = tensor.detach()
        key = (data.data_ptr(), data.storage_offset(), tuple(data.shape), data.dtype)
        if key not in by_storage:
            by_storage[key] = _digest(data)
        digests[name] = by_storage[key]
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith(STORED_PREFIX) and value is not None:
                digests[f"{module_name}.<{attr}>"] = _digest(value)
    return digests


def _digest(value: Any) -> str:
    """Digest of a tensor's dtype, shape and bytes; of a dataclass, field by field."""
    digest = hashlib.sha256()  # SHA extensions make it the fastest hashlib digest on x86
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            digest.update(f"{field.name}={_digest(getattr(value, field.name))}".encode())
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest()


def _count_selected(config: StepConfig, model: nn.Module) -> int:
    try:
        return len(CATALOG.build(config).select(model))
    except ValueError as error:  # e.g. no blocks found: the stage itself will say so
        log.debug("%s: selection failed before the stage: %s", config.kind, error)
        return 0

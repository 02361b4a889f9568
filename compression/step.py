"""The Step contract: what a compression step needs, observes and changes.

A step declares its needs (`Needs`), attaches observers to the modules it targets
inside `observe()` (a context manager: hooks are always removed), then `apply()`
changes those modules in place and returns a `StepReport` of measured metrics.
Runners (`compression/runners.py`) drive steps; steps never run the model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, Field
from torch import Tensor, nn

from squeezeflow.compression.config import Needs, Precision, StepConfig


class StepReport(BaseModel):
    """What one step did, as measured numbers (logged to the registry per stage)."""

    kind: str
    metrics: dict[str, float] = Field(default_factory=dict)
    per_module: dict[str, dict[str, float]] = Field(default_factory=dict)
    # metric name -> [(training step, value), ...]: training curves, logged by step
    curves: dict[str, list[tuple[int, float]]] = Field(default_factory=dict)

    def merge(self, other: StepReport) -> StepReport:
        """Combine reports of the same step from several blocks (layer-wise runner)."""
        per_module = {**self.per_module, **other.per_module}
        return StepReport(kind=self.kind, metrics=self.metrics, per_module=per_module,
                          curves=self.curves)


@dataclass(frozen=True)
class TrainingContext:
    """What a training step (Needs.TRAINING / TEACHER) gets besides the model."""

    batches: Sequence[dict[str, Tensor]]  # tokenized training text (the student's tokenizer)
    folder: Path  # the resumable checkpoint lives here; a rerun with the same folder resumes
    teacher: Path | None = None  # the teacher's model folder, for Needs.TEACHER
    seed: int = 0  # data order and initialization of anything the step adds


ConfigT = TypeVar("ConfigT", bound=StepConfig)


class Step(Generic[ConfigT]):
    """Base class of every registered step."""

    # Declared by the config class (`StepConfig.needs`, `.changes_structure`); the
    # catalog copies them here when it registers the step.
    needs: ClassVar[Needs] = Needs.NOTHING
    changes_structure: ClassVar[bool] = False

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def accepts(self, module: nn.Module) -> bool:
        """The module types this step works on: nn.Linear unless a step says otherwise."""
        return isinstance(module, nn.Linear)

    def select(self, root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        """Modules under `root` that `accepts` takes, matched by `targets`, not by `ignore`."""
        selected: dict[str, nn.Module] = {}
        for name, module in root.named_modules():
            full_name = f"{prefix}.{name}" if prefix and name else (prefix or name)
            if not self.accepts(module) or not full_name:
                continue
            if not any(fnmatch.fnmatchcase(full_name, p) for p in self.config.targets):
                continue
            if any(fnmatch.fnmatchcase(full_name, p) for p in self.config.ignore):
                continue
            selected[full_name] = module
        return selected

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """Attach calibration observers to `modules`; the default observes nothing."""
        yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        raise NotImplementedError

    def train(
        self, model: nn.Module, context: TrainingContext, progress: Callable[[str], None] | None = None
    ) -> StepReport:
        """Train `model` in place (steps that need TRAINING or TEACHER); the runner calls it
        instead of `observe`/`apply`."""
        raise NotImplementedError(f"{type(self).__name__} does not train")

    def restructure(self, model: nn.Module) -> None:
        """Change the model's structure after every `apply`; the default changes nothing.

        `apply` decides (and may zero what goes away); `restructure` removes blocks,
        shrinks matrices, replaces modules and updates `model.config` to match.
        """

    @property
    def needs_whole_model(self) -> bool:
        """The config's `needs_whole_model`: this stage cannot stream block by block."""
        return self.config.needs_whole_model

    @property
    def sequential(self) -> bool:
        """True when each group of selected modules sharing an input must be compressed
        before the next group sees its input (GPTQ's true-sequential): the layer-wise
        runners then go through `compression/sequential.py`, which observes only each
        group's first module and calls `share_observation` for the others. Such a step
        observes inputs only."""
        return False

    def share_observation(self, name: str, leader: str) -> None:
        """Module `name` had the same inputs as `leader`: take what `leader` observed."""
        raise NotImplementedError(f"{self.config.kind} cannot run true-sequentially")

    @property
    def observes_inputs_only(self) -> bool:
        """True when `observe` reads nothing but the inputs of the selected modules
        (forward pre-hooks): a layer-wise runner may then cut a calibration forward short
        once every selected module has seen its input, since nothing after it is observed
        and the outputs are recomputed after `apply` anyway. A step that observes
        nothing qualifies; others say so themselves."""
        return type(self).observe is Step.observe

    @property
    def calibration_precision(self) -> Precision:
        """Precision of the matmuls in the calibration forward passes that feed `observe`.

        "bf16": the runner lets fp32 matmuls round their inputs to bf16 (fp32
        accumulation and output) where the CPU does bf16 natively; "fp32" keeps them
        exact. A stage runs in bf16 only when every one of its steps asks for it.
        """
        return "fp32"

    @property
    def writes_checkpoint(self) -> bool:
        """True when the step produces the stage's whole checkpoint folder itself.

        Such a step (e.g. `gptq` with `backend: gptqmodel`, an external tool that loads
        and saves its own format) runs alone in its stage: the stage calls
        `write_checkpoint` instead of loading the model and running `apply`.
        """
        return False

    def write_checkpoint(
        self, source: Path, calibration: Sequence[dict[str, Tensor]], output: Path
    ) -> StepReport:
        """Write the stage's output folder from the checkpoint folder `source`."""
        raise NotImplementedError(f"{type(self).__name__} does not write checkpoints")

    def finalize(self, model: nn.Module, reports: list[StepReport]) -> StepReport:
        """Summarize per-block reports into one report for the whole model."""
        merged = reports[0]
        for report in reports[1:]:
            merged = merged.merge(report)
        return merged.model_copy(update={"metrics": summarize(merged.per_module)})


# The attention mask of the calibration batch being run, set by the runners: observers
# fold only the tokens it marks, so padding does not dilute calibration statistics.
_token_mask: ContextVar[Tensor | None] = ContextVar("token_mask", default=None)


@contextmanager
def calibration_tokens(mask: Tensor | None) -> Iterator[None]:
    """While inside, `real_tokens` keeps the positions where `mask` (batch, seq) is nonzero."""
    token = _token_mask.set(None if mask is None or bool(mask.all()) else mask.bool())
    try:
        yield
    finally:
        _token_mask.reset(token)


def token_mask() -> Tensor | None:
    """The mask `calibration_tokens` set (None: every position counts), for observers
    that keep inputs to replay later and must know which positions were real."""
    return _token_mask.get()


def real_tokens(x: Tensor, flattened: bool = False) -> Tensor:
    """x (..., features) -> (tokens, features): every position, or only the unpadded ones
    when a runner set the batch's mask and x has its (batch, seq) leading shape.

    `flattened`: x is (batch * seq, features) with the tokens in order (an MoE router's
    logits); the mask is flattened to match.
    """
    mask = _token_mask.get()
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask]
    if mask is not None and flattened and x.dim() == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    return x.reshape(-1, x.shape[-1])


@contextmanager
def hooks(handles: list[Any]) -> Iterator[None]:
    """Remove every hook handle on exit, even when the forward pass raised."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def summarize(per_module: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each per-module metric, plus the worst (max) of error metrics."""
    keys = sorted({key for values in per_module.values() for key in values})
    summary: dict[str, float] = {"modules": float(len(per_module))}
    for key in keys:
        values = [m[key] for m in per_module.values() if key in m]
        summary[f"mean_{key}"] = sum(values) / len(values)
        if "error" in key:
            summary[f"max_{key}"] = max(values)
    return summary

"""Runners drive the steps of one stage over a model.

- basic: every step attaches its observers, one forward pass over the calibration
  batches feeds them all (skipped when no step needs data), then each step applies.
- layer-wise (GPTQ-style): capture the inputs of the first block, then for each
  block: observe -> apply -> recompute the block's outputs with the compressed
  weights, which become the next block's inputs. Only one block's activations are
  alive at a time, which keeps memory bounded on large models.

The runner is chosen from the steps' needs: any LAYERWISE step makes the stage
layer-wise.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.progress import advance
from squeezeflow.compression.sequential import Layouts, run_block_sequentially, sequential_step
from squeezeflow.compression.step import (
    Needs,
    Step,
    StepReport,
    TrainingContext,
    calibration_tokens,
    hooks,
)

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Progress = Callable[[str], None]
TRAINING_NEEDS = {Needs.TRAINING, Needs.TEACHER}  # steps that train instead of observe/apply


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def run_stage_steps(
    model: nn.Module,
    steps: Sequence[Step[Any]],
    calibration: Sequence[Batch] = (),
    progress: Progress | None = None,
    training: TrainingContext | None = None,
) -> list[StepReport]:
    """Apply `steps` (one stage) to `model` in place; one report per step.

    A step that needs training data or a teacher trains the model (`Step.train`) with
    `training`; it is the only step of its stage.
    """
    needs = {step.needs for step in steps}
    if needs & TRAINING_NEEDS:
        return run_training(model, steps, training, progress)
    structural = [step.config.kind for step in steps if step.changes_structure]
    if structural and len(steps) > 1:
        raise ValueError(
            f"{structural[0]} changes the model's structure and must be the only step of its stage"
        )
    if needs & {Needs.CALIBRATION, Needs.LAYERWISE} and not calibration:
        raise ValueError("this stage has steps that need calibration data, and none was given")
    with torch.no_grad():
        if Needs.LAYERWISE in needs:
            return run_layerwise(model, steps, calibration, progress)
        return run_basic(model, steps, calibration if Needs.CALIBRATION in needs else (), progress)


def run_training(
    model: nn.Module,
    steps: Sequence[Step[Any]],
    training: TrainingContext | None,
    progress: Progress | None = None,
) -> list[StepReport]:
    if len(steps) > 1:
        trainer = next(step.config.kind for step in steps if step.needs in TRAINING_NEEDS)
        raise ValueError(f"{trainer} trains the model and must be the only step of its stage")
    if training is None:
        raise ValueError(f"{steps[0].config.kind} trains the model, and no training data was given")
    return [steps[0].train(model, training, progress)]


def run_basic(
    model: nn.Module,
    steps: Sequence[Step[Any]],
    calibration: Sequence[Batch],
    progress: Progress | None = None,
) -> list[StepReport]:
    selected = [step.select(model) for step in steps]
    with ExitStack() as observers:
        for step, modules in zip(steps, selected, strict=True):
            observers.enter_context(step.observe(modules))
        for index, batch in enumerate(calibration):
            with calibration_tokens(batch.get("attention_mask")):
                model(**batch, **_no_cache(model))
            _tell(progress, f"calibration batch {index + 1}/{len(calibration)}")
            advance("calibration batches", index + 1, len(calibration))
    reports = []
    for step, modules in zip(steps, selected, strict=True):
        _tell(progress, f"applying {step.config.kind} to {len(modules)} modules")
        report = step.apply(modules)
        step.restructure(model)
        reports.append(step.finalize(model, [report]))
    return reports


def run_layerwise(
    model: nn.Module,
    steps: Sequence[Step[Any]],
    calibration: Sequence[Batch],
    progress: Progress | None = None,
) -> list[StepReport]:
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], calibration)
    masks = [batch.get("attention_mask") for batch in calibration]  # observers skip padding
    reports: list[list[StepReport]] = [[] for _ in steps]
    bf16 = all(step.calibration_precision == "bf16" for step in steps)
    sequential = sequential_step(steps)
    layouts: Layouts = {}
    for index, block in enumerate(blocks):
        block_name = f"{prefix}.{index}"
        last = index == len(blocks) - 1
        if sequential is not None:  # one forward per batch, compressing group by group
            report, outputs = run_block_sequentially(block, block_name, sequential, inputs, masks,
                                                     last, bf16, layouts)
            reports[0].append(report)
            if not last:
                inputs = [((output, *args[1:]), kwargs)
                          for output, (args, kwargs) in zip(outputs, inputs, strict=True)]
            _tell(progress, f"block {index + 1}/{len(blocks)} done")
            advance("calibration blocks", index + 1, len(blocks))
            continue
        selected = [step.select(block, block_name) for step in steps]
        with ExitStack() as observers, calibration_matmuls(bf16):
            for step, modules in zip(steps, selected, strict=True):
                observers.enter_context(step.observe(modules))
            forward = observers.enter_context(until_observed(steps, selected))
            for (args, kwargs), mask in zip(inputs, masks, strict=True):
                with calibration_tokens(mask):
                    forward(block, args, kwargs)
        for step, modules, step_reports in zip(steps, selected, reports, strict=True):
            step_reports.append(step.apply(modules))  # exact fp32: apply does the math
        # The next block sees what this compressed block produces (the last has none).
        if not last:
            with calibration_matmuls(bf16):
                inputs = [((hidden_of(block(*args, **kwargs)), *args[1:]), kwargs)
                          for args, kwargs in inputs]
        _tell(progress, f"block {index + 1}/{len(blocks)} done")
        advance("calibration blocks", index + 1, len(blocks))
    outside = _modules_outside(model, prefix, steps)
    if outside:
        log.warning("layer-wise steps skipped modules outside the blocks: %s", ", ".join(outside))
    return [
        step.finalize(model, step_reports)
        for step, step_reports in zip(steps, reports, strict=True)
    ]


class _Observed(Exception):
    """Raised inside a calibration forward once every observed module saw its input."""


BlockForward = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]


@contextmanager
def until_observed(steps: Sequence[Step[Any]],
                   selected: Sequence[dict[str, nn.Module]]) -> Iterator[BlockForward]:
    """A block forward for an observing pass whose output is thrown away: when every step
    observes inputs only, it stops as soon as each selected module has seen its input
    (for a Llama block, the MLP's down_proj matmul and what follows it are skipped: 27%
    of an 8B block's flops). Exact: no observed value changes. Enter after the steps'
    observers, so their hooks run first."""
    modules = {id(module): module for chosen in selected for module in chosen.values()}
    if not modules or not all(step.observes_inputs_only for step in steps):
        yield lambda block, args, kwargs: block(*args, **kwargs)
        return
    seen: set[int] = set()

    def saw(module: nn.Module, _args: tuple[Any, ...]) -> None:
        seen.add(id(module))
        if len(seen) == len(modules):
            raise _Observed

    def forward(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.clear()
        try:
            block(*args, **kwargs)
        except _Observed:
            pass

    with hooks([module.register_forward_pre_hook(saw) for module in modules.values()]):
        yield forward


@contextmanager
def calibration_matmuls(bf16: bool) -> Iterator[None]:
    """fp32 matmuls with bf16-rounded inputs (fp32 accumulation) while inside, if `bf16`.

    Only where oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX): there the
    calibration forward passes and Hessian products get much faster (GPTQ of a 134M
    Llama: 53-64 s instead of 82 s, benchmarks/README.md); elsewhere the emulation would
    be slower, so matmuls stay exact.
    """
    backend: Any = getattr(torch.backends.mkldnn, "matmul", None)  # torch >= 2.9, untyped
    if not bf16 or backend is None or not _native_bf16():
        yield
        return
    previous = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        yield
    finally:
        backend.fp32_precision = previous


@functools.cache
def _native_bf16() -> bool:
    capabilities: dict[str, Any] = getattr(torch.cpu, "get_capabilities", dict)()
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    return bool(torch.backends.mkldnn.is_available() and native)


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calibration: Sequence[Batch]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The positional and keyword inputs of `first_block` for each calibration batch."""
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not args:  # some models pass hidden_states by keyword
            args, kwargs = (kwargs.pop("hidden_states"),), kwargs
        captured.append((args, dict(kwargs)))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in calibration:
            try:
                model(**batch, **_no_cache(model))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def release_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system (fixed 1 MiB mmap threshold).

    By default glibc raises its mmap threshold each time a big block is freed, so later
    tensors of up to 32 MiB come from the heap, whose freed space stays resident. A
    streamed stage frees a block's worth of tensors for every block: measured on a 1B
    Llama with GPTQ, resident memory between blocks went from 1.4-1.7 GB to 1.1 GB and
    the peak from 2.58 to 2.40 GB with the threshold fixed. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 20)


def hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def _no_cache(model: nn.Module) -> dict[str, bool]:
    """`use_cache=False` where the model takes it: a KV cache is useless in calibration."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _modules_outside(model: nn.Module, prefix: str, steps: Sequence[Step[Any]]) -> list[str]:
    return sorted(
        name
        for step in steps
        for name in step.select(model)
        if not name.startswith(f"{prefix}.")
    )


def _tell(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)
    log.debug(message)

"""True-sequential layer-wise compression: one calibration forward per block.

A step whose `sequential` is set (gptq's `sequential: true`, GPTQModel's
`true_sequential`) compresses each group of Linears that share an input (in a Llama
block: q/k/v, then o, then gate/up, then down) before the next group sees its input,
so every group is calibrated on what the already-compressed groups of its own block
produce. Done the plain way that is one partial forward of every batch per group, plus
one to produce the block's outputs. Here each calibration batch runs its block forward
once, in its own thread, and pauses just before a group's first Linear until every
batch has reached it and the group is compressed; then the forwards go on, now through
the compressed group. Only one thread runs at a time (the others wait on semaphores),
so torch's intra-op threads serve one forward at a time, as in the default mode.

Cost: one block forward per batch (the default mode runs an observing forward cut short
and a recompute: about 1.8), plus, once per block layout, a probe forward of the first
batch that learns the groups; each later block checks them as its forwards run. Memory:
every batch's forward is alive at once, holding what it holds at a pause (for a Llama
block at down_proj: the residual, the normed input and the MLP's intermediate
activations), i.e. about calibration tokens x (2 hidden + intermediate) x 4 bytes more
than the default mode (`preflight._paused_forwards`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.step import Step, StepReport, calibration_tokens, hooks

Inputs = list[tuple[tuple[Any, ...], dict[str, Any]]]
Layouts = dict[tuple[str, tuple[str, ...]], list[list[str]]]  # block layout -> groups


def sequential_step(steps: Sequence[Step[Any]]) -> Step[Any] | None:
    """The stage's step when it asks for true-sequential compression, else None."""
    asking = [step for step in steps if step.sequential]
    if not asking:
        return None
    if len(steps) > 1:
        raise ValueError(
            f"{asking[0].config.kind} with sequential: true must be the only step of its stage"
        )
    return asking[0]


def run_block_sequentially(
    block: nn.Module,
    block_name: str,
    step: Step[Any],
    inputs: Inputs,
    masks: Sequence[Tensor | None],
    last: bool,
    bf16: bool,
    layouts: Layouts,
) -> tuple[StepReport, list[Tensor]]:
    """Compress `block` group by group with one forward per calibration batch; return the
    step's report and the block's outputs (empty when `last`: they would feed nothing).
    `layouts` remembers the groups of each block layout across calls."""
    from squeezeflow.compression.runners import calibration_matmuls, release_freed_memory

    # Each batch thread allocates from a heap arena of its own, where what it frees stays
    # resident: a 134M Llama (128 x 256 tokens) peaked at 3989 MB that way, 2022 MB with
    # large tensors mmapped (glibc's mmap threshold fixed, as a streamed stage does).
    release_freed_memory()
    modules = step.select(block, block_name)
    relative = tuple(name.removeprefix(f"{block_name}.") for name in modules)
    layout = (type(block).__qualname__, relative)
    if layout not in layouts:
        with calibration_matmuls(bf16):
            layouts[layout] = input_groups(block, dict(zip(relative, modules.values(), strict=True)),
                                           inputs[0], masks[0])
    groups = [[f"{block_name}.{name}" for name in group] for group in layouts[layout]]
    unused = sorted(set(modules) - {name for group in groups for name in group})
    if unused:
        raise ValueError(f"{step.config.kind}: {', '.join(unused)} saw no calibration inputs "
                         "(not used in the block's forward)")
    forwards = _PausedForwards(block, modules, groups, inputs, masks)
    reports = []
    with step.observe({group[0]: modules[group[0]] for group in groups}), forwards:
        with calibration_matmuls(bf16):
            forwards.advance(-1)  # every batch runs to the first group
        for index, group in enumerate(groups):
            for name in group[1:]:
                step.share_observation(name, group[0])
            reports.append(step.apply({name: modules[name] for name in group}))  # exact fp32
            if last and index == len(groups) - 1:
                forwards.stop()  # the last block's outputs feed nothing
            with calibration_matmuls(bf16):
                forwards.advance(index)
    report = reports[0]
    for other in reports[1:]:
        report = report.merge(other)
    return report, [] if last else forwards.outputs()


class _Probed(Exception):
    """Raised inside the probe forward once every module has been called."""


def input_groups(block: nn.Module, modules: dict[str, nn.Module],
                 inputs: tuple[tuple[Any, ...], dict[str, Any]], mask: Tensor | None) -> list[list[str]]:
    """Names of `modules` grouped by the input tensor they are called with, in call order,
    from one forward of one batch (cut short once every module was called)."""
    names = {id(module): name for name, module in modules.items()}
    groups: list[tuple[Tensor, list[str]]] = []
    seen: set[str] = set()

    def saw(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(module)]
        if name not in seen:
            seen.add(name)
            group = next((g for x, g in groups if x is args[0]), None)
            if group is None:
                groups.append((args[0], [name]))
            else:
                group.append(name)
        if len(seen) == len(modules):
            raise _Probed

    args, kwargs = inputs
    with hooks([module.register_forward_pre_hook(saw) for module in modules.values()]):
        try:
            with torch.no_grad(), calibration_tokens(mask):
                block(*args, **kwargs)
        except _Probed:
            pass
    return [group for _, group in groups]


class _Stopped(Exception):
    """Raised in a paused forward that is told not to go on."""


@dataclass
class _Batch:
    go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    at: int | None = None  # the group it waits before; None once its forward ended
    reached: set[int] = field(default_factory=set)  # groups this batch's forward reached
    group_input: weakref.ref[Tensor] | None = None  # the input of the group it is in
    output: Tensor | None = None
    failure: BaseException | None = None


class _PausedForwards:
    """One thread per calibration batch running `block`, each paused before every group's
    first module; `advance(k)` lets every batch waiting before group k run to the next."""

    def __init__(self, block: nn.Module, modules: dict[str, nn.Module], groups: list[list[str]],
                 inputs: Inputs, masks: Sequence[Tensor | None]) -> None:
        self.block, self.inputs, self.masks = block, inputs, masks
        self.modules, self.groups = modules, groups
        self.batches = [_Batch() for _ in inputs]
        self.back = threading.Semaphore(0)
        self.local = threading.local()
        self.stopped = False
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True,
                                         name=f"calibration-batch-{i}") for i in range(len(inputs))]

    def __enter__(self) -> _PausedForwards:
        leaders = {id(self.modules[group[0]]): index for index, group in enumerate(self.groups)}
        members = {id(self.modules[name]): (index, name)
                   for index, group in enumerate(self.groups) for name in group[1:]}
        self.handles = [self.modules[group[0]].register_forward_pre_hook(
            lambda module, args: self._pause(leaders[id(module)], args)) for group in self.groups]
        self.handles += [self.modules[name].register_forward_pre_hook(
            lambda module, args: self._check(*members[id(module)], args))
            for group in self.groups for name in group[1:]]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for batch in self.batches:
            batch.go.release()  # a paused forward raises _Stopped, one not started returns
        for thread in self.threads:
            thread.join()
        for handle in self.handles:
            handle.remove()

    def stop(self) -> None:
        self.stopped = True

    def advance(self, group: int) -> None:
        """Run each batch waiting before `group` (-1: not started) until it waits before
        the next group or ends; raise what a forward raised, or if a batch skipped a group."""
        following = group + 1
        for index, batch in enumerate(self.batches):
            batch.go.release()
            self.back.acquire()
            if batch.failure is not None:
                raise batch.failure
            expected = following if following < len(self.groups) else None
            if batch.at != expected and not self.stopped:
                where = "ended its forward" if batch.at is None else f"reached {self.groups[batch.at][0]}"
                wanted = "its end" if expected is None else self.groups[expected][0]
                raise RuntimeError(
                    f"calibration batch {index} {where} before {wanted}: the block's forward "
                    "calls its Linears in a different order than the first batch's did, which "
                    "true-sequential compression cannot follow (use sequential: false)"
                )

    def outputs(self) -> list[Tensor]:
        outputs = [batch.output for batch in self.batches]
        assert all(output is not None for output in outputs)
        return [output for output in outputs if output is not None]

    def _work(self, index: int) -> None:
        from squeezeflow.compression.runners import hidden_of

        batch = self.batches[index]
        batch.go.acquire()
        self.local.batch = batch
        try:
            if not self.stopped:
                args, kwargs = self.inputs[index]
                with torch.no_grad(), calibration_tokens(self.masks[index]):  # both per thread
                    batch.output = hidden_of(self.block(*args, **kwargs))
        except _Stopped:
            pass
        except BaseException as error:  # handed to the main thread by advance()
            batch.failure = error
        finally:
            batch.at = None
            batch.group_input = None
            self.back.release()

    def _pause(self, group: int, args: tuple[Any, ...]) -> None:
        batch: _Batch = self.local.batch
        if group in batch.reached:
            raise RuntimeError(f"{self.groups[group][0]} is called twice in one block forward; "
                               "true-sequential compression needs one call (use sequential: false)")
        batch.reached.add(group)
        batch.group_input = weakref.ref(args[0])  # not kept alive past its own use
        batch.at = group
        self.back.release()
        batch.go.acquire()
        if self.stopped:
            raise _Stopped

    def _check(self, group: int, name: str, args: tuple[Any, ...]) -> None:
        batch: _Batch = self.local.batch
        if batch.at != group or batch.group_input is None or batch.group_input() is not args[0]:
            raise RuntimeError(
                f"{name} is not called with the input of {self.groups[group][0]} in every block "
                "(blocks of one layout route their inputs differently; use sequential: false)"
            )

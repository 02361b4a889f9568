"""Block parameter sharing (FoldGPT group sharing): consecutive blocks reuse one
block's Linear weights.

Liu et al. 2024, "FoldGPT: Simple and Effective Large Language Model Compression
Scheme" (in defense of parameter sharing): blocks are split into groups of
consecutive blocks; every block of a group runs with the weights of one
representative. The representative is the member whose weights, used by the whole
group, reproduce the group's output on calibration data best.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn


def groups_of(blocks: int, group_size: int) -> list[list[int]]:
    """Consecutive groups; the last one may be shorter ([0, 1], [2, 3], [4])."""
    return [list(range(start, min(start + group_size, blocks))) for start in range(0, blocks, group_size)]


def linear_names(block: nn.Module) -> list[str]:
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def tie_linears(source: nn.Module, target: nn.Module) -> None:
    """Make `target`'s Linears use `source`'s weight and bias Parameters (same objects)."""
    for name in linear_names(source):
        src, dst = source.get_submodule(name), target.get_submodule(name)
        assert isinstance(src, nn.Linear) and isinstance(dst, nn.Linear)
        dst.weight = src.weight
        if src.bias is not None:
            dst.bias = src.bias


@contextmanager
def tied_temporarily(source: nn.Module, targets: list[nn.Module]) -> Iterator[None]:
    """Tie `targets` to `source` inside the block, restoring their own Parameters after."""
    saved = [
        {name: (m.weight, m.bias) for name, m in t.named_modules() if isinstance(m, nn.Linear)}
        for t in targets
    ]
    try:
        for target in targets:
            tie_linears(source, target)
        yield
    finally:
        for target, own in zip(targets, saved, strict=True):
            for name, (weight, bias) in own.items():
                module = target.get_submodule(name)
                module.weight = weight
                if bias is not None:
                    module.bias = bias


def relative_error(output: Tensor, reference: Tensor) -> float:
    """||output - reference||^2 / ||reference||^2."""
    return float((output - reference).pow(2).sum() / reference.pow(2).sum().clamp(min=1e-12))


def choose_representative(
    members: list[nn.Module], run_group: Callable[[], list[Tensor]], reference: list[Tensor]
) -> tuple[int, list[float]]:
    """Index (within the group) of the member whose weights serve the group best, and all errors.

    `run_group` runs the group's blocks on the group's calibration inputs and returns
    its outputs; it is called once per candidate with the members tied to it.
    """
    errors = []
    for candidate in members:
        others = [m for m in members if m is not candidate]
        with tied_temporarily(candidate, others):
            outputs = run_group()
        errors.append(sum(relative_error(o, r) for o, r in zip(outputs, reference, strict=True)) / len(reference))
    best = min(range(len(members)), key=lambda i: (errors[i], i))
    return best, errors

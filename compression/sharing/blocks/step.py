"""`share`: consecutive blocks in groups share one set of Linear weights (FoldGPT).

Each group of `group_size` consecutive blocks keeps one representative's Linear
weights and biases (chosen by the group's output error on calibration data); the
other members point at the same Parameters. Normalization weights stay per block:
they are 2 x hidden numbers and let each repeat rescale its input. The saved
artifact stores each shared tensor once (`tied` in squeezeflow.json) and loading
restores the tying, so the model on disk and in memory is smaller.

```yaml
- kind: share
  group_size: 2      # consecutive blocks per group; a last, shorter group is allowed
```
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.sharing.blocks.config import ShareConfig
from squeezeflow.compression.sharing.blocks.math import (
    choose_representative,
    groups_of,
    tie_linears,
)
from squeezeflow.compression.step import (
    Step,
    StepReport,
    calibration_tokens,
    hooks,
    real_tokens,
    token_mask,
)

log = logging.getLogger(__name__)

Call = tuple[tuple[Any, ...], dict[str, Any]]


def _hidden(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@register_step(ShareConfig)
class ShareStep(Step[ShareConfig]):
    def __init__(self, config: ShareConfig) -> None:
        super().__init__(config)
        self.group_inputs: dict[int, list[Call]] = {}  # first block of a group -> its calls
        self.group_outputs: dict[int, list[Tensor]] = {}  # last block of a group -> its outputs
        self.group_masks: dict[int, list[Tensor | None]] = {}  # first block -> its calls' masks

    def select(self, root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        """The model's blocks, by full name."""
        name, blocks = find_blocks(root)
        full = f"{prefix}.{name}" if prefix else name
        return {f"{full}.{i}": block for i, block in enumerate(blocks)}

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        blocks = list(modules.values())
        handles = []
        for group in groups_of(len(blocks), self.config.group_size):
            first, last = group[0], group[-1]
            calls = self.group_inputs.setdefault(first, [])
            outputs = self.group_outputs.setdefault(last, [])
            masks = self.group_masks.setdefault(first, [])

            def record_input(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                             calls: list[Call] = calls, masks: list[Tensor | None] = masks) -> None:
                calls.append((args, dict(kwargs)))
                masks.append(token_mask())  # the replay compares real tokens only

            def record_output(_: nn.Module, args: tuple[Any, ...], output: Any,
                              outputs: list[Tensor] = outputs) -> None:
                outputs.append(real_tokens(_hidden(output).detach()))

            handles.append(blocks[first].register_forward_pre_hook(record_input, with_kwargs=True))
            handles.append(blocks[last].register_forward_hook(record_output))
        with hooks(handles):
            yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        names, blocks = list(modules), list(modules.values())
        per_module: dict[str, dict[str, float]] = {}
        for group in groups_of(len(blocks), self.config.group_size):
            members = [blocks[i] for i in group]
            calls, reference = self.group_inputs.pop(group[0]), self.group_outputs.pop(group[-1])
            masks = self.group_masks.pop(group[0])

            def run_group(members: list[nn.Module] = members, calls: list[Call] = calls,
                          masks: list[Tensor | None] = masks) -> list[Tensor]:
                outputs = []
                with torch.no_grad():
                    for (args, kwargs), mask in zip(calls, masks, strict=True):
                        hidden, rest = args[0] if args else kwargs["hidden_states"], args[1:]
                        extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                        for block in members:
                            hidden = _hidden(block(hidden, *rest, **extra))
                        with calibration_tokens(mask):
                            outputs.append(real_tokens(hidden))
                return outputs

            if len(members) == 1:
                per_module[names[group[0]]] = {"representative": 1.0, "group_error": 0.0}
                continue
            best, errors = choose_representative(members, run_group, reference)
            for position, index in enumerate(group):
                if position != best:
                    tie_linears(members[best], blocks[index])
                per_module[names[index]] = {
                    "representative": float(position == best),
                    "group_error": errors[best],
                }
            log.info("share: blocks %s use block %d's weights (error %.4f)", group, group[best], errors[best])
        return StepReport(kind=self.config.kind, per_module=per_module)

"""What a memory budget loaded from a BitStack artifact, and the artifact of just that.

- `bitstack_loaded(model)`: per Linear, blocks loaded of those decomposed, and the bytes
  of the loaded blocks (the model's modules carry them: dense or packed runtime);
- `read_plan(path, memory_budget_mb)`: the plan a budget makes, from the folder's
  squeezeflow.json and safetensors header, without loading anything;
- `write_budget(path, output, memory_budget_mb)`: load under the budget and save: the
  new folder's stored tensors are exactly the loaded blocks plus every other tensor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from squeezeflow.compression.artifact import (
    FORMAT_FILE,
    WEIGHTS_FILE,
    load_compressed,
    save_compressed,
)
from squeezeflow.compression.formats.bitstack import (
    MIB,
    BitStackFormat,
    BitStackLinear,
    BudgetPlan,
    plan_memory_budget,
    safetensors_bytes,
)
from squeezeflow.compression.quantization.bitstack.stored import BITSTACK_ATTR, BitStackWeight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedBlocks:
    """The BitStack blocks a model holds."""

    blocks: dict[str, tuple[int, int]]  # Linear -> (blocks loaded, blocks decomposed)
    block_bytes: int  # bytes of the loaded blocks as stored (signs + fp16 factors)
    scale_bytes: int  # the Linears' fp16 column scales, stored once per Linear
    weights: int  # weights of these Linears (out * in summed)

    @property
    def loaded(self) -> int:
        return sum(loaded for loaded, _ in self.blocks.values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits of these Linears (blocks and scales) per weight."""
        return 8 * (self.block_bytes + self.scale_bytes) / max(self.weights, 1)


def bitstack_loaded(model: nn.Module) -> LoadedBlocks:
    """The blocks each BitStack Linear of `model` holds (after `load_compressed`)."""
    stacks: dict[str, BitStackWeight] = {}
    for name, module in model.named_modules():
        if isinstance(module, BitStackLinear):
            stacks[name] = module.stored
        elif isinstance(getattr(module, BITSTACK_ATTR, None), BitStackWeight):
            stacks[name] = getattr(module, BITSTACK_ATTR)
    return LoadedBlocks(
        blocks={name: (s.blocks, s.niter) for name, s in stacks.items()},
        block_bytes=sum(s.blocks * s.block_bytes for s in stacks.values()),
        scale_bytes=sum(2 * s.shape[1] for s in stacks.values()),  # fp16 on disk
        weights=sum(s.shape[0] * s.shape[1] for s in stacks.values()),
    )


def read_plan(path: Path, memory_budget_mb: float | None = None) -> BudgetPlan:
    """The plan `load_compressed(path, memory_budget_mb=...)` follows (None: every block)."""
    description = json.loads((Path(path) / FORMAT_FILE).read_text())
    layers = description.get(BitStackFormat.name) or {}
    if not layers:
        raise ValueError(f"{path} has no bitstack layers")
    budget = None if memory_budget_mb is None else int(memory_budget_mb * MIB)
    return plan_memory_budget(layers, safetensors_bytes(Path(path) / WEIGHTS_FILE), budget)


def write_budget(path: Path, output: Path, memory_budget_mb: float) -> BudgetPlan:
    """Write the artifact of what `memory_budget_mb` loads from `path` to `output`.

    Returns the plan; `output`'s stored tensors then hold `plan.total_bytes` bytes
    (`plan.block_bytes` of them the loaded blocks).
    """
    plan = read_plan(path, memory_budget_mb)
    metadata = json.loads((Path(path) / FORMAT_FILE).read_text()).get("metadata") or {}
    loaded = load_compressed(path, memory_budget_mb=memory_budget_mb)
    save_compressed(loaded.model, loaded.tokenizer, loaded.kind, Path(output),
                    metadata={**metadata, "bitstack_budget_mb": memory_budget_mb})
    stored = sum(safetensors_bytes(Path(output) / WEIGHTS_FILE).values())
    if stored != plan.total_bytes:  # a budget's artifact is its blocks plus the rest, nothing else
        raise RuntimeError(f"{output}: {stored} bytes of tensors written, the plan has {plan.total_bytes}")
    log.info("bitstack: wrote %d of %d blocks (%.4g MiB of tensors) to %s",
             plan.blocks_loaded, plan.blocks_stored, stored / MIB, output)
    return plan

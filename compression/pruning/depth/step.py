"""`depth`: remove whole blocks whose output is most similar to their input.

Influence of each block (1 - cosine of its input and output hidden states) is
measured on calibration data; the least influential blocks are removed, the block
list renumbered (`layer_idx` of attention modules, which index the KV cache) and
`num_hidden_layers` (and `layer_types` where the config has it) updated, so the
saved model is a smaller ordinary Hugging Face model.

```yaml
- kind: depth
  remove: 1          # blocks removed
- kind: depth
  fraction: 0.25     # or: this fraction of the blocks, rounded
```
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.pruning.depth.config import PER_LAYER_CONFIG_LISTS, DepthConfig
from squeezeflow.compression.pruning.depth.math import InfluenceMeter, least_influential
from squeezeflow.compression.step import Step, StepReport, hooks

log = logging.getLogger(__name__)


@register_step(DepthConfig)
class DepthStep(Step[DepthConfig]):
    def __init__(self, config: DepthConfig) -> None:
        super().__init__(config)
        self.prefix = ""
        self.meters: dict[str, InfluenceMeter] = {}
        self.removed: list[int] = []

    def select(self, root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        """The model's blocks, by full name."""
        name, blocks = find_blocks(root)
        self.prefix = f"{prefix}.{name}" if prefix else name
        return {f"{self.prefix}.{i}": block for i, block in enumerate(blocks)}

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        handles = []
        for name, block in modules.items():
            self.meters[name] = meter = InfluenceMeter()

            def measure(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
                        meter: InfluenceMeter = meter) -> None:
                x_in = args[0] if args else kwargs["hidden_states"]
                x_out = output[0] if isinstance(output, tuple | list) else output
                meter.add(x_in, x_out)

            handles.append(block.register_forward_hook(measure, with_kwargs=True))
        with hooks(handles):
            yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        """Choose the blocks to remove; `restructure` removes them."""
        names = list(modules)
        influence = [self.meters[name].influence() for name in names]
        self.removed = least_influential(influence, self.config.blocks_removed(len(names)))
        per_module = {
            name: {"influence": value, "removed": float(index in self.removed)}
            for index, (name, value) in enumerate(zip(names, influence, strict=True))
        }
        return StepReport(kind=self.config.kind, per_module=per_module)

    def restructure(self, model: nn.Module) -> None:
        _, blocks = find_blocks(model)
        kept = [block for index, block in enumerate(blocks) if index not in self.removed]
        parent_name, _, attribute = self.prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, nn.ModuleList(kept))
        for new_index, block in enumerate(kept):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index  # the KV cache is indexed by it
        config: Any = model.config  # a PretrainedConfig
        old = config.num_hidden_layers
        for field in PER_LAYER_CONFIG_LISTS:
            values = getattr(config, field, None)
            if isinstance(values, list) and len(values) == old:
                setattr(config, field, [v for i, v in enumerate(values) if i not in self.removed])
        config.num_hidden_layers = len(kept)
        log.info("depth: removed blocks %s; %d remain", self.removed, len(kept))

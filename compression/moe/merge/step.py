"""`moe_merge`: merge each MoE layer's experts down to fewer (MC-SMoE style).

Experts are grouped around the most frequently routed (dominant) ones by router-
logit similarity and merged by routing-frequency-weighted averaging. The router
keeps the rows of the dominant experts, so tokens that went to a merged-away expert
go to the group that resembles it; `num_experts` (`num_local_experts` on Mixtral)
drops to the kept count and the saved model is an ordinary, smaller Hugging Face
MoE. Works on MoE blocks with a `gate` router (weight (experts, hidden)) and an
`experts` module of stacked 3-D weights (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

```yaml
- kind: moe_merge
  keep_fraction: 0.5   # experts kept per MoE layer, as a fraction
- kind: moe_merge
  experts: 4           # or: exactly this many experts per MoE layer
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
from squeezeflow.compression.moe.merge.config import MoEMergeConfig
from squeezeflow.compression.moe.merge.math import RoutingStats, group_experts, merge_weights
from squeezeflow.compression.step import Step, StepReport, hooks, real_tokens

log = logging.getLogger(__name__)


def _is_moe_block(module: nn.Module) -> bool:
    router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    weight = getattr(router, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not isinstance(experts, nn.Module):
        return False
    return any(p.dim() == 3 and p.shape[0] == weight.shape[0] for p in experts.parameters(recurse=False))


@register_step(MoEMergeConfig)
class MoEMergeStep(Step[MoEMergeConfig]):
    def __init__(self, config: MoEMergeConfig) -> None:
        super().__init__(config)
        self.stats: dict[str, RoutingStats] = {}
        self.groups: dict[str, list[list[int]]] = {}
        self.frequency: dict[str, Tensor] = {}

    def select(self, root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        """The MoE blocks (router `gate` + stacked `experts`), by full name."""
        selected = {}
        for name, module in root.named_modules():
            full = f"{prefix}.{name}" if prefix and name else (prefix or name)
            if _is_moe_block(module):
                selected[full] = module
        return selected

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        handles = []
        for name, block in modules.items():
            router: Any = block.gate
            self.stats[name] = stats = RoutingStats(router.weight.shape[0])
            top_k = int(getattr(router, "top_k", getattr(block, "top_k", 1)))

            def record(_: nn.Module, args: tuple[Any, ...], output: Any,
                       stats: RoutingStats = stats, top_k: int = top_k) -> None:
                logits = output[0] if isinstance(output, tuple | list) else output
                stats.add(real_tokens(logits, flattened=True), top_k)  # padding left out

            handles.append(router.register_forward_hook(record))
        with hooks(handles):
            yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        """Group the experts of every block; `restructure` merges them."""
        per_module = {}
        for name in modules:
            stats = self.stats.pop(name)
            frequency = stats.frequency()  # (E,)
            groups = group_experts(frequency, stats.similarity(), self.config.kept(frequency.numel()))
            self.groups[name], self.frequency[name] = groups, frequency
            per_module[name] = {
                "experts": float(len(groups)),
                "merged_routing_share": float(sum(frequency[m[1:]].sum() for m in groups)),
            }
        return StepReport(kind=self.config.kind, per_module=per_module)

    def restructure(self, model: nn.Module) -> None:
        kept = 0
        for name, groups in self.groups.items():
            block = model.get_submodule(name)
            router: Any = block.gate
            experts: Any = block.experts
            total = router.weight.shape[0]
            frequency = self.frequency[name]
            leaders = torch.tensor([members[0] for members in groups])
            with torch.no_grad():
                for attribute, param in list(experts.named_parameters(recurse=False)):
                    if param.dim() >= 1 and param.shape[0] == total:
                        merged = merge_weights(param.detach(), groups, frequency)
                        setattr(experts, attribute, nn.Parameter(merged, requires_grad=param.requires_grad))
                for attribute, param in list(router.named_parameters(recurse=False)):
                    if param.shape[0] == total:
                        setattr(router, attribute, nn.Parameter(param.detach()[leaders].clone()))
            for module in (router, experts, block):
                if hasattr(module, "num_experts"):
                    module.num_experts = len(groups)
            kept = len(groups)
        if kept:
            config: Any = model.config
            config.num_experts = kept
        log.info("moe_merge: %d MoE layers now have %d experts", len(self.groups), kept)

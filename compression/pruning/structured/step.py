"""`structured`: remove whole attention heads and MLP channels, shrinking the matrices.

Every layer loses the same number of heads and channels (the least important by
calibration output energy, chosen per layer), so the saved model is an ordinary
Hugging Face model with smaller `num_attention_heads` / `num_key_value_heads` /
`intermediate_size` that `transformers` loads without squeezeflow. Under grouped-
query attention whole groups go (a key/value head with its query heads), so
`remove_heads` must be a multiple of the group size. Heads need a config that
stores `head_dim` (Llama, Mistral, Qwen2/3); MLP channels also work on BERT.

```yaml
- kind: structured
  remove_heads: 1        # attention heads removed from every layer
  remove_channels: 0.25  # fraction of MLP intermediate channels removed from every layer
```
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.pruning.observers import InputSquares, observe_inputs
from squeezeflow.compression.pruning.structured.config import StructuredConfig
from squeezeflow.compression.pruning.structured.math import (
    channel_importance,
    head_importance,
    keep_lowest_removed,
    slice_linear,
    unit_indices,
)
from squeezeflow.compression.step import Step, StepReport, hooks, real_tokens

log = logging.getLogger(__name__)


@dataclass
class Attention:
    """A Llama-style attention module: q/k/v project in, o projects out."""

    module: nn.Module
    q: str
    k: str
    v: str
    o: str


@dataclass
class MLP:
    """Linears feeding the intermediate channels (`inputs`) and the one reading them."""

    inputs: list[tuple[nn.Module, str]]  # (parent module, attribute) of each in-projection
    output: tuple[nn.Module, str]
    observed: str  # full name of the output Linear, whose input holds the channels


def _linear(parent: nn.Module, attribute: str) -> nn.Linear:
    module = getattr(parent, attribute)
    assert isinstance(module, nn.Linear)
    return module


class HeadGrams:
    """Per-head blocks of E[x x^T] of o_proj's input: (heads, d, d), float64 sums."""

    def __init__(self, heads: int, head_dim: int) -> None:
        self.gram = torch.zeros(heads, head_dim, head_dim, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        heads, d, _ = self.gram.shape
        X = real_tokens(x.detach()).reshape(-1, heads, d).to(torch.float64)  # (tokens, heads, d)
        self.gram += torch.einsum("thi,thj->hij", X, X)
        self.tokens += X.shape[0]


@register_step(StructuredConfig)
class StructuredStep(Step[StructuredConfig]):
    def __init__(self, config: StructuredConfig) -> None:
        super().__init__(config)
        self.attention: dict[str, Attention] = {}
        self.mlps: dict[str, MLP] = {}
        self.head_grams: dict[str, HeadGrams] = {}
        self.channel_squares: dict[str, InputSquares] = {}
        self.kept_heads: dict[str, Tensor] = {}
        self.kept_channels: dict[str, Tensor] = {}
        self.config_source: Any = None

    def select(self, root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        """The Linears whose inputs rank heads (o_proj) and channels (down_proj, BERT output)."""
        self.config_source = getattr(root, "config", self.config_source)
        observed: dict[str, nn.Module] = {}
        for name, module in root.named_modules():
            full = f"{prefix}.{name}" if prefix and name else (prefix or name)
            if self.config.remove_heads and all(
                isinstance(getattr(module, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")
            ):
                self.attention[full] = Attention(module, "q_proj", "k_proj", "v_proj", "o_proj")
                observed[f"{full}.o_proj"] = module.o_proj
            if not self.config.remove_channels:
                continue
            if all(isinstance(getattr(module, a, None), nn.Linear) for a in ("up_proj", "down_proj")):
                inputs = [(module, "up_proj")]
                if isinstance(getattr(module, "gate_proj", None), nn.Linear):
                    inputs.append((module, "gate_proj"))
                self.mlps[full] = MLP(inputs, (module, "down_proj"), f"{full}.down_proj")
                observed[f"{full}.down_proj"] = module.down_proj
            intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
            if isinstance(getattr(intermediate, "dense", None), nn.Linear) and isinstance(
                getattr(output, "dense", None), nn.Linear
            ):  # BERT-style layer: intermediate.dense -> output.dense
                assert intermediate is not None and output is not None
                self.mlps[full] = MLP([(intermediate, "dense")], (output, "dense"), f"{full}.output.dense")
                observed[f"{full}.output.dense"] = output.dense
        return observed

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        head_dim = getattr(self.config_source, "head_dim", None)
        if self.attention and not isinstance(head_dim, int):
            raise ValueError("remove_heads: the model's config has no head_dim")
        handles = []
        for name in self.attention:
            o_proj = modules[f"{name}.o_proj"]
            assert isinstance(o_proj, nn.Linear) and isinstance(head_dim, int)
            heads = o_proj.in_features // head_dim
            self.head_grams[name] = grams = HeadGrams(heads, head_dim)
            handles.append(o_proj.register_forward_pre_hook(lambda _m, args, g=grams: g.add(args[0])))
        with hooks(handles), observe_inputs(
            {m.observed: modules[m.observed] for m in self.mlps.values()}, self.channel_squares, InputSquares
        ):
            yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        """Rank heads and channels per layer and zero the ones that go (`restructure` removes them)."""
        per_module: dict[str, dict[str, float]] = {}
        for name, attention in self.attention.items():
            grams = self.head_grams.pop(name)
            C = (grams.gram / max(grams.tokens, 1)).to(torch.float32)  # (heads, d, d)
            o_proj = _linear(attention.module, attention.o)
            heads, d = C.shape[0], C.shape[1]
            kv_heads = _linear(attention.module, attention.k).out_features // d
            group = heads // kv_heads
            importance = head_importance(o_proj.weight.detach().float(), C)  # (heads,)
            group_importance = importance.reshape(kv_heads, group).sum(dim=1)  # (kv_heads,)
            kept_groups = keep_lowest_removed(group_importance, self.config.remove_heads // group)
            kept = unit_indices(kept_groups, group)  # query heads of the kept groups
            self.kept_heads[name] = kept_groups
            dropped = torch.ones(heads, dtype=torch.bool)
            dropped[kept] = False
            with torch.no_grad():
                columns = unit_indices(torch.nonzero(dropped).flatten(), d)
                o_proj.weight[:, columns] = 0
            per_module[f"{name}.o_proj"] = {
                "heads": float(len(kept)),
                "removed_importance": float(importance[dropped].sum() / importance.sum().clamp(min=1e-12)),
            }
        for name, mlp in self.mlps.items():
            output = _linear(*mlp.output)
            squares = self.channel_squares.pop(mlp.observed)
            mean_sq = (squares.sum_sq / max(squares.tokens, 1)).to(torch.float32)
            importance = channel_importance(output.weight.detach().float(), mean_sq)
            remove = self.config.channels_removed(output.in_features)
            kept = keep_lowest_removed(importance, remove)
            self.kept_channels[name] = kept
            dropped = torch.ones(output.in_features, dtype=torch.bool)
            dropped[kept] = False
            with torch.no_grad():
                output.weight[:, dropped] = 0
            per_module[mlp.observed] = {
                "channels": float(len(kept)),
                "removed_importance": float(importance[dropped].sum() / importance.sum().clamp(min=1e-12)),
            }
        return StepReport(kind=self.config.kind, per_module=per_module)

    def restructure(self, model: nn.Module) -> None:
        config: Any = model.config  # a PretrainedConfig; nn.Module's typing says Tensor | Module
        for name, kept_groups in self.kept_heads.items():
            attention = self.attention[name]
            d = config.head_dim
            q = _linear(attention.module, attention.q)
            group = q.out_features // _linear(attention.module, attention.k).out_features
            kv_rows = unit_indices(kept_groups, d)
            q_rows = unit_indices(unit_indices(kept_groups, group), d)
            setattr(attention.module, attention.q, slice_linear(q, rows=q_rows))
            for attribute in (attention.k, attention.v):
                setattr(attention.module, attribute,
                        slice_linear(_linear(attention.module, attribute), rows=kv_rows))
            o_proj = _linear(attention.module, attention.o)
            setattr(attention.module, attention.o, slice_linear(o_proj, columns=q_rows))
        if self.kept_heads:
            kv_kept = len(next(iter(self.kept_heads.values())))
            group = config.num_attention_heads // (config.num_key_value_heads or config.num_attention_heads)
            config.num_key_value_heads = kv_kept
            config.num_attention_heads = kv_kept * group
        for name, channels in self.kept_channels.items():
            mlp = self.mlps[name]
            for parent, attribute in mlp.inputs:
                setattr(parent, attribute, slice_linear(_linear(parent, attribute), rows=channels))
            parent, attribute = mlp.output
            setattr(parent, attribute, slice_linear(_linear(parent, attribute), columns=channels))
            if hasattr(parent, "intermediate_size"):
                setattr(parent, "intermediate_size", len(channels))  # noqa: B010 (LlamaMLP keeps a copy)
        if self.kept_channels:
            config.intermediate_size = len(next(iter(self.kept_channels.values())))
        log.info(
            "structured: %s heads, %s MLP channels per layer",
            config.num_attention_heads if self.kept_heads else "all",
            config.intermediate_size if self.kept_channels else "all",
        )

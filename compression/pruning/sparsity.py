"""What unstructured and N:M pruning steps share: the sparsity options and the masks.

A step prunes either a fraction of each Linear's weights (`sparsity`) or with an
N:M pattern (`pattern: "2:4"`: at most N non-zero weights in every M consecutive
input columns of a row, the layout sparse tensor cores accelerate). Masks are
boolean keep-masks of the weight's shape (True = kept).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from squeezeflow.compression.config import StepConfig

PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): N weights kept in every M."""
    match = PATTERN.match(pattern)
    if match is None:
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} must keep 0 < N < M weights")
    return n, m


class SparsityConfig(StepConfig):
    """Options of every weight-pruning step; subclasses add `kind` and their own knobs."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0)  # 0.5 is where dense kernels stop paying off
    pattern: str | None = None  # "N:M" (e.g. "2:4", "4:8"); replaces `sparsity` by 1 - N/M

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            parse_pattern(pattern)
        return pattern

    @model_validator(mode="after")
    def _one_target(self) -> SparsityConfig:
        if self.pattern is not None and "sparsity" in self.model_fields_set:
            raise ValueError("give either sparsity or pattern, not both (pattern sets 1 - N/M)")
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        return None if self.pattern is None else parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        if self.pattern is None:
            return self.sparsity
        n, m = parse_pattern(self.pattern)
        return 1.0 - n / m

    def check_model(self, config: Any) -> Any:
        """N:M needs every pruned input width to be a multiple of M."""
        if self.pattern is not None:
            _, m = parse_pattern(self.pattern)
            for field, width in input_widths(config).items():
                if width % m:
                    raise ValueError(
                        f"pattern: {self.pattern} needs input widths divisible by {m}; "
                        f"the model's {field} is {width}"
                    )
        return config


def input_widths(config: Any) -> dict[str, int]:
    """Input widths of a transformer's Linear layers, named by the config field they come from."""
    widths: dict[str, int] = {}
    for field in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            widths[field] = value
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        widths["num_attention_heads * head_dim"] = heads * head_dim
    return widths


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the N highest scores in every M consecutive columns of each row.

    scores: (rows, cols) with cols % m == 0 -> bool keep-mask (rows, cols).
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"an {n}:{m} pattern needs a width divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune round(sparsity * cols) lowest scores in each row (Wanda's per-output groups)."""
    rows, cols = scores.shape
    n_prune = int(round(sparsity * cols))
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if n_prune > 0:
        order = torch.argsort(scores, dim=1, stable=True)  # (rows, cols) ascending
        keep.scatter_(1, order[:, :n_prune], False)
    return keep


def is_valid_nm(W: Tensor, n: int, m: int) -> bool:
    """True when every M consecutive weights of each row hold at most N non-zeros."""
    rows, cols = W.shape
    nonzero = (W != 0).reshape(rows, cols // m, m).sum(dim=2)  # (rows, groups)
    return bool((nonzero <= n).all())

"""The options every weight-pruning step shares (`sparsity` or an N:M `pattern`), without torch.

The masks these options describe are in `sparsity.py`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

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

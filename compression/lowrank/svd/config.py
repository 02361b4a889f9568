"""The `lowrank` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import Needs, StepConfig
from squeezeflow.compression.pruning.config import input_widths

if TYPE_CHECKING:
    from torch import Tensor


class LowRankConfig(StepConfig):
    kind: Literal["lowrank"] = "lowrank"
    needs: ClassVar[Needs] = Needs.CALIBRATION
    changes_structure: ClassVar[bool] = True
    energy: float | None = Field(None, gt=0.0, le=1.0)  # default 0.9 when no rule is given
    param_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    rank: int | None = Field(None, ge=1)
    whiten: bool = True  # output-aware truncation; much lower error at the same rank
    damp: float = Field(0.01, gt=0.0)  # keeps E[x x^T] positive definite for the Cholesky

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankConfig:
        given = [f for f in ("energy", "param_ratio", "rank") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of energy, param_ratio or rank, not {' and '.join(given)}")
        return self

    def check_model(self, config: Any) -> Any:
        if self.rank is not None:
            dims = input_widths(config)
            kv_heads, head_dim = getattr(config, "num_key_value_heads", None), getattr(config, "head_dim", None)
            if isinstance(kv_heads, int) and isinstance(head_dim, int):
                dims["num_key_value_heads * head_dim"] = kv_heads * head_dim
            field, smallest = min(dims.items(), key=lambda item: item[1])
            if self.rank >= smallest:
                raise ValueError(
                    f"rank: {self.rank} is not below the smallest Linear dimension of the model, "
                    f"{smallest} ({field}); a factorization that large saves nothing"
                )
        return config

    def rank_of(self, S: Tensor, out_features: int, in_features: int) -> int:
        from squeezeflow.compression.lowrank.svd.math import (  # torch
            rank_for_budget,
            rank_for_energy,
        )

        if self.rank is not None:
            return self.rank
        if self.param_ratio is not None:
            return rank_for_budget(out_features, in_features, self.param_ratio)
        return rank_for_energy(S, 0.9 if self.energy is None else self.energy)

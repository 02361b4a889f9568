"""The `moe_merge` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import Needs, StepConfig


class MoEMergeConfig(StepConfig):
    kind: Literal["moe_merge"] = "moe_merge"
    needs: ClassVar[Needs] = Needs.CALIBRATION
    changes_structure: ClassVar[bool] = True
    experts: int | None = Field(None, ge=1)  # experts kept per layer; replaces keep_fraction
    keep_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # MC-SMoE keeps 1/4-1/2 with little loss

    @model_validator(mode="after")
    def _one_amount(self) -> MoEMergeConfig:
        if self.experts is not None and "keep_fraction" in self.model_fields_set:
            raise ValueError("give either experts or keep_fraction, not both")
        return self

    def kept(self, experts: int) -> int:
        return self.experts if self.experts is not None else max(1, int(round(self.keep_fraction * experts)))

    def check_model(self, config: Any) -> Any:
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        field = "experts" if self.experts is not None else "keep_fraction"
        if not isinstance(experts, int):
            raise ValueError(f"{field}: model type {config.model_type!r} has no experts (num_experts)")
        top_k = getattr(config, "num_experts_per_tok", 1)
        kept = self.kept(experts)
        if kept >= experts:
            raise ValueError(f"{field}: keeps {kept} experts but the model has {experts} (num_experts)")
        if kept < top_k:
            raise ValueError(
                f"{field}: keeps {kept} experts, fewer than the {top_k} each token is routed to "
                "(num_experts_per_tok)"
            )
        after = copy.deepcopy(config)
        after.num_experts = kept  # Mixtral maps num_experts onto num_local_experts
        return after

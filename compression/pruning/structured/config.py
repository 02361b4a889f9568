"""The `structured` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import Needs, StepConfig


class StructuredConfig(StepConfig):
    kind: Literal["structured"] = "structured"
    needs: ClassVar[Needs] = Needs.CALIBRATION
    changes_structure: ClassVar[bool] = True
    remove_heads: int = Field(0, ge=0)  # heads removed per layer; 0 keeps attention whole
    remove_channels: float = Field(0.25, ge=0.0, lt=1.0)  # a quarter of the MLP is cheap to lose

    @model_validator(mode="after")
    def _removes_something(self) -> StructuredConfig:
        if self.remove_heads == 0 and self.remove_channels == 0:
            raise ValueError("remove_heads and remove_channels are both 0: nothing to remove")
        return self

    def channels_removed(self, intermediate_size: int) -> int:
        return int(round(self.remove_channels * intermediate_size))

    def check_model(self, config: Any) -> Any:
        after = copy.deepcopy(config)
        if self.remove_heads:
            heads = getattr(config, "num_attention_heads", None)
            head_dim = getattr(config, "head_dim", None)
            if not isinstance(heads, int) or not isinstance(head_dim, int):
                raise ValueError(
                    f"remove_heads: model type {config.model_type!r} has no head_dim in its config, "
                    "so fewer heads cannot be saved consistently; head pruning supports "
                    "Llama-style attention (llama, mistral, qwen2, qwen3)"
                )
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            group = heads // kv_heads
            if self.remove_heads >= heads:
                raise ValueError(
                    f"remove_heads: {self.remove_heads} heads removed but the model has "
                    f"{heads} per layer (num_attention_heads); at least one must remain"
                )
            if self.remove_heads % group:
                raise ValueError(
                    f"remove_heads: {self.remove_heads} is not a multiple of the {group} query "
                    f"heads sharing each key/value head (num_attention_heads / num_key_value_heads)"
                )
            after.num_attention_heads = heads - self.remove_heads
            after.num_key_value_heads = kv_heads - self.remove_heads // group
            _validate(after, "remove_heads")
        if self.remove_channels:
            width = getattr(config, "intermediate_size", None)
            if not isinstance(width, int):
                raise ValueError(
                    f"remove_channels: model type {config.model_type!r} has no intermediate_size"
                )
            if self.channels_removed(width) >= width:
                raise ValueError(
                    f"remove_channels: {self.remove_channels} removes every one of the "
                    f"{width} MLP channels (intermediate_size)"
                )
            after.intermediate_size = width - self.channels_removed(width)
            _validate(after, "remove_channels")
        return after


def _validate(config: Any, field: str) -> None:
    """Run transformers' own checks of the pruned config (e.g. Llama: hidden % heads == 0)."""
    from huggingface_hub.errors import StrictDataclassError

    validate = getattr(config, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except (StrictDataclassError, ValueError) as error:
        cause = error.__cause__ or error
        raise ValueError(f"{field}: transformers rejects the pruned config: {cause}") from None

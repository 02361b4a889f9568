"""The `bitstack` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import Needs, StepConfig

Importance = Literal["perplexity", "fisher", "output_error"]


class BitStackConfig(StepConfig):
    kind: Literal["bitstack"] = "bitstack"
    needs: ClassVar[Needs] = Needs.CALIBRATION
    # the paper's 16 blocks: ~16-18 bits per weight in full; 64 blocks would outweigh fp32
    niter: int = Field(16, ge=1, le=64)
    rank: int | None = Field(None, ge=1)  # k of every block; None: from factor_bits per shape
    # fp16 factor bits per weight per block when rank is None: k = 16 on 4096 x 4096 (paper);
    # at 16 the factors alone would cost what an fp16 copy of the weight does
    factor_bits: float = Field(0.125, gt=0.0, le=16.0)
    activation_aware: bool = True  # decompose W diag(s), s = input RMS per channel (paper 2.1)
    # the paper's score: the best ranking at 4 bits per weight and below on the sensitive
    # benchmark model, at 4-6x the proxies' cost (benchmarks/README.md, BitStack)
    importance: Importance = "perplexity"
    # calibration sequences kept for perplexity / fisher (the paper: 32 of 2048 tokens)
    importance_samples: int = Field(32, ge=1)

    @property
    def needs_whole_model(self) -> bool:
        return self.importance != "output_error"  # perplexity, fisher: model-wide passes

    @model_validator(mode="after")
    def _rank_or_factor_bits(self) -> BitStackConfig:
        if self.rank is not None and "factor_bits" in self.model_fields_set:
            raise ValueError("give rank (the same k for every Linear) or factor_bits (k per shape), not both")
        return self

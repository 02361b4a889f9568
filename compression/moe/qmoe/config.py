"""The `qmoe` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from squeezeflow.compression.config import Needs, Precision, StepConfig


class QMoEConfig(StepConfig):
    kind: Literal["qmoe"] = "qmoe"
    needs: ClassVar[Needs] = Needs.LAYERWISE
    # The paper compresses the experts, which hold ~all of an MoE's parameters; attention,
    # routers and dense layers stay as they are.
    targets: tuple[str, ...] = ("*experts*",)
    damp: float = Field(0.1, gt=0.0, lt=1.0)  # QMoE's `--percdamp .1`: ternary needs 10x GPTQ's 1%
    block_size: int = Field(128, ge=1)  # lazy-update block: 128 columns as in GPTQ
    act_order: bool = False  # QMoE's runs leave it off
    # bf16: calibration forwards and Hessians use bf16 matmuls (fp32 accumulation) on
    # CPUs with native bf16; the GPTQ solve itself always runs in fp32
    calibration_precision: Precision = "bf16"

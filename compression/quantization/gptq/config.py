"""The `gptq` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import DEFAULT_IGNORE, Needs, Precision, StepConfig
from squeezeflow.compression.quantization.fields import Bits, GroupSize

Backend = Literal["squeezeflow", "gptqmodel"]


class GPTQConfig(StepConfig):
    kind: Literal["gptq"] = "gptq"
    needs: ClassVar[Needs] = Needs.LAYERWISE
    bits: Bits = 4  # 4-bit g128 is the usual GPTQ point: ~4.25 bits/weight, small ppl loss
    group_size: GroupSize = 128  # None = one grid per output row; a non-divisor gives a short last group
    symmetric: bool = True  # symmetric grids are what fast int kernels expect
    act_order: bool = False  # columns by decreasing diag(H); helps most at 3 bits and below
    static_groups: bool = False  # grids from the unmodified weights, found before any update
    damp: float = Field(0.01, gt=0.0, lt=1.0)  # the paper's 1% of mean diag(H)
    block_size: int = Field(128, ge=1)  # lazy-update block: 128 columns as in the paper
    backend: Backend = "squeezeflow"  # "gptqmodel": GPTQModel quantizes the whole model
    # bf16: calibration forwards and Hessians use bf16 matmuls (fp32 accumulation) on
    # CPUs with native bf16; the GPTQ solve itself always runs in fp32
    calibration_precision: Precision = "bf16"
    # true: each group of Linears sharing an input (q/k/v, o, gate/up, down) is quantized
    # before the next group's Hessian is taken, on what the quantized groups produce
    # (GPTQModel's true_sequential); one calibration forward per block instead of ~1.8,
    # for all batches' activations alive at once (compression/sequential.py)
    sequential: bool = False

    @model_validator(mode="after")
    def _backend_options(self) -> GPTQConfig:
        if self.backend == "gptqmodel" and (self.targets != ("*",) or self.ignore != DEFAULT_IGNORE):
            raise ValueError(
                "backend 'gptqmodel' quantizes every Linear of every block; "
                "targets and ignore are only supported by backend 'squeezeflow'"
            )
        return self

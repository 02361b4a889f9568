"""Packed weight formats and fast CPU ops; every op has a plain-torch reference.

Imports torch only (no prefect, no mlflow, nothing from `compression`): the
converter from quantized models lives in `compression/packed.py`. Which kernel a
packed layer runs is measured per machine (`kernels/choice.py`).
"""

from squeezeflow.kernels.choice import Kernel, KernelChooser
from squeezeflow.kernels.codebook import CodebookLinear
from squeezeflow.kernels.linear import (
    DequantLinear,
    Int4Linear,
    Int8Linear,
    QuantLinear,
    W8A8Linear,
    kernel_mix,
    kernel_table,
    pack_linear,
)

__all__ = [
    "CodebookLinear", "DequantLinear", "Int4Linear", "Int8Linear", "Kernel", "KernelChooser", "QuantLinear",
    "W8A8Linear", "kernel_mix", "kernel_table", "pack_linear",
]

"""The built-in steps: each one's config class and the module that registers its step.

Config classes are imported here (pydantic only, no torch), step modules when a step
class is first needed (`CATALOG.entry(kind).step_cls`), so a recipe is parsed and
checked without importing torch. Add a new built-in step here (its `config.py` class
and its `step.py` module); a third-party step registers through the
`squeezeflow.steps` entry-point group instead.
"""

from __future__ import annotations

from squeezeflow.compression.config import StepConfig
from squeezeflow.compression.distillation.kd.config import DistillConfig
from squeezeflow.compression.distillation.student.config import StudentConfig
from squeezeflow.compression.lowrank.svd.config import LowRankConfig
from squeezeflow.compression.moe.merge.config import MoEMergeConfig
from squeezeflow.compression.moe.qmoe.config import QMoEConfig
from squeezeflow.compression.pruning.depth.config import DepthConfig
from squeezeflow.compression.pruning.magnitude.config import MagnitudeConfig
from squeezeflow.compression.pruning.sparsegpt.config import SparseGPTConfig
from squeezeflow.compression.pruning.structured.config import StructuredConfig
from squeezeflow.compression.pruning.wanda.config import WandaConfig
from squeezeflow.compression.quantization.bitstack.config import BitStackConfig
from squeezeflow.compression.quantization.finequant.config import FineQuantConfig
from squeezeflow.compression.quantization.float4.config import Float4Config
from squeezeflow.compression.quantization.gptq.config import GPTQConfig
from squeezeflow.compression.quantization.pvtuning.config import PVTuneConfig
from squeezeflow.compression.quantization.rtn.config import RTNConfig
from squeezeflow.compression.quantization.smoothquant.config import SmoothQuantConfig
from squeezeflow.compression.quantization.w8a8.config import W8A8Config
from squeezeflow.compression.sharing.blocks.config import ShareConfig
from squeezeflow.compression.sharing.rps.config import RPSConfig

BUILTIN_STEPS: tuple[tuple[type[StepConfig], str], ...] = (
    (DistillConfig, "squeezeflow.compression.distillation.kd.step"),
    (StudentConfig, "squeezeflow.compression.distillation.student.step"),
    (LowRankConfig, "squeezeflow.compression.lowrank.svd.step"),
    (MoEMergeConfig, "squeezeflow.compression.moe.merge.step"),
    (QMoEConfig, "squeezeflow.compression.moe.qmoe.step"),
    (DepthConfig, "squeezeflow.compression.pruning.depth.step"),
    (MagnitudeConfig, "squeezeflow.compression.pruning.magnitude.step"),
    (SparseGPTConfig, "squeezeflow.compression.pruning.sparsegpt.step"),
    (StructuredConfig, "squeezeflow.compression.pruning.structured.step"),
    (WandaConfig, "squeezeflow.compression.pruning.wanda.step"),
    (BitStackConfig, "squeezeflow.compression.quantization.bitstack.step"),
    (FineQuantConfig, "squeezeflow.compression.quantization.finequant.step"),
    (Float4Config, "squeezeflow.compression.quantization.float4.step"),
    (GPTQConfig, "squeezeflow.compression.quantization.gptq.step"),
    (PVTuneConfig, "squeezeflow.compression.quantization.pvtuning.step"),
    (RTNConfig, "squeezeflow.compression.quantization.rtn.step"),
    (SmoothQuantConfig, "squeezeflow.compression.quantization.smoothquant.step"),
    (W8A8Config, "squeezeflow.compression.quantization.w8a8.step"),
    (ShareConfig, "squeezeflow.compression.sharing.blocks.step"),
    (RPSConfig, "squeezeflow.compression.sharing.rps.step"),
)

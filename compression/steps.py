"""Explicit imports of the built-in steps: importing a module registers its step.

Add a new built-in step here; a third-party step registers through the
`squeezeflow.steps` entry-point group instead.
"""

from squeezeflow.compression.distillation.kd import step as distill  # noqa: F401
from squeezeflow.compression.distillation.student import step as student  # noqa: F401
from squeezeflow.compression.lowrank.svd import step as lowrank  # noqa: F401
from squeezeflow.compression.moe.merge import step as moe_merge  # noqa: F401
from squeezeflow.compression.moe.qmoe import step as qmoe  # noqa: F401
from squeezeflow.compression.pruning.depth import step as depth  # noqa: F401
from squeezeflow.compression.pruning.magnitude import step as magnitude  # noqa: F401
from squeezeflow.compression.pruning.sparsegpt import step as sparsegpt  # noqa: F401
from squeezeflow.compression.pruning.structured import step as structured  # noqa: F401
from squeezeflow.compression.pruning.wanda import step as wanda  # noqa: F401
from squeezeflow.compression.quantization.bitstack import step as bitstack  # noqa: F401
from squeezeflow.compression.quantization.finequant import step as finequant  # noqa: F401
from squeezeflow.compression.quantization.float4 import step as float4  # noqa: F401
from squeezeflow.compression.quantization.gptq import step as gptq  # noqa: F401
from squeezeflow.compression.quantization.pvtuning import step as pv_tune  # noqa: F401
from squeezeflow.compression.quantization.rtn import step as rtn  # noqa: F401
from squeezeflow.compression.quantization.smoothquant import step as smoothquant  # noqa: F401
from squeezeflow.compression.quantization.w8a8 import step as w8a8  # noqa: F401
from squeezeflow.compression.sharing.blocks import step as share  # noqa: F401
from squeezeflow.compression.sharing.rps import step as rps  # noqa: F401

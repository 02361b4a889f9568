"""Explicit imports of the built-in steps: importing a module registers its step.

Add a new built-in step here; a third-party step registers through the
`squeezeflow.steps` entry-point group instead.
"""

from squeezeflow.compression.pruning.magnitude import step as magnitude  # noqa: F401
from squeezeflow.compression.quantization.rtn import step as rtn  # noqa: F401

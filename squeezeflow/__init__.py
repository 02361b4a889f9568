"""squeezeflow: declarative model compression workflows.

The library parts (`squeezeflow.compression`, `squeezeflow.kernels`,
`squeezeflow.evaluation`) import neither prefect nor mlflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# torchao (installed with the [gptq] extra) logs a deprecation warning about enum
# registration when torch imports it; it is noise for every squeezeflow user.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

if TYPE_CHECKING:
    from squeezeflow.compression.artifact import Runtime
    from squeezeflow.compression.models import LoadedModel

REGISTRY_SCHEMES = ("models:/", "runs:/")  # MLflow URIs, resolved through the registry


def load_compressed(path: str | Path, runtime: Runtime = "packed") -> LoadedModel:
    """Load a compressed model: a folder written by squeezeflow, a plain HF folder,
    or a registered version (`models:/NAME@alias`, `models:/NAME/VERSION`).

    `runtime="packed"` (the default) runs quantized Linears on packed int kernels;
    `runtime="dense"` gives a regular transformers model with dequantized weights.
    """
    from squeezeflow.compression.artifact import load_compressed as load

    if str(path).startswith(REGISTRY_SCHEMES):
        from squeezeflow.registry.runs import download_model  # imports mlflow

        path = download_model(str(path))
    return load(path, runtime=runtime)


__all__ = ["__version__", "load_compressed"]


def __getattr__(name: str) -> Any:  # pragma: no cover - plain attribute error
    raise AttributeError(f"module 'squeezeflow' has no attribute {name!r}")

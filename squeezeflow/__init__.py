"""squeezeflow: declarative model compression workflows.

The library parts (`squeezeflow.compression`, `squeezeflow.kernels`,
`squeezeflow.evaluation`) import neither prefect nor mlflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from squeezeflow.compression.models import LoadedModel


def load_compressed(path: str) -> LoadedModel:
    """Load a compressed model folder (or a plain HF folder) written by squeezeflow."""
    from squeezeflow.compression.artifact import load_compressed as load

    return load(path)


__all__ = ["__version__", "load_compressed"]


def __getattr__(name: str) -> Any:  # pragma: no cover - plain attribute error
    raise AttributeError(f"module 'squeezeflow' has no attribute {name!r}")

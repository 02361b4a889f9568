"""Size on disk and parameter counts."""

from __future__ import annotations

from pathlib import Path

from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the weight files in a model folder (config and tokenizer excluded)."""
    return sum(
        f.stat().st_size
        for f in Path(model_dir).rglob("*")
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
    )


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Unique parameters, how many are non-zero, and the zero fraction of Linear weights."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    nonzero = sum(int((p != 0).sum()) for p in unique)
    linear_weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    linear_total = sum(w.numel() for w in linear_weights)
    linear_zero = sum(int((w == 0).sum()) for w in linear_weights)
    return {
        "parameters": float(total),
        "nonzero_parameters": float(nonzero),
        "linear_sparsity": linear_zero / linear_total if linear_total else 0.0,
    }

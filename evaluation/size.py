"""Size on disk and parameter counts."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from squeezeflow.kernels import QuantLinear

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
    # packed layers hold weights and biases as buffers: count them as the parameters they are
    packed_layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = [m.dequantized_weight() for m in packed_layers]
    tensors = [*unique, *packed, *(m.bias for m in packed_layers if m.bias is not None)]
    total = sum(t.numel() for t in tensors)
    nonzero = sum(int((t != 0).sum()) for t in tensors)
    linear_weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)] + packed
    linear_total = sum(w.numel() for w in linear_weights)
    linear_zero = sum(int((w == 0).sum()) for w in linear_weights)
    return {
        "parameters": float(total),
        "nonzero_parameters": float(nonzero),
        "linear_sparsity": linear_zero / linear_total if linear_total else 0.0,
    }

"""`FactorizedLinear`: a Linear replaced by two thin ones, x -> out_factor(in_factor(x)).

W (out, in) ~= B A with A (rank, in) = `in_factor.weight` and B (out, rank) =
`out_factor.weight`; the bias stays on `out_factor`. Both factors are ordinary
Linears, so later steps (quantization, pruning) select them like any other. The
artifact records each factorized module and its rank (`factorized` in
squeezeflow.json) and rebuilds them before loading the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FactorizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.in_factor = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.out_factor = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_factor(self.in_factor(x))

    @property
    def weight(self) -> Tensor:
        """The dense product B A (out, in), for code that inspects `.weight` (dtype, device)."""
        return self.out_factor.weight @ self.in_factor.weight

    @property
    def bias(self) -> Tensor | None:
        return self.out_factor.bias


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted `name` under `root`."""
    parent_name, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attribute, module)


def factorize_modules(root: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each Linear named in `ranks` by an (uninitialized) FactorizedLinear of that rank."""
    for name, rank in ranks.items():
        linear = root.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not a Linear to factorize")
        replace_module(root, name, FactorizedLinear(
            linear.in_features, linear.out_features, rank, linear.bias is not None, linear.weight.dtype
        ))

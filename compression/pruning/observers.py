"""Statistics of the inputs Linear layers see during calibration, gathered by hooks.

- `InputSquares`: per input column, the sum of squares over all tokens (Wanda's
  ||X_j||^2, structured pruning's channel energy);
- `InputGram`: the Gram matrix X^T X over all tokens (SparseGPT's Hessian 2 X^T X,
  low-rank whitening).
Both keep float64 sums so that long calibration runs do not lose precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.step import hooks, real_tokens


class InputSquares:
    def __init__(self, columns: int) -> None:
        self.sum_sq = torch.zeros(columns, dtype=torch.float64)  # (in,)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        X = real_tokens(x.detach()).to(torch.float64)  # (tokens, in)
        self.sum_sq += (X * X).sum(dim=0)
        self.tokens += X.shape[0]

    def norms(self) -> Tensor:
        """||X_j||_2 over every calibration token, per input column: (in,)."""
        return self.sum_sq.sqrt().to(torch.float32)


class InputGram:
    def __init__(self, columns: int) -> None:
        self.gram = torch.zeros(columns, columns, dtype=torch.float64)  # (in, in)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        X = real_tokens(x.detach()).to(torch.float64)  # (tokens, in)
        self.gram += X.T @ X
        self.tokens += X.shape[0]

    def mean(self) -> Tensor:
        """E[x x^T] over calibration tokens: (in, in) float32."""
        return (self.gram / max(self.tokens, 1)).to(torch.float32)


@contextmanager
def observe_inputs(
    modules: dict[str, nn.Module], stats: dict[str, Any], factory: type[InputSquares | InputGram]
) -> Iterator[None]:
    """Feed each module's input into `stats[name]` (created on first use) while inside."""
    handles = []
    for name, module in modules.items():
        assert isinstance(module, nn.Linear)
        stats[name] = factory(module.in_features)

        def record(_: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            stats[name].add(args[0])

        handles.append(module.register_forward_pre_hook(record))
    with hooks(handles):
        yield

"""GPTQ: one Linear layer quantized column by column, each rounding error compensated
by updating the columns not yet quantized (GPTQ, Frantar et al. 2022, Alg. 1).

The layer minimizes || W X - Q X ||^2 over calibration inputs X, whose statistics
are the Hessian H = 2 X X^T. Quantizing column q with error e, the optimal update of
the remaining columns is -e / [H^-1]_qq * [H^-1]_q,: (Optimal Brain Quantization).
Three things make it fast and stable (Sec. 4 of the paper):
- one fixed column order for all rows, so H^-1 is shared by every row;
- lazy batch updates: columns are processed in blocks of `block_size`; inside a
  block the updates touch only the block, the rest of W is updated once per block;
- the Cholesky form of H^-1: its upper factor holds exactly the rows of H^-1 that
  the sequential elimination needs, computed once and numerically stable.
Extensions: dampening (lambda = damp * mean diag H), activation order (columns by
decreasing diag H), groups (one grid per `group_size` columns, found when the group
starts) and static groups (grids found on the original W, before any update).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.compression.quantization.qweight import QuantizedWeight, qparams, quantize_codes


@dataclass
class Hessian:
    """Running H = 2/n * sum over calibration tokens of x x^T for one layer input."""

    H: Tensor  # (in, in) float32
    count: int = 0  # tokens seen

    @classmethod
    def zeros(cls, columns: int) -> Hessian:
        return cls(H=torch.zeros(columns, columns, dtype=torch.float32))

    def add_batch(self, X: Tensor) -> None:
        """Fold calibration inputs X: (tokens, in) into H as a running mean (no overflow)."""
        X = X.to(torch.float32)
        self.add_product(X.T @ X, int(X.shape[0]))

    def add_product(self, XtX: Tensor, tokens: int) -> None:
        """Fold a precomputed X^T X: (in, in) of `tokens` rows (layers sharing one input)."""
        total = self.count + tokens
        # H <- H * n/(n+m) + 2/(n+m) X^T X
        self.H.mul_(self.count / total).add_(XtX, alpha=2.0 / total)
        self.count = total


@dataclass(frozen=True)
class GPTQResult:
    quantized: QuantizedWeight
    loss: float  # sum over columns of (w - q)^2 / [H^-1]_qq / 2: GPTQ's own objective


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize W: (out, in) given H: (in, in); returns codes on the shared integer grid.

    `group_size=None` means one grid per output row. A group size that does not divide
    `in` gives a shorter last group. With `act_order` (and no `static_groups`) the groups
    follow the permuted column order, so `g_idx` of the result is not monotone.
    """
    W = W.detach().to(torch.float32, copy=True)  # W: (out, in)
    H = H.detach().to(torch.float32, copy=True)  # H: (in, in)
    rows, columns = W.shape
    size = columns if group_size is None else min(group_size, columns)
    groups = -(-columns // size)

    # Inputs that never fired carry no information: any value works, zero is cheapest.
    dead = torch.diag(H) == 0  # (in,)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale = torch.empty(rows, groups)  # (out, groups)
    zero = torch.empty(rows, groups)  # (out, groups)
    upfront = static_groups or groups == 1  # per-row grids are found before any update too
    if upfront:
        # Grids from the weights as they are now, before any error compensation.
        for g in range(groups):
            scale[:, g], zero[:, g] = qparams(W[:, g * size : (g + 1) * size], bits, symmetric)

    perm = torch.arange(columns)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)  # most active inputs first
        W, H = W[:, perm], H[perm][:, perm]
    # g_idx in processing order: static groups keep each column's original group
    group_of = perm // size if upfront else torch.arange(columns) // size

    lam = damp * torch.mean(torch.diag(H))  # keeps H positive definite on rank-deficient X
    H.diagonal().add_(lam)
    H_inv = _upper_cholesky_of_inverse(H)  # (in, in), upper triangular

    # Blocks never straddle a group, so a group's grid is found on fully updated columns.
    block = block_size if upfront else size * max(1, block_size // size)
    codes = torch.empty(rows, columns, dtype=torch.uint8)  # processing order
    losses = torch.zeros(rows)  # (out,)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        W1 = W[:, i1:i2].clone()  # (out, B) updated inside the block
        Err1 = torch.empty_like(W1)  # (out, B) scaled errors, for the lazy update
        H_inv1 = H_inv[i1:i2, i1:i2]  # (B, B)
        with _single_thread():  # per-column ops are too small to gain from threads
            for i in range(i2 - i1):
                column = i1 + i
                if not upfront and column % size == 0:
                    g = column // size
                    scale[:, g], zero[:, g] = qparams(W1[:, i : i + size], bits, symmetric)
                g = int(group_of[column])
                w = W1[:, i]  # (out,)
                d = H_inv1[i, i]
                code = quantize_codes(w[:, None], scale[:, g : g + 1], zero[:, g : g + 1], bits)
                q = scale[:, g] * (code[:, 0] - zero[:, g])  # (out,)
                codes[:, column] = code[:, 0].to(torch.uint8)
                err = (w - q) / d  # (out,)
                losses += err**2 / 2
                W1[:, i:].addr_(err, H_inv1[i, i:], alpha=-1.0)  # OBS update inside the block
                Err1[:, i] = err
        W[:, i2:].addmm_(Err1, H_inv[i1:i2, i2:], alpha=-1.0)  # lazy update of later columns

    inverse = torch.argsort(perm)  # processing order -> original order
    g_idx = group_of[inverse]  # (in,)
    quantized = QuantizedWeight(
        codes=codes[:, inverse].contiguous(),
        scale=scale,
        zero=zero.to(torch.uint8),
        g_idx=g_idx.to(torch.int64),
        bits=bits,
        group_size=size,
        symmetric=symmetric,
    )
    return GPTQResult(quantized=quantized, loss=float(losses.sum()))


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch ops on one thread; OpenMP fork/join costs more than (out,) vectors gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _upper_cholesky_of_inverse(H: Tensor) -> Tensor:
    """U with U^T U = H^-1 (upper): row q of U holds what eliminating column q needs."""
    L = torch.linalg.cholesky(H)  # H = L L^T
    # cholesky_solve against I, not cholesky_inverse: same result, ~10x faster on CPU
    H_inv = torch.cholesky_solve(torch.eye(H.shape[0], dtype=H.dtype), L)  # (in, in)
    return torch.linalg.cholesky(H_inv, upper=True)


def output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """Relative layer output error on the calibration inputs, from H alone.

    || X W^T - X W_hat^T ||_F / || X W^T ||_F = sqrt(tr(D H D^T) / tr(W H W^T)), D = W - W_hat.
    """
    W = W.to(torch.float32)
    D = W - W_hat.to(torch.float32)  # (out, in)
    error = torch.einsum("oi,ij,oj->", D, H, D)
    reference = torch.einsum("oi,ij,oj->", W, H, W)
    return float(torch.sqrt(error.clamp(min=0) / reference.clamp(min=1e-30)))

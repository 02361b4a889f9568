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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.compression.quantization.qweight import QuantizedWeight, qparams


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
    row_losses: Tensor  # (out,) per row, sum over columns of (w - q)^2 / [H^-1]_qq / 2

    @property
    def loss(self) -> float:
        """GPTQ's own objective for the whole matrix."""
        return float(self.row_losses.sum())


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
    overwrite: bool = False,
) -> GPTQResult:
    """Quantize W: (out, in) given H: (in, in); returns codes on the shared integer grid.

    `group_size=None` means one grid per output row. A group size that does not divide
    `in` gives a shorter last group. With `act_order` (and no `static_groups`) the groups
    follow the permuted column order, so `g_idx` of the result is not monotone.
    `overwrite`: W is the caller's scratch copy (fp32) and may be changed, saving a copy.
    """
    W = W.detach().to(torch.float32, copy=not overwrite)  # W: (out, in)
    H = H.detach().to(torch.float32, copy=True)  # H: (in, in)
    rows, columns = W.shape
    size = columns if group_size is None else min(group_size, columns)
    groups = -(-columns // size)
    drop_dead_inputs(W, H)

    scale = torch.empty(rows, groups)  # (out, groups)
    zero = torch.empty(rows, groups)  # (out, groups)
    upfront = static_groups or groups == 1  # per-row grids are found before any update too
    if upfront:
        # Grids from the weights as they are now, before any error compensation.
        for g in range(groups):
            scale[:, g], zero[:, g] = qparams(W[:, g * size : (g + 1) * size], bits, symmetric)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None  # most active first
    order = torch.arange(columns) if perm is None else perm  # processing position -> column
    # g_idx in processing order: static groups keep each column's original group
    group_of = order // size if upfront else torch.arange(columns) // size
    scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()  # (groups, out)
    groups_of = group_of.tolist()
    maxq = float(2**bits - 1)

    def round_column(column: int, W_ahead: Tensor, code: Tensor, value: Tensor) -> None:
        if not upfront and column % size == 0:  # a group starts: its grid, from updated W
            g = column // size
            scale_t[g], zero_t[g] = qparams(W_ahead[:size].T, bits, symmetric)
        s, z = scale_t[groups_of[column]], zero_t[groups_of[column]]  # (out,)
        torch.div(W_ahead[0], s, out=code).round_().add_(z).clamp_(0.0, maxq)  # the code
        torch.sub(code, z, out=value).mul_(s)  # q, the value on the grid

    # Blocks never straddle a group, so a group's grid is found on fully updated columns.
    block = block_size if upfront else size * max(1, block_size // size)
    sweep = gptq_sweep(W, H, round_column, damp=damp, block_size=block, perm=perm, own_h=True)
    inverse = torch.argsort(order)  # processing order -> original order
    quantized = QuantizedWeight(
        codes=sweep.codes.to(torch.uint8).contiguous(),
        scale=scale_t.T.contiguous(),
        zero=zero_t.T.contiguous().to(torch.uint8),
        g_idx=group_of[inverse].to(torch.int64),
        bits=bits,
        group_size=size,
        symmetric=symmetric,
    )
    return GPTQResult(quantized=quantized, row_losses=sweep.row_losses)


def drop_dead_inputs(W: Tensor, H: Tensor) -> None:
    """In place: inputs that never fired carry no information; any value works, zero is cheapest.

    W: (out, in), H: (in, in). Their diagonal entry becomes 1 so that H stays invertible.
    """
    dead = torch.diag(H) == 0  # (in,)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0


# How a grid rounds one column for `gptq_sweep`: round_column(column, W_ahead, code, value)
# rounds W_ahead[0], column `column` in processing order (already updated for the errors
# of the columns before it), writing its code and q, its value on the grid, into `code`
# and `value` (out,). W_ahead: (columns left in the lazy block, out), W transposed, so a
# grid found on the columns ahead (a group starting) sees them updated.
RoundColumn = Callable[[int, Tensor, Tensor, Tensor], None]


@dataclass(frozen=True)
class Sweep:
    codes: Tensor  # (out, in) float32 codes from `round_column`, original column order
    row_losses: Tensor  # (out,) sum over columns of (w - q)^2 / [H^-1]_qq / 2


def gptq_sweep(
    W: Tensor,
    H: Tensor,
    round_column: RoundColumn,
    damp: float = 0.01,
    block_size: int = 128,
    perm: Tensor | None = None,
    own_h: bool = False,
) -> Sweep:
    """GPTQ's column sweep (Alg. 1) for any grid: `round_column` rounds, the sweep compensates.

    W: (out, in) and H: (in, in), float32, with dead inputs dropped (`drop_dead_inputs`);
    neither is modified (H is with `own_h`). `perm`: (in,) processing order of the columns (act order), None
    for left to right. The integer grids of `gptq_quantize` and QMoE's ternary grid
    (compression/moe/qmoe) both run on this one copy of the second-order machinery.
    """
    rows, columns = W.shape
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    elif not own_h:  # `own_h`: H is the caller's scratch copy, damped and overwritten
        H = H.clone()  # damped below; the caller's H stays as it was
    lam = damp * torch.mean(torch.diag(H))  # keeps H positive definite on rank-deficient X
    H.diagonal().add_(lam)
    H_inv = upper_cholesky_of_inverse(H)  # (in, in), upper triangular; H overwritten

    # Transposed (in, out) so that a column of W is a contiguous row: the per-column
    # steps below run on contiguous vectors, and a block of columns is a view.
    Wt = W.T.contiguous()  # (in, out), updated in place
    codes_t = torch.empty(columns, rows)  # (in, out) processing order, float codes
    # scaled errors (w - q) / d of the current block only: the memory of one (out, in)
    # matrix less than keeping them all (GPTQ of an MLP's stacked gate/up rows: 92 MB at 1B)
    errors_block = torch.empty(min(block_size, columns), rows)
    row_losses = torch.zeros(rows)
    inverse_d = (1.0 / torch.diagonal(H_inv)).tolist()
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, C1, E1 = Wt[i1:i2], codes_t[i1:i2], errors_block[: i2 - i1]  # (B, out) views
        H_inv1 = H_inv[i1:i2, i1:i2]  # (B, B)
        with _single_thread():  # per-column ops are too small to gain from threads
            for i in range(i2 - i1):
                column = i1 + i
                w, e = W1[i], E1[i]  # (out,) views
                round_column(column, W1[i:], C1[i], e)  # e <- q, the value on the grid
                torch.sub(w, e, out=e).mul_(inverse_d[column])  # (w - q) / d
                # OBS update of the block's later columns (the paper's Alg. 1, inner loop)
                W1[i + 1 :].addr_(H_inv1[i, i + 1 :], e, alpha=-1.0)
        Wt[i2:].addmm_(H_inv[i1:i2, i2:].T, E1, alpha=-1.0)  # lazy update of later columns
        row_losses.add_(E1.square().sum(dim=0))
    del Wt, H_inv
    codes = codes_t.T  # (out, in) processing order, a view: callers narrow it to their dtype
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]  # back to the original column order
    return Sweep(codes=codes, row_losses=row_losses / 2)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch ops on one thread; OpenMP fork/join costs more than (out,) vectors gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_SMALL_TRIANGLE = 256  # below this width a triangular inverse is one LAPACK solve


def upper_cholesky_of_inverse(H: Tensor) -> Tensor:
    """U with U^T U = H^-1 (upper): row q of U holds what eliminating column q needs.

    H: (in, in), the caller's scratch copy, overwritten. With J the reversal of the
    columns and J H J = L L^T (Cholesky), U = J L^-1 J: one factorization and one
    triangular inverse, so the whole solve holds H, one more (in, in) matrix and a
    quarter-size temporary (an 8B MLP's down_proj reads 14336 inputs: 0.8 GB per
    matrix). The textbook route (factor, solve against I for H^-1, factor again) held
    four and did 5x the flops.
    """
    columns = H.shape[0]
    reverse = torch.arange(columns - 1, -1, -1)
    other = torch.empty_like(H)
    torch.index_select(H, 0, reverse, out=other)
    torch.index_select(other, 1, reverse, out=H)  # H <- J H J
    # H is symmetric, so its transpose is the same matrix in column-major order, the
    # layout LAPACK factors in place: the upper factor of H^T is L^T, i.e. H <- L.
    torch.linalg.cholesky(H.mT, upper=True, out=H.mT)
    _invert_lower(H, other)  # L^-1
    torch.index_select(other, 0, reverse, out=H)
    torch.index_select(H, 1, reverse, out=other)  # J L^-1 J, upper
    return other


def _invert_lower(L: Tensor, out: Tensor) -> None:
    """out <- L^-1 for L lower triangular (its upper triangle is not read), by halves:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. Two matrix products per
    level (2n^3/3 flops in all) run at GEMM speed; LAPACK's triangular solve against
    the identity did n^3 flops at a fifth of that speed here (AVX2 EPYC, n = 14336)."""
    n = L.shape[0]
    if n <= _SMALL_TRIANGLE:
        identity = torch.eye(n, dtype=L.dtype, device=L.device)
        out.copy_(torch.linalg.solve_triangular(L, identity, upper=False))
        return
    h = n // 2
    _invert_lower(L[:h, :h], out[:h, :h])
    _invert_lower(L[h:, h:], out[h:, h:])
    torch.mm(out[h:, h:], L[h:, :h] @ out[:h, :h], out=out[h:, :h])  # not in place: h^2 temp
    out[h:, :h].neg_()
    out[:h, h:].zero_()


def output_error(W: Tensor, W_hat: Tensor, H: Tensor, max_rows: int | None = None) -> float:
    """Relative layer output error on the calibration inputs, from H alone.

    || X W^T - X W_hat^T ||_F / || X W^T ||_F = sqrt(tr(D H D^T) / tr(W H W^T)), D = W - W_hat.
    It costs 4 rows x in^2 flops (an 8B down_proj: 3.4 TFLOP, more than its GPTQ):
    with `max_rows`, a larger W is measured on that many output rows spread evenly.
    """
    if max_rows is not None and W.shape[0] > max_rows:
        rows = torch.linspace(0, W.shape[0] - 1, max_rows).round().long()
        W, W_hat = W[rows], W_hat[rows]
    W = W.to(torch.float32)
    D = W - W_hat.to(torch.float32)  # (out, in)
    error = ((D @ H) * D).sum()
    reference = ((W @ H) * W).sum()
    return float(torch.sqrt(error.clamp(min=0) / reference.clamp(min=1e-30)))

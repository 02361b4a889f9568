"""SparseGPT: prune (and optionally quantize) a layer, updating the kept weights.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", Alg. 1. Columns are processed left to right in blocks of B;
each removed (or rounded) weight's error is spread over the not-yet-processed
columns with the inverse Hessian (the OBS update), so the layer output
X W^T changes as little as possible. The mask of a block is chosen by the OBS
saliency w^2 / [H^-1]_jj^2 on the already-updated weights of that block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.compression.quantization.gptq.math import upper_cholesky_of_inverse
from squeezeflow.compression.quantization.qweight import (
    QuantizedWeight,
    group_index,
    qparams,
    quantize_codes,
)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int | None  # None: one grid per output row
    symmetric: bool


@dataclass
class SparseGPTResult:
    W: Tensor  # (out, in) pruned (and dequantized) weights
    mask: Tensor  # (out, in) bool, True = kept
    quantized: QuantizedWeight | None


def inverse_hessian_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of H^-1 after dampening: (in, in).

    H: (in, in) = 2 X^T X / tokens. Dead inputs (zero diagonal) get a unit diagonal so
    that H stays invertible; `damp` times the mean diagonal keeps H positive definite.
    """
    H = H.clone().to(torch.float64)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    return upper_cholesky_of_inverse(H).to(torch.float32)


def sparsegpt(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    quant: QuantSpec | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> SparseGPTResult:
    """Prune W: (out, in) given H: (in, in); exactly round(sparsity * W.numel()) zeros
    in unstructured mode (N:M: exactly N kept of every M), before quantization."""
    W = W.detach().to(torch.float32).clone()
    rows, columns = W.shape
    if n_m is not None and columns % n_m[1]:
        raise ValueError(f"an {n_m[0]}:{n_m[1]} pattern needs a width divisible by {n_m[1]}")
    dead = torch.diag(H) == 0
    W[:, dead] = 0  # inputs that never fire carry nothing; their weights are free to drop
    H_inv = inverse_hessian_cholesky(H, damp)  # (in, in), upper

    mask = torch.ones(rows, columns, dtype=torch.bool)
    Q = torch.zeros_like(W)
    group = columns if quant is None or quant.group_size is None else quant.group_size
    g_idx = group_index(columns, group)
    groups = int(g_idx[-1]) + 1
    scale = torch.ones(rows, groups)
    zero = torch.zeros(rows, groups)
    pruned_so_far = 0
    total_to_prune = int(round(sparsity * W.numel()))

    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()  # (out, B)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        H_inv1 = H_inv[i1:i2, i1:i2]  # (B, B)
        d = torch.diag(H_inv1)  # (B,)

        if n_m is None:
            # prune this block so that the running total follows sparsity * columns seen
            target = int(round(sparsity * rows * i2)) if i2 < columns else total_to_prune
            k = target - pruned_so_far
            saliency = W1**2 / d[None, :] ** 2  # (out, B)
            mask1 = torch.ones_like(W1, dtype=torch.bool)
            if k > 0:
                order = torch.argsort(saliency.reshape(-1), stable=True)
                mask1.view(-1)[order[:k]] = False
            pruned_so_far += max(k, 0)
        else:
            mask1 = torch.ones_like(W1, dtype=torch.bool)

        for i in range(i2 - i1):
            column = i1 + i
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                saliency = W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2  # (out, m)
                drop = saliency.topk(m - n, dim=1, largest=False).indices  # (out, m - n)
                mask1[:, i : i + m].scatter_(1, drop, False)
            if quant is not None and column % group == 0:
                # the grid of a group is fitted to its columns as they are now (after updates)
                cols = slice(column, min(column + group, columns))
                pending = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : cols.stop - cols.start]
                s, z = qparams(pending, quant.bits, quant.symmetric)  # (out,), (out,)
                scale[:, g_idx[column]], zero[:, g_idx[column]] = s, z
            w = W1[:, i]  # (out,)
            q = torch.where(mask1[:, i], w, torch.zeros_like(w))
            if quant is not None:
                s, z = scale[:, g_idx[column]], zero[:, g_idx[column]]
                codes = quantize_codes(q[:, None], s, z, quant.bits)[:, 0]
                q = s * (codes - z)  # pruned entries stay exactly 0: 0 lies on every grid
            Q1[:, i] = q
            err = (w - q) / d[i]  # (out,)
            W1[:, i:] -= err[:, None] @ H_inv1[i, i:][None, :]  # OBS update of the rest
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ H_inv[i1:i2, i2:]  # lazy batch update of the later columns

    Q = Q * mask  # guard against -0.0 / rounding noise on pruned entries
    quantized = None
    if quant is not None:
        codes = quantize_codes(Q, scale[:, g_idx], zero[:, g_idx], quant.bits).to(torch.uint8)
        quantized = QuantizedWeight(
            codes=codes, scale=scale, zero=zero.to(torch.uint8), g_idx=g_idx,
            bits=quant.bits, group_size=group, symmetric=quant.symmetric,
        )
        Q = quantized.dequantize()
    return SparseGPTResult(W=Q, mask=mask, quantized=quantized)

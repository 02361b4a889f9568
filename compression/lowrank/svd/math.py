"""Low-rank factorization of a Linear weight by truncated SVD, optionally activation-aware.

Plain (PELA, Guo et al. 2023): W = U S V^T, keep the top r singular triplets:
B = U_r S_r^1/2, A = S_r^1/2 V_r^T, so W ~= B A.

Activation-aware (whitened, as in SVD-LLM, Wang et al. 2024): what matters is the
output error ||(W - W') X^T|| over calibration inputs, not ||W - W'||. With
C = E[x x^T] = L L^T (Cholesky), ||(W - W') X^T||^2 ~ ||(W - W') L||_F^2, so take the
SVD of W L instead and map back: A = S_r^1/2 V_r^T L^-1. Truncating W L is then
optimal for the output error.
"""

from __future__ import annotations

import torch
from torch import Tensor


def whitening_factor(C: Tensor, damp: float) -> Tensor:
    """Lower Cholesky factor L of C + damp * mean(diag C) * I: (in, in)."""
    C = C.to(torch.float64)
    C = C + damp * torch.diag(C).mean().clamp(min=1e-12) * torch.eye(C.shape[0], dtype=C.dtype)
    return torch.linalg.cholesky(C)


def spectrum(W: Tensor, L: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of W (or of W L when whitening): U (out, k), S (k,), Vh (k, in)."""
    M = W.to(torch.float64) if L is None else W.to(torch.float64) @ L
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U, S, Vh


def rank_for_energy(S: Tensor, energy: float) -> int:
    """Smallest r with sum(S[:r]^2) >= energy * sum(S^2)."""
    kept = torch.cumsum(S.pow(2), dim=0) / S.pow(2).sum().clamp(min=1e-300)  # (k,)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1


def rank_for_budget(out_features: int, in_features: int, ratio: float) -> int:
    """Largest r whose factors hold at most `ratio` of the dense weight's parameters."""
    return int(ratio * out_features * in_features // (out_features + in_features))


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    return rank * (out_features + in_features) < out_features * in_features


def factors(U: Tensor, S: Tensor, Vh: Tensor, rank: int, L: Tensor | None) -> tuple[Tensor, Tensor]:
    """A (rank, in) and B (out, rank) with B A ~= W, split sqrt(S) to each side."""
    root = S[:rank].sqrt()  # (rank,)
    B = U[:, :rank] * root[None, :]  # (out, rank)
    A = root[:, None] * Vh[:rank]  # (rank, in)
    if L is not None:
        # A L^-1 = (L^-T A^T)^T: a triangular solve, no explicit inverse
        A = torch.linalg.solve_triangular(L.T, A.T, upper=True).T
    return A.to(torch.float32), B.to(torch.float32)

"""Encoder fidelity: how closely a compressed encoder's embeddings follow its base.

- mean cosine between the two models' embeddings of the same text;
- Spearman correlation between the two models' pairwise-similarity matrices
  (does the compressed model rank pairs the same way?);
- top-k retrieval agreement: mean overlap of each text's k nearest neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mean_cosine(base: Tensor, candidate: Tensor) -> float:
    """base, candidate: (n, dim) embeddings of the same n texts."""
    return float(torch.nn.functional.cosine_similarity(base, candidate, dim=-1).mean())


def _ranks(values: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values, dtype=torch.float64)
    start = 0
    n = values.numel()
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0
        start = end + 1
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors of equal length."""
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).clamp(min=1e-12)
    return float((rx @ ry) / denominator)


def pairwise_upper(embeddings: Tensor) -> Tensor:
    """Cosine similarity of every pair i < j. embeddings: (n, dim) -> (n*(n-1)/2,)."""
    normed = torch.nn.functional.normalize(embeddings, dim=-1)
    similarity = normed @ normed.T  # (n, n)
    rows, cols = torch.triu_indices(len(embeddings), len(embeddings), offset=1)
    return similarity[rows, cols]


def similarity_spearman(base: Tensor, candidate: Tensor) -> float:
    return spearman(pairwise_upper(base), pairwise_upper(candidate))


def topk_agreement(base: Tensor, candidate: Tensor, k: int) -> float:
    """Mean fraction of each text's k nearest neighbours (excluding itself) kept."""
    n = len(base)
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("top-k agreement needs at least two texts")

    def neighbours(embeddings: Tensor) -> Tensor:
        normed = torch.nn.functional.normalize(embeddings, dim=-1)
        similarity = normed @ normed.T  # (n, n)
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=-1).indices  # (n, k)

    base_nn, candidate_nn = neighbours(base), neighbours(candidate)
    overlap = [
        len(set(base_nn[i].tolist()) & set(candidate_nn[i].tolist())) / k for i in range(n)
    ]
    return sum(overlap) / n

"""Encoder quality against human labels (not against the base): similarity and retrieval.

- similarity: Spearman rank correlation between the cosine of each pair's embeddings
  and its gold score (the STS-benchmark protocol, Cer et al. 2017);
- retrieval: recall@k, the fraction of a query's relevant documents among its k
  cosine-nearest documents, averaged over queries; and MRR, the mean of 1 / rank of
  the first relevant document.

Each figure comes with its standard error so that two models are compared with their
noise: for a mean over queries, sample std / sqrt(n); for Spearman's rho,
sqrt((1 - rho^2) / (n - 2)) (the standard error behind its t-test).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from squeezeflow.evaluation.fidelity import spearman


def pair_cosines(first: Tensor, second: Tensor) -> Tensor:
    """first, second: (n, dim) embeddings of the two sides of n pairs -> (n,) cosines."""
    return torch.nn.functional.cosine_similarity(first.float(), second.float(), dim=-1)


def similarity_spearman(first: Tensor, second: Tensor, gold: Tensor) -> tuple[float, float]:
    """(rho, stderr) of Spearman between pair cosines and gold scores (n,)."""
    n = len(gold)
    if n < 3:
        raise ValueError(f"Spearman needs at least 3 labelled pairs, got {n}")
    rho = spearman(pair_cosines(first, second), gold)
    return rho, math.sqrt(max(0.0, 1.0 - rho * rho) / (n - 2))


def _mean_and_stderr(values: Tensor) -> tuple[float, float]:
    n = values.numel()
    stderr = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return float(values.mean()), stderr


def retrieval_scores(
    queries: Tensor, documents: Tensor, relevant: list[set[int]], ks: tuple[int, ...]
) -> dict[str, tuple[float, float]]:
    """{"recall_at_<k>": (mean, stderr), "mrr": (mean, stderr)} over the queries.

    queries: (q, dim); documents: (d, dim); relevant[i]: indices of query i's relevant
    documents (at least one each).
    """
    if any(not r for r in relevant):
        raise ValueError("every query needs at least one relevant document")
    similarity = (
        torch.nn.functional.normalize(queries.float(), dim=-1)
        @ torch.nn.functional.normalize(documents.float(), dim=-1).T
    )  # (q, d)
    ranking = similarity.argsort(dim=-1, descending=True, stable=True)  # (q, d): best first
    scores: dict[str, tuple[float, float]] = {}
    for k in ks:
        top = ranking[:, : min(k, documents.shape[0])]  # (q, k)
        recall = torch.tensor([
            len(relevant[i] & set(top[i].tolist())) / len(relevant[i]) for i in range(len(relevant))
        ], dtype=torch.float64)
        scores[f"recall_at_{k}"] = _mean_and_stderr(recall)
    reciprocal = torch.tensor([
        1.0 / (1 + next(r for r, doc in enumerate(ranking[i].tolist()) if doc in relevant[i]))
        for i in range(len(relevant))
    ], dtype=torch.float64)
    scores["mrr"] = _mean_and_stderr(reciprocal)
    return scores

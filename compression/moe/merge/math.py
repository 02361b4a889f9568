"""Merging mixture-of-experts experts by routing statistics (MC-SMoE, M-SMoE part).

Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from
Its Routing Policy": (1) the experts the router picks most often on calibration
data are dominant; (2) every other expert joins the dominant expert whose router
logits it resembles most (cosine over calibration tokens); (3) each group becomes
one expert, the routing-frequency-weighted average of its members' weights.
Neuron permutation alignment before averaging (also in the paper) is not done here.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RoutingStats:
    """Per expert: how often the router picks it, and the Gram of its logits."""

    def __init__(self, experts: int) -> None:
        self.counts = torch.zeros(experts, dtype=torch.float64)  # (E,)
        self.gram = torch.zeros(experts, experts, dtype=torch.float64)  # (E, E) = Z^T Z

    def add(self, logits: Tensor, top_k: int) -> None:
        Z = logits.detach().reshape(-1, logits.shape[-1]).to(torch.float64)  # (tokens, E)
        picked = Z.topk(top_k, dim=-1).indices  # (tokens, k)
        self.counts += torch.bincount(picked.reshape(-1), minlength=Z.shape[1]).to(torch.float64)
        self.gram += Z.T @ Z

    def frequency(self) -> Tensor:
        return (self.counts / self.counts.sum().clamp(min=1)).to(torch.float32)

    def similarity(self) -> Tensor:
        """Cosine similarity of the experts' router-logit columns: (E, E)."""
        norms = torch.diag(self.gram).sqrt().clamp(min=1e-12)
        return (self.gram / norms[:, None] / norms[None, :]).to(torch.float32)


def group_experts(frequency: Tensor, similarity: Tensor, keep: int) -> list[list[int]]:
    """`keep` groups, each led by a dominant expert (listed first), members ascending after it."""
    order = torch.argsort(frequency, descending=True, stable=True)
    dominant = sorted(int(i) for i in order[:keep])
    groups = {d: [d] for d in dominant}
    for expert in range(frequency.numel()):
        if expert in groups:
            continue
        leader = max(dominant, key=lambda d: (float(similarity[expert, d]), -d))
        groups[leader].append(expert)
    return [groups[d] for d in dominant]


def merge_weights(W: Tensor, groups: list[list[int]], frequency: Tensor) -> Tensor:
    """W: (E, ...) stacked expert weights -> (len(groups), ...) frequency-weighted means.

    An expert never routed to still counts a little (weight floor), so a group of
    unused experts averages evenly instead of dividing by zero.
    """
    merged = []
    for members in groups:
        f = frequency[members].to(W.dtype) + 1e-6  # (members,)
        weights = (f / f.sum()).reshape(-1, *([1] * (W.dim() - 1)))
        merged.append((W[members] * weights).sum(dim=0))
    return torch.stack(merged)

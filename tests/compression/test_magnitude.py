from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezeflow.compression.pruning.magnitude.step import MagnitudeConfig, MagnitudeStep


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_magnitude_reaches_its_sparsity_and_removes_the_smallest(sparsity: float) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(96, 40)
    original = layer.weight.detach().clone()
    report = MagnitudeStep(MagnitudeConfig(sparsity=sparsity)).apply({"layer": layer})
    W = layer.weight.detach()
    zeros = int((W == 0).sum())
    assert zeros == round(sparsity * W.numel())
    assert report.per_module["layer"]["sparsity"] == pytest.approx(zeros / W.numel())
    if 0 < zeros < W.numel():
        kept = original[W != 0].abs()
        removed = original[W == 0].abs()
        assert removed.max() <= kept.min()  # nothing larger was pruned before something smaller
    assert torch.equal(W[W != 0], original[W != 0])  # survivors untouched

"""The measured kernel choice on CUDA: the same mechanism, torch's CUDA ops as candidates.
Skipped without a GPU; runs wherever one is available."""

from __future__ import annotations

import pytest
import torch

from squeezeflow.kernels import pack_linear
from squeezeflow.kernels.reference import linear_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize(("bits", "group_size", "activation_bits"),
                         [(8, 256, None), (4, 128, None), (8, 256, 8)])
def test_packed_layers_choose_a_cuda_kernel_within_contract(
    bits: int, group_size: int, activation_bits: int | None
) -> None:
    out_features, in_features = 256, 256
    groups = in_features // group_size
    codes = torch.randint(1, 2**bits, (out_features, in_features), dtype=torch.uint8)
    scale = (torch.rand(out_features, groups) * 0.01 + 0.001).half().float()
    zero = torch.full((out_features, groups), 2 ** (bits - 1), dtype=torch.uint8)
    g_idx = torch.arange(in_features) // group_size
    layer = pack_linear(codes, scale, zero, g_idx, bits, activation_bits=activation_bits).to("cuda")
    x = torch.randn(64, in_features)
    y = layer(x.to("cuda"))
    assert y.device.type == "cuda"
    decision = layer.decisions[64]
    assert decision.kernel in decision.ms or not decision.ms
    # CPU-only kernels are rejected by the contract, never chosen
    assert not decision.kernel.startswith(("int8pack", "int4pack", "onednn"))
    reference = linear_reference(x, codes, scale, zero, g_idx)
    error = float((y.cpu() - reference).norm() / reference.norm())
    assert error < (0.05 if activation_bits else 0.02)

"""Parity of every packed format with its plain-torch reference, fast ops and fallbacks."""

from __future__ import annotations

import pytest
import torch

from squeezeflow.kernels import pack_linear
from squeezeflow.kernels.reference import linear_reference, w8a8_reference

# bf16 activations, bf16 scales and a bf16 result each round at 2**-9 relative;
# a wrong zero point, scale layout or group mapping errs by O(1) of the output.
BF16_TOLERANCE = 0.02
FP32_TOLERANCE = 1e-5


def _random_weight(
    out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    groups = -(-in_features // group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=generator)
    scale = torch.rand(out_features, groups, generator=generator) * 0.05 + 0.01
    scale = scale.to(torch.float16).to(torch.float32)  # stored scales are fp16-exact
    if symmetric:
        zero = torch.full((out_features, groups), 2 ** (bits - 1))
    else:
        zero = torch.randint(0, 2**bits, (out_features, groups), generator=generator)
    g_idx = torch.arange(in_features) // group_size
    return codes.to(torch.uint8), scale, zero.to(torch.uint8), g_idx


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


@pytest.mark.parametrize(
    ("out_features", "in_features", "symmetric", "expected"),
    [
        (64, 128, True, "int8"),
        (48, 96, False, "int8"),  # asymmetric: zero-point correction term
        (7, 64, True, "int8"),  # any out_features
        (16, 40, True, "dequant"),  # K not a multiple of 16: the aten op returns garbage
        (5, 13, False, "dequant"),  # ... or segfaults
    ],
)
def test_int8_weight_only_matches_reference(
    out_features: int, in_features: int, symmetric: bool, expected: str
) -> None:
    codes, scale, zero, g_idx = _random_weight(out_features, in_features, 8, in_features,
                                               symmetric, seed=out_features)
    bias = torch.randn(out_features)
    layer = pack_linear(codes, scale, zero, g_idx, bits=8, bias=bias)
    assert layer.format == expected
    tolerance = BF16_TOLERANCE if expected == "int8" else FP32_TOLERANCE
    for x in (torch.randn(2, 3, in_features), torch.randn(80, in_features)):  # packed op; bf16 GEMM
        reference = linear_reference(x, codes, scale, zero, g_idx, bias)
        assert _relative_error(layer(x), reference) < tolerance
        assert _relative_error(layer.reference(x), reference) < tolerance


@pytest.mark.parametrize(
    ("out_features", "in_features", "bits", "group_size", "expected"),
    [
        (32, 256, 4, 128, "int4"),
        (48, 512, 4, 64, "int4"),
        (64, 128, 4, 32, "int4"),
        (32, 512, 4, 256, "int4"),
        (32, 1024, 4, 1024, "int4"),  # per channel: scales repeated over groups of 256
        (32, 384, 4, 96, "int4"),  # group 96 = 3 op groups of 32
        (16, 256, 3, 64, "int4"),  # 3-bit codes fit the int4 op
        (16, 128, 2, 32, "int4"),
        (24, 128, 4, 32, "dequant"),  # out_features not a multiple of 16
        (32, 96, 4, 64, "dequant"),  # partial last group
        (32, 160, 4, 40, "dequant"),  # group size the op cannot express
    ],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_reference(
    out_features: int, in_features: int, bits: int, group_size: int, expected: str,
    symmetric: bool,
) -> None:
    codes, scale, zero, g_idx = _random_weight(out_features, in_features, bits, group_size,
                                               symmetric, seed=in_features + bits)
    layer = pack_linear(codes, scale, zero, g_idx, bits=bits)
    assert layer.format == expected
    for tokens in (1, 8, 64):  # the packed op, then the dequantized bf16 GEMM
        x = torch.randn(tokens, in_features)
        reference = linear_reference(x, codes, scale, zero, g_idx)
        tolerance = BF16_TOLERANCE if expected == "int4" else FP32_TOLERANCE
        assert _relative_error(layer(x), reference) < tolerance


def test_int4_with_act_order_columns_matches_reference() -> None:
    codes, scale, zero, _ = _random_weight(32, 256, 4, 64, symmetric=False, seed=3)
    g_idx = (torch.arange(256) // 64)[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    layer = pack_linear(codes, scale, zero, g_idx, bits=4)
    assert layer.format == "int4"
    x = torch.randn(4, 256)
    reference = linear_reference(x, codes, scale, zero, g_idx)
    assert _relative_error(layer(x), reference) < BF16_TOLERANCE
    many = torch.randn(40, 256)
    assert _relative_error(layer(many), linear_reference(many, codes, scale, zero, g_idx)) < BF16_TOLERANCE
    # ignoring the permutation would be wrong by far more than the tolerance
    in_order = linear_reference(x, codes, scale, zero, torch.arange(256) // 64)
    assert _relative_error(in_order, reference) > 10 * BF16_TOLERANCE


@pytest.mark.parametrize(
    ("tokens", "in_features", "out_features", "smoothed", "fuse"),
    [
        (5, 64, 48, False, False),
        (33, 384, 96, True, False),
        (3, 13, 7, True, False),  # odd shapes: torch._int_mm takes any size on CPU
        (33, 384, 96, False, True),
        (17, 96, 40, True, True),
    ],
)
@pytest.mark.parametrize("use_onednn", [True, False])
def test_w8a8_matches_reference(
    tokens: int, in_features: int, out_features: int, smoothed: bool, fuse: bool,
    use_onednn: bool,
) -> None:
    codes, scale, zero, g_idx = _random_weight(out_features, in_features, 8, in_features,
                                               symmetric=True, seed=tokens)
    bias = torch.randn(out_features)
    input_scale = torch.rand(in_features) * 4 + 0.25 if smoothed else None
    layer = pack_linear(codes, scale, zero, g_idx, bits=8, bias=bias, activation_bits=8,
                        input_scale=input_scale, fuse=fuse, use_onednn=use_onednn)
    assert layer.format == "w8a8"
    x = torch.randn(tokens, in_features)
    x[:, 0] *= 30  # an outlier channel, as in transformer activations
    y = layer(x)
    weight = (codes.to(torch.int16) - 128).to(torch.int8)
    exact = w8a8_reference(x, weight, scale[:, 0], bias, input_scale)
    # same integer products; only the fp32 epilogue (or a rounding tie) differs
    assert _relative_error(y, exact) < 1e-4
    # and it is a real approximation of the weight-only product, not something else
    dense = linear_reference(x, codes, scale, zero, g_idx, bias, input_scale)
    assert 0 < _relative_error(y, dense) < 0.05


def test_w8a8_rejects_asymmetric_and_grouped_weights() -> None:
    codes, scale, zero, g_idx = _random_weight(32, 64, 8, 64, symmetric=False, seed=1)
    assert pack_linear(codes, scale, zero, g_idx, bits=8, activation_bits=8).format == "int8"
    codes, scale, zero, g_idx = _random_weight(32, 64, 8, 32, symmetric=True, seed=1)
    assert pack_linear(codes, scale, zero, g_idx, bits=8, activation_bits=8).format == "dequant"

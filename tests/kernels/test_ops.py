"""Parity of every packed format with its plain-torch reference, fast ops and fallbacks."""

from __future__ import annotations

import pytest
import torch

from squeezeflow.kernels import QuantLinear, ops, pack_linear
from squeezeflow.kernels.choice import contract_rejections, probe_inputs, row_bucket
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


def _kernel_names(layer: QuantLinear) -> list[str]:
    return [kernel.name for kernel in layer.all_kernels()]


def _forced(layer: QuantLinear, name: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with kernel `name`, checking that this kernel ran."""
    layer.force_kernel(name)
    y = layer(x)
    assert layer.last_kernel == name
    return y


def _tolerance(kernel: str) -> float:
    return BF16_TOLERANCE if "bf16" in kernel else FP32_TOLERANCE


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
def test_int8_weight_only_every_kernel_matches_reference(
    out_features: int, in_features: int, symmetric: bool, expected: str
) -> None:
    codes, scale, zero, g_idx = _random_weight(out_features, in_features, 8, in_features,
                                               symmetric, seed=out_features)
    bias = torch.randn(out_features)
    layer = pack_linear(codes, scale, zero, g_idx, bits=8, bias=bias)
    assert layer.format == expected
    names = _kernel_names(layer)
    assert names[:2] == ["dequant_fp32", "dequant_bf16"]  # the dense product, always offered
    if expected == "int8":
        assert {"int8pack_fp32", "int8pack_bf16"} <= set(names)
    for name in names:
        for x in (torch.randn(2, 3, in_features), torch.randn(80, in_features)):
            reference = linear_reference(x, codes, scale, zero, g_idx, bias)
            assert _relative_error(_forced(layer, name, x), reference) < _tolerance(name), name
    layer.force_kernel(None)  # the measured choice meets the contract too
    x = torch.randn(5, in_features)
    assert _relative_error(layer(x), linear_reference(x, codes, scale, zero, g_idx, bias)) < BF16_TOLERANCE
    assert layer.last_kernel in names


@pytest.mark.parametrize(
    ("out_features", "in_features", "bits", "group_size", "expected"),
    [
        (32, 256, 4, 128, "int4"),
        (48, 512, 4, 64, "int4"),
        (64, 128, 4, 32, "int4"),
        (80, 512, 4, 256, "int4"),  # a full block of 64 rows and a tail of 16 on AVX512
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
def test_int4_every_kernel_matches_reference(
    out_features: int, in_features: int, bits: int, group_size: int, expected: str,
    symmetric: bool,
) -> None:
    codes, scale, zero, g_idx = _random_weight(out_features, in_features, bits, group_size,
                                               symmetric, seed=in_features + bits)
    layer = pack_linear(codes, scale, zero, g_idx, bits=bits)
    assert layer.format == expected
    names = _kernel_names(layer)
    if expected == "int4":
        assert {"int4pack_fp32", "int4pack_bf16"} <= set(names)
        # the dense kernels read the codes back out of aten's packing, nothing else
        assert {name for name, _ in layer.named_buffers()} == {"weight", "scales_and_zeros"}
    for name in names:
        for tokens in (1, 8, 64):
            x = torch.randn(tokens, in_features)
            reference = linear_reference(x, codes, scale, zero, g_idx)
            assert _relative_error(_forced(layer, name, x), reference) < _tolerance(name), name


def test_int4_with_act_order_columns_matches_reference() -> None:
    codes, scale, zero, _ = _random_weight(32, 256, 4, 64, symmetric=False, seed=3)
    g_idx = (torch.arange(256) // 64)[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    input_scale = torch.rand(256) * 4 + 0.25
    layer = pack_linear(codes, scale, zero, g_idx, bits=4, input_scale=input_scale)
    assert layer.format == "int4"
    x = torch.randn(4, 256)
    reference = linear_reference(x, codes, scale, zero, g_idx, input_scale=input_scale)
    for name in _kernel_names(layer):
        assert _relative_error(_forced(layer, name, x), reference) < _tolerance(name), name
    # ignoring the permutation would be wrong by far more than the tolerance
    in_order = linear_reference(x, codes, scale, zero, torch.arange(256) // 64, input_scale=input_scale)
    assert _relative_error(in_order, reference) > 10 * BF16_TOLERANCE


@pytest.mark.parametrize("rows", [16, 48, 80, 96, 1536])
def test_int4_unpack_inverts_aten_packing(rows: int) -> None:
    codes = torch.randint(0, 16, (rows, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(ops.int4_unpack(packed, rows, 64).to(torch.int32), codes)


W8A8_CASES = [
    (5, 64, 48, False),
    (33, 384, 96, True),
    (3, 13, 7, True),  # odd shapes: torch._int_mm takes any size on CPU
    (17, 96, 40, True),
]


def _w8a8_layer(tokens: int, in_features: int, out_features: int, smoothed: bool,
                fuse: bool) -> tuple[QuantLinear, tuple[torch.Tensor, ...]]:
    codes, scale, zero, g_idx = _random_weight(out_features, in_features, 8, in_features,
                                               symmetric=True, seed=tokens)
    bias = torch.randn(out_features)
    input_scale = torch.rand(in_features) * 4 + 0.25 if smoothed else None
    layer = pack_linear(codes, scale, zero, g_idx, bits=8, bias=bias, activation_bits=8,
                        input_scale=input_scale, fuse=fuse)
    assert layer.format == "w8a8"
    return layer, (codes, scale, zero, g_idx, bias, input_scale)


@pytest.mark.parametrize("kernel", ["onednn_s8", "onednn_u7", "int_mm", "onednn_s8_fused",
                                    "onednn_u7_fused", "int_mm_fused", "dequant_fp32"])
@pytest.mark.parametrize(("tokens", "in_features", "out_features", "smoothed"), W8A8_CASES)
def test_w8a8_every_kernel_matches_its_exact_product(
    tokens: int, in_features: int, out_features: int, smoothed: bool, kernel: str,
) -> None:
    layer, (codes, scale, zero, g_idx, bias, input_scale) = _w8a8_layer(
        tokens, in_features, out_features, smoothed, fuse=True)
    if kernel not in _kernel_names(layer):
        reason = ("8-bit activations do not saturate here" if kernel.startswith("onednn_u7")
                  else "this torch build has no oneDNN int8 linear")
        pytest.skip(f"{kernel} not offered on this CPU ({reason})")
    saturates = {"onednn_s8": ops.onednn_int8_saturates, "int_mm": ops.int_mm_saturates}
    if kernel.removesuffix("_fused") in saturates and saturates[kernel.removesuffix("_fused")]():
        layer(torch.randn(tokens, in_features))  # the measured choice must drop it
        assert kernel in layer.decisions[row_bucket(tokens)].rejected
        pytest.skip(f"{kernel} saturates on this CPU (measured: no VNNI); the chooser rejects it")
    if kernel.endswith("_fused"):
        kernels = {k.name: k for k in layer.all_kernels()}
        rejected = contract_rejections([kernels[kernel], kernels[kernel.removesuffix("_fused")]],
                                       layer.reference, layer.tolerance, tokens, in_features)
        if kernel in rejected and kernel.removesuffix("_fused") not in rejected:
            layer(torch.randn(tokens, in_features))  # the measured choice must drop it
            assert kernel in layer.decisions[row_bucket(tokens)].rejected
            pytest.skip(f"{kernel}: torch.compile's code fails the contract on this CPU "
                        f"({rejected[kernel]}); the eager kernel is exact, the chooser drops this one")
    x = probe_inputs(tokens, in_features, adversarial=True)  # outlier channel, +-127 rows
    y = _forced(layer, kernel, x)
    dense = linear_reference(x, codes, scale, zero, g_idx, bias, input_scale)
    if kernel.startswith("dequant"):
        assert _relative_error(y, dense) < FP32_TOLERANCE
        return
    levels = ops.REDUCED_LEVELS if kernel.startswith("onednn_u7") else 127
    weight = (codes.to(torch.int16) - 128).to(torch.int8)
    exact = w8a8_reference(x, weight, scale[:, 0], bias, input_scale, levels)
    # same integer products; only the fp32 epilogue (or a rounding tie) differs
    assert _relative_error(y, exact) < 1e-4
    # and it is a real approximation of the weight-only product, not something else
    plain = torch.randn(tokens, in_features)
    y_plain = _forced(layer, kernel, plain)
    assert 0 < _relative_error(y_plain, linear_reference(plain, codes, scale, zero, g_idx, bias,
                                                         input_scale)) < 0.05


def test_w8a8_measured_choice_is_exact_for_its_kernel() -> None:
    layer, (codes, scale, _, _, bias, input_scale) = _w8a8_layer(33, 384, 96, True, True)
    x = probe_inputs(33, 384, adversarial=True)
    y = layer(x)
    chosen = layer.last_kernel
    assert chosen in _kernel_names(layer) and chosen not in layer.decisions[64].rejected
    if chosen.startswith("dequant"):
        return  # the dense product: checked against the reference by the contract
    levels = ops.REDUCED_LEVELS if chosen.startswith("onednn_u7") else 127
    weight = (codes.to(torch.int16) - 128).to(torch.int8)
    assert _relative_error(y, w8a8_reference(x, weight, scale[:, 0], bias, input_scale, levels)) < 1e-4


def test_w8a8_rejects_asymmetric_and_grouped_weights() -> None:
    codes, scale, zero, g_idx = _random_weight(32, 64, 8, 64, symmetric=False, seed=1)
    assert pack_linear(codes, scale, zero, g_idx, bits=8, activation_bits=8).format == "int8"
    codes, scale, zero, g_idx = _random_weight(32, 64, 8, 32, symmetric=True, seed=1)
    assert pack_linear(codes, scale, zero, g_idx, bits=8, activation_bits=8).format == "dequant"

"""Codebook (NF4/FP4) packed runtime: packing, every kernel against the fp64 product of
the dequantized weight, the module's memory and kernels."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from squeezeflow.compression.quantization.codebook import quantize_to_codebook
from squeezeflow.compression.quantization.float4.math import fp4_codebook, nf4_codebook
from squeezeflow.kernels import codebook as K
from squeezeflow.kernels.choice import contract_rejections
from squeezeflow.kernels.codebook import CodebookLinear

# fp32 kernels reorder an fp32 sum; i16 rounds the codebook at 2**-16 absolute, bf16 at
# 2**-9 relative. A swapped nibble, block mapping or scale errs by O(1).
FP32_TOLERANCE = 1e-5
I16_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.02
KERNELS: dict[str, tuple[Callable[..., torch.Tensor], float]] = {
    "matmul_dequant": (K.matmul_dequant, FP32_TOLERANCE),
    "matmul_dequant_bf16": (K.matmul_dequant_bf16, BF16_TOLERANCE),
    "matmul_fused_fp32": (K.matmul_fused_fp32, FP32_TOLERANCE),
    "matmul_fused_i16": (K.matmul_fused_i16, I16_TOLERANCE),
    "matmul_fused_bf16": (K.matmul_fused_bf16, BF16_TOLERANCE),
}


def _random_coded(
    out_features: int, in_features: int, block_size: int, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes (out, in) uint8, scale (out, blocks) fp16, a sorted codebook (16,) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-in_features // block_size)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator)
    scale = (torch.rand(out_features, blocks, generator=generator) * 0.05 + 0.01).half()
    codebook = torch.sort(torch.rand(16, generator=generator) * 2 - 1).values
    return codes.to(torch.uint8), scale, codebook


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.double() - reference).norm() / reference.norm())


def _dense(codes: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor,
           block_size: int) -> torch.Tensor:
    """W (out, in) fp64 straight from the format's definition."""
    block_of = torch.arange(codes.shape[1]) // block_size
    return codebook.double()[codes.long()] * scale.double()[:, block_of]


@pytest.mark.parametrize("in_features", [64, 77])
def test_pack_nibbles_round_trips_two_codes_per_byte(in_features: int) -> None:
    codes, _, _ = _random_coded(5, in_features, 64, seed=in_features)
    packed = K.pack_nibbles(codes)
    assert packed.shape == (5, -(-in_features // 2)) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0] & 15, codes[:, 0])  # column 0 in the low nibble
    assert torch.equal(packed[:, 0] >> 4, codes[:, 1])
    assert torch.equal(K.unpack_nibbles(packed, in_features), codes)


@pytest.mark.parametrize(("in_features", "block_size"), [(200, 64), (77, 7)])
def test_compiled_dequantization_is_the_reference_bit_for_bit(in_features: int,
                                                              block_size: int) -> None:
    codes, scale, codebook = _random_coded(24, in_features, block_size, seed=1)
    packed = K.pack_nibbles(codes)
    W = K.dequantize(packed, scale, codebook, block_size, in_features)
    # one fp32 multiply: the fp64 product (exact) rounded once
    assert torch.equal(W, _dense(codes, scale, codebook, block_size).to(torch.float32))
    assert torch.equal(K.dequantize_fused(packed, scale, codebook, block_size, in_features), W)
    W_bf16 = K.dequantize_fused(packed, scale, codebook, block_size, in_features, torch.bfloat16)
    assert torch.equal(W_bf16, W.to(torch.bfloat16))  # rounded to nearest even, like .to()


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_every_kernel_matches_the_fp64_product(name: str, rows: int) -> None:
    # 200 columns in blocks of 64: a last block of 8 columns
    kernel, tolerance = KERNELS[name]
    codes, scale, codebook = _random_coded(48, 200, 64, seed=rows)
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(rows))
    reference = x.double() @ _dense(codes, scale, codebook, 64).T
    y = kernel(x, K.pack_nibbles(codes), scale, codebook, 64)
    assert y.shape == (rows, 48) and y.dtype == torch.float32
    assert _relative_error(y, reference) < tolerance


@pytest.mark.parametrize("name", ["matmul_fused_fp32", "matmul_fused_i16", "matmul_fused_bf16"])
def test_fused_kernels_handle_odd_columns_odd_blocks_and_partial_passes(name: str) -> None:
    # 77 columns: the last byte's high nibble is padding; blocks of 7 split byte pairs;
    # 11 rows: one full pass of 8 and a zero-padded one
    kernel, tolerance = KERNELS[name]
    codes, scale, codebook = _random_coded(33, 77, 7, seed=7)
    x = torch.randn(11, 77, generator=torch.Generator().manual_seed(7))
    reference = x.double() @ _dense(codes, scale, codebook, 7).T
    y = kernel(x, K.pack_nibbles(codes), scale, codebook, 7)
    assert _relative_error(y, reference) < tolerance


def test_codebooks_with_fewer_values_and_signed_zeros_decode_exactly() -> None:
    # FP4 holds +0 and -0; a 3-bit codebook leaves codes 8-15 unused
    for codebook in (fp4_codebook(), nf4_codebook()[::2].contiguous()):
        codes, scale, _ = _random_coded(16, 64, 32, seed=3)
        codes = codes % codebook.numel()
        table = K.decode_table(codebook, "fp32")
        assert torch.equal(table[:codebook.numel()], codebook.view(torch.int32))
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
        reference = x.double() @ _dense(codes, scale, codebook, 32).T
        y = K.matmul_fused(x, K.pack_nibbles(codes), scale, codebook, 32, "fp32", table)
        assert _relative_error(y, reference) < FP32_TOLERANCE


def test_module_is_packed_and_every_kernel_meets_its_contract() -> None:
    W = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    coded = quantize_to_codebook(W, nf4_codebook(), 64, "nf4")
    bias = torch.randn(1024)
    layer = CodebookLinear.from_weight(coded, bias)
    # codes two per byte, fp16 scales per 64 columns: 1/8 + 1/64 = 0.14 of fp32
    resident = sum(buffer.nbytes for buffer in layer.buffers() if buffer is not layer.bias)
    assert resident <= 0.2 * 4 * 1024 * 1024
    assert torch.equal(layer.dequantized_weight(), coded.dequantize())
    assert layer.signature() == "|b64" and layer.format == "codebook"

    names = [kernel.name for kernel in layer.all_kernels()]
    assert names == ["dequant_fp32", "dequant_bf16", "fused_fp32", "fused_i16"]
    x = torch.randn(2, 3, 1024, generator=torch.Generator().manual_seed(1))
    reference = torch.nn.functional.linear(x.double(), coded.dequantize().double(), bias.double())
    for name in names:
        layer.force_kernel(name)
        y = layer(x)
        assert layer.last_kernel == name and y.shape == (2, 3, 1024)
        tolerance = BF16_TOLERANCE if "bf16" in name else I16_TOLERANCE
        assert _relative_error(y, reference) < tolerance, name
    # the chooser's own check, adversarial inputs included, keeps every offered kernel
    for rows in (1, 8):
        assert contract_rejections(layer.all_kernels(), layer.reference, layer.tolerance,
                                   rows, 1024) == {}


def test_dequantization_falls_back_to_plain_torch_where_compiling_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    codes, scale, codebook = _random_coded(8, 64, 32, seed=2)
    layer = CodebookLinear(codes, scale, codebook, 32)

    def no_compiler(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("InductorError: no working C++ compiler")

    monkeypatch.setattr(K, "dequantize_fused", no_compiler)
    W = layer.dequantized_weight(torch.bfloat16)
    assert torch.equal(W, _dense(codes, scale, codebook, 32).to(torch.float32).to(torch.bfloat16))
    assert "no working C++ compiler" in caplog.text


def test_invalid_weights_are_rejected_naming_the_field() -> None:
    codes, scale, codebook = _random_coded(4, 64, 32, seed=0)
    with pytest.raises(ValueError, match="scale must be"):
        CodebookLinear(codes, scale[:, :1], codebook, 32)
    with pytest.raises(ValueError, match="fp16"):
        CodebookLinear(codes, scale.float() + 1e-4, codebook, 32)
    with pytest.raises(ValueError, match="codes reach 15"):
        CodebookLinear(codes, scale, codebook[:8], 32)

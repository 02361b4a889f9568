from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from squeezeflow.compression.quantization.qweight import pack_bits, unpack_bits
from squeezeflow.compression.quantization.rtn.math import quantize_rtn
from squeezeflow.compression.quantization.rtn.step import RTNConfig, RTNStep


def gaussian_weight(rows: int = 64, columns: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "max_rel_error"),
    [
        (8, None, True, 0.012),  # 255 levels over +-3.5 sigma: ~0.8% error
        (8, None, False, 0.012),
        (4, 128, True, 0.17),  # 15 levels: ~13%
        (4, 32, False, 0.12),  # smaller groups fit tighter ranges
    ],
)
def test_rtn_error_is_bounded(bits: int, group_size: int | None, symmetric: bool,
                              max_rel_error: float) -> None:
    W = gaussian_weight()
    quantized = quantize_rtn(W, bits, group_size, symmetric)
    W_hat = quantized.dequantize()
    # every entry within half a quantization step of the original
    step = quantized.scale[:, quantized.g_idx]  # (out, in)
    assert ((W - W_hat).abs() <= step / 2 + 1e-6).all()
    rel_error = float((W - W_hat).norm() / W.norm())
    assert rel_error < max_rel_error
    assert int(quantized.codes.max()) <= 2**bits - 1
    # more bits -> strictly less error on the same weights
    if bits == 4:
        assert rel_error > float((W - quantize_rtn(W, 8, group_size, symmetric).dequantize()).norm() / W.norm())


def test_int4_codes_use_the_whole_grid() -> None:
    quantized = quantize_rtn(gaussian_weight(), 4, 128, symmetric=False)
    assert set(torch.unique(quantized.codes).tolist()) == set(range(16))


def test_group_that_does_not_divide_gets_a_short_last_group() -> None:
    W = gaussian_weight(columns=200)
    quantized = quantize_rtn(W, 4, 64, symmetric=True)
    assert quantized.scale.shape == (64, 4)  # 64 + 64 + 64 + 8 columns
    assert int((quantized.g_idx == 3).sum()) == 8
    assert float((W - quantized.dequantize()).norm() / W.norm()) < 0.17


def test_zero_rows_survive() -> None:
    W = gaussian_weight()
    W[3] = 0.0
    W_hat = quantize_rtn(W, 4, 128, symmetric=True).dequantize()
    assert torch.isfinite(W_hat).all() and (W_hat[3] == 0).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 9), columns=st.integers(1, 33),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits: int, rows: int, columns: int, seed: int) -> None:
    codes = torch.randint(0, 2**bits, (rows, columns), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert packed.numel() == -(-rows * columns * bits // 8)  # exactly bits per code, rounded up
    assert torch.equal(unpack_bits(packed, bits, (rows, columns)), codes.to(torch.uint8))


def test_step_quantizes_layer_output_within_bound() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(256, 64)
    x = torch.randn(32, 256)
    reference = layer(x).detach()
    report = RTNStep(RTNConfig(bits=8)).apply({"layer": layer})
    output_error = float((layer(x).detach() - reference).norm() / reference.norm())
    assert output_error < 0.01
    assert 0 < report.per_module["layer"]["weight_rel_error"] < 0.012


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_bytes_follow_the_documented_little_endian_stream(bits: int) -> None:
    """Checkpoints written before the whole-code fast path must still read back."""
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    stream = [(int(code) >> j) & 1 for code in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    expected = [sum(bit << i for i, bit in enumerate(stream[b : b + 8]))
                for b in range(0, len(stream), 8)]
    assert pack_bits(codes, bits).tolist() == expected

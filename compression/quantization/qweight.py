"""Integer weight representation shared by every quantizer and the artifact format.

A quantized Linear weight W (out, in) is stored as unsigned integer codes with one
scale and zero point per (output row, input group):

    W[i, j] ~= scale[i, g_idx[j]] * (codes[i, j] - zero[i, g_idx[j]])

This is the layout of GPTQ checkpoints (qweight/qzeros/scales/g_idx), so RTN and
GPTQ results export the same way. `g_idx` maps each input column to its group;
it is `arange(in) // group_size` unless a quantizer reorders columns (act_order).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import torch
from torch import Tensor

SCALE_DTYPE = torch.float16  # scales are stored as fp16; kept exact in memory too


@dataclass(frozen=True)
class QuantizedWeight:
    codes: Tensor  # (out, in) uint8, values in [0, 2**bits - 1]
    scale: Tensor  # (out, groups) float32, exactly representable in fp16
    zero: Tensor  # (out, groups) uint8, integer zero points
    g_idx: Tensor  # (in,) int64, group of each input column
    bits: int
    group_size: int  # input columns per group; equals `in` for per-channel
    symmetric: bool
    # 8 = the packed runtime also rounds this Linear's inputs to int8 per token (W8A8);
    # None = weight-only quantization.
    activation_bits: int | None = None
    # (in,) SmoothQuant factor s the codes were computed for: they encode W * s, and
    # the layer divides its input by s (see compression/quantization/smoothquant).
    input_scale: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def row_slice(self, rows: slice) -> QuantizedWeight:
        """The output rows `rows` of this weight (same columns, groups and format)."""
        return replace(self, codes=self.codes[rows].contiguous(),
                       scale=self.scale[rows].contiguous(), zero=self.zero[rows].contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        scale = self.scale[:, self.g_idx]  # (out, in)
        zero = self.zero[:, self.g_idx].to(torch.float32)  # (out, in)
        W = scale * (self.codes.to(torch.float32) - zero)  # (out, in)
        if self.input_scale is not None:
            W = W / self.input_scale  # the weight the layer applies to its unscaled input
        return W.to(dtype)


def group_index(columns: int, group_size: int) -> Tensor:
    """Group of each input column; a last group shorter than `group_size` is allowed."""
    return torch.arange(columns) // group_size


def qparams(W: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero point covering the range of each row of W.

    W: (rows, cols) -> scale, zero: (rows,). Symmetric puts the zero point in the
    middle of the code range and maps +-max|W| onto it; asymmetric maps [min, max].
    """
    maxq = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = W.abs().amax(dim=1)  # (rows,)
        scale = amax / (half - 1) if bits > 1 else amax
        zero = torch.full_like(scale, float(half))
    else:
        wmin = W.amin(dim=1).clamp(max=0.0)  # the range always contains 0 so that 0 is exact
        wmax = W.amax(dim=1).clamp(min=0.0)
        scale = (wmax - wmin) / maxq
        zero = torch.round(-wmin / scale.clamp(min=torch.finfo(torch.float32).tiny))
    # An all-zero row would give scale 0 and codes of NaN; any positive scale is exact there.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _round_up_to_stored(scale)  # what is stored is what is used
    return scale, zero.clamp(0, maxq)


def _round_up_to_stored(scale: Tensor) -> Tensor:
    """The smallest fp16 value >= scale, so that the grid still spans the range."""
    stored = scale.to(SCALE_DTYPE)
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    stored = torch.where(stored.to(torch.float32) < scale, up, stored)
    return stored.to(torch.float32)


def quantize_codes(W: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round W onto its grid. W: (rows, cols); scale, zero: (rows,) or (rows, cols)."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(W / scale) + zero, 0, 2**bits - 1)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (any shape, values < 2**bits) into a flat uint8 tensor.

    Little-endian bit stream: bit j of code k is bit (k * bits + j) of the stream, and
    stream bit i is bit i % 8 of byte i // 8. For 2, 4 and 8 bits a byte holds whole
    codes (code k at shift (k * bits) % 8), packed without building the bit stream.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per_byte = 8 // bits
        pad = (-flat.numel()) % per_byte
        grouped = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per_byte)  # (bytes, per)
        packed = grouped[:, 0].clone()
        for k in range(1, per_byte):
            packed |= grouped[:, k] << (k * bits)
        return packed
    shifts = torch.arange(bits, dtype=torch.uint8)
    bit_matrix = (flat[:, None] >> shifts) & 1  # (n, bits)
    stream = bit_matrix.reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)  # (bytes, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.int32)
    return (stream.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `pack_bits`: uint8 stream -> uint8 codes of `shape`."""
    count = 1
    for size in shape:
        count *= size
    if bits == 8:
        return packed[:count].reshape(shape).clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)  # (per_byte,)
        codes = (packed[:, None] >> shifts) & (2**bits - 1)  # (bytes, per_byte) uint8
        return codes.reshape(-1)[:count].reshape(shape)
    shifts = torch.arange(8, dtype=torch.uint8)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: count * bits]  # (count * bits,)
    weights = (1 << torch.arange(bits, dtype=torch.int32)).to(torch.int32)
    codes = (stream.reshape(count, bits).to(torch.int32) * weights).sum(dim=1)
    return codes.to(torch.uint8).reshape(shape)


QUANTIZED_ATTR = "squeezeflow_qweight"  # attribute carrying a Linear's QuantizedWeight


def stores_transposed(module: torch.nn.Module) -> bool:
    """GPT-2's `Conv1D` keeps its weight as (in, out), the transpose of nn.Linear's."""
    return type(module).__name__ == "Conv1D"


def as_stored(module: torch.nn.Module, W: Tensor) -> Tensor:
    """W: (out, in) in the module's own weight layout (and back: the map is its own inverse)."""
    return W.T if stores_transposed(module) else W


class Dequantizable(Protocol):
    """Any stored weight format: integer grids here, codebooks in codebook.py."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor: ...


StoredT = TypeVar("StoredT", bound=Dequantizable)


def attach(module: torch.nn.Module, quantized: Dequantizable, attr: str = QUANTIZED_ATTR, *,
           dequantized: Tensor | None = None) -> Tensor:
    """Replace the module's weight by its dequantized value and remember the codes.

    Returns the dequantized weight (out, in); `dequantized`: that value when the caller
    has it already. The codes travel with the module (as attribute `attr`) so that
    saving can pack them; a later step that changes the weight makes them stale, and
    the artifact writer then stores the weight dense (see `current_quantized`).
    """
    weight = module.weight
    assert isinstance(weight, Tensor)
    W_hat = quantized.dequantize(weight.dtype) if dequantized is None else dequantized.to(weight.dtype)
    weight.data.copy_(as_stored(module, W_hat))
    setattr(module, attr, quantized)
    return W_hat


def current_stored(module: torch.nn.Module, attr: str, kind: type[StoredT]) -> StoredT | None:
    """The module's stored format under `attr` if it still describes the weight exactly."""
    stored = getattr(module, attr, None)
    weight = getattr(module, "weight", None)
    if not isinstance(stored, kind) or weight is None:
        return None
    if not torch.equal(as_stored(module, stored.dequantize(weight.dtype)), weight.detach()):
        return None
    return stored


def current_quantized(module: torch.nn.Module) -> QuantizedWeight | None:
    """The module's QuantizedWeight if it still describes the weight exactly."""
    return current_stored(module, QUANTIZED_ATTR, QuantizedWeight)


def relative_error(W: Tensor, W_hat: Tensor) -> float:
    """||W - W_hat|| / ||W||: the per-layer weight error every quantizer reports."""
    return float((W - W_hat).norm() / W.norm().clamp(min=1e-12))

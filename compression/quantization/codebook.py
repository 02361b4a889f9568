"""Codebook weight representation: 4-bit float formats (NF4, FP4) with block scales.

A weight W (out, in) is stored as indices into a small sorted codebook of values in
[-1, 1] and one absmax scale per (output row, block of input columns):

    W[i, j] ~= scale[i, j // block_size] * codebook[codes[i, j]]

This is bitsandbytes' blockwise 4-bit layout (its blocks run over the flattened
row-major weight, the same blocks as here when `in` is a multiple of the block
size). Unlike `QuantizedWeight` the grid is not affine, so it has its own attribute
on the module and its own entry in the artifact; the runtime dequantizes it to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from squeezeflow.compression.quantization.qweight import (
    SCALE_DTYPE,
    attach,
    current_stored,
    group_index,
)

CODEBOOK_ATTR = "squeezeflow_codebook"  # attribute carrying a Linear's CodebookWeight


@dataclass(frozen=True)
class CodebookWeight:
    codes: Tensor  # (out, in) uint8 indices into `codebook`
    scale: Tensor  # (out, blocks) float32 block absmax, exactly representable in fp16
    codebook: Tensor  # (2**bits,) float32 ascending values in [-1, 1]
    bits: int
    block_size: int  # input columns per block; a shorter last block is allowed
    format: str  # codebook name, e.g. "nf4" or "fp4"

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        block_of = group_index(self.shape[1], self.block_size)  # (in,)
        values = self.codebook[self.codes.to(torch.int64)]  # (out, in)
        return (values * self.scale[:, block_of]).to(dtype)


def quantize_to_codebook(W: Tensor, codebook: Tensor, block_size: int, name: str) -> CodebookWeight:
    """Scale each block of W: (out, in) by its absmax and round to the nearest codebook value."""
    W = W.detach().to(torch.float32)
    rows, columns = W.shape
    size = min(block_size, columns)
    block_of = group_index(columns, size)  # (in,)
    blocks = int(block_of[-1]) + 1
    padded = nn.functional.pad(W.abs(), (0, blocks * size - columns))  # zeros never win amax
    absmax = padded.reshape(rows, blocks, size).amax(dim=2)  # (out, blocks)
    scale = _fp16_at_least(torch.where(absmax > 0, absmax, torch.ones_like(absmax)))
    normalized = W / scale[:, block_of]  # (out, in), in [-1, 1]
    midpoints = (codebook[1:] + codebook[:-1]) / 2  # (2**bits - 1,)
    codes = torch.bucketize(normalized, midpoints)  # nearest value of the sorted codebook
    bits = int(codebook.numel() - 1).bit_length()
    return CodebookWeight(codes=codes.to(torch.uint8), scale=scale, codebook=codebook.clone(),
                          bits=bits, block_size=size, format=name)


def _fp16_at_least(scale: Tensor) -> Tensor:
    """The smallest fp16 value >= scale: stored scales are used as stored, and |W / s| <= 1."""
    stored = scale.to(SCALE_DTYPE)
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    return torch.where(stored.to(torch.float32) < scale, up, stored).to(torch.float32)


def attach_codebook(module: nn.Module, quantized: CodebookWeight) -> Tensor:
    """Replace the module's weight by its dequantized value; see `qweight.attach`."""
    return attach(module, quantized, CODEBOOK_ATTR)


def current_codebook(module: nn.Module) -> CodebookWeight | None:
    """The module's CodebookWeight if it still describes the weight exactly."""
    return current_stored(module, CODEBOOK_ATTR, CodebookWeight)

"""`TernaryWeight`: a module's ternary weights in QMoE's dictionary-coded form.

Each stored parameter (a Linear's `weight` (out, in), or stacked experts' `gate_up_proj`
(E, 2I, H) and `down_proj` (E, H, I)) is a stack of matrices whose rows each have their
own ternary grid {min, 0, max} (QMoE, Frantar & Alistarh 2023):

    W[r, j] = min_r if t[r, j] = -1,   0 if t[r, j] = 0,   max_r if t[r, j] = +1

The codes t of every matrix, one after another, are one codeword stream with one
dictionary (`coding.py`); `offsets` say where each matrix's codewords start, so one
expert's matrix decodes on its own.

Row levels. The paper keeps min and max per row in bf16: 32 bits a row, nothing next to
rows of thousands of weights, but half a bit per weight on rows of 64 (the tiny
Mixtral's). Here |min| and max are coded on a log scale below the matrix's largest
level (fp16): `LEVEL_BITS` = 6 bits each, `LEVEL_STEPS` = 12 steps per octave, so a
stored level is within 2^(1/24) - 1 = 2.9% of the row's true min or max and levels down
to 2^(-62/12) = 1/36 of the largest are kept; code 63 is 0 (a row with no negative or no
positive weight). Ternary rounding moves weights by up to half a level, far more than
2.9%: on the tiny Mixtral the perplexity with 6-bit levels matched fp16 levels within
the run-to-run noise (benchmarks/README.md, QMoE). GPTQ rounds onto the stored levels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.compression.moe.qmoe.coding import (
    DICTIONARY_SIZE,
    MAX_PAIRS,
    Dictionary,
    build_dictionary,
    decode_digits,
    encode,
    from_digits,
    pair_costs_of,
)
from squeezeflow.compression.quantization.qweight import SCALE_DTYPE

TERNARY_ATTR = "squeezeflow_ternary"  # attribute carrying a module's TernaryWeight
WEIGHT = "weight"  # the one parameter of a Linear
LEVEL_BITS = 6  # per row level; 4 bits measured the same perplexity too, 6 keeps a 2.9% bound
LEVEL_STEPS = 12  # codes per octave: 2^(1/12) apart
ZERO_LEVEL = 2**LEVEL_BITS - 1  # the code of a level that is exactly 0


@functools.cache
def level_table() -> Tensor:
    """(2^LEVEL_BITS,) float32: magnitude of each level code relative to the matrix's scale.

    Computed in float64 and rounded once, so every machine decodes the same values.
    """
    magnitudes = [2.0 ** (-k / LEVEL_STEPS) for k in range(ZERO_LEVEL)] + [0.0]
    return torch.tensor(magnitudes, dtype=torch.float64).to(torch.float32)


@dataclass(frozen=True)
class RowLevels:
    """Each row's [min, max] as two log-scale codes under its matrix's largest level."""

    codes: Tensor  # (..., out, 2) uint8: codes of |min| and of max
    scale: Tensor  # (...,) float32, fp16-exact: the matrix's largest |min| or max (code 0)

    def values(self) -> Tensor:
        """(..., out, 2) float32 [min, max], min <= 0 <= max."""
        magnitude = self.scale[..., None, None] * level_table()[self.codes.to(torch.int64)]
        return magnitude * torch.tensor([-1.0, 1.0])


def row_levels(W: Tensor) -> RowLevels:
    """The stored grid of each row of W (..., out, in): min(0, row min), max(0, row max)."""
    W = W.detach().to(torch.float32)
    magnitude = torch.stack([(-W.amin(dim=-1)).clamp(min=0.0), W.amax(dim=-1).clamp(min=0.0)], dim=-1)
    largest = magnitude.flatten(-2).amax(dim=-1)  # (...,)
    scale = largest.to(SCALE_DTYPE).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero matrix: any scale
    ratio = magnitude / scale[..., None, None]  # (..., out, 2) in [0, ~1]
    k = torch.round(-torch.log2(ratio.clamp(min=1e-30)) * LEVEL_STEPS).clamp(0, ZERO_LEVEL - 1)
    smallest = 2.0 ** (-(ZERO_LEVEL - 1) / LEVEL_STEPS)
    k = torch.where(ratio < smallest / 2, float(ZERO_LEVEL), k)  # nearer to 0 than to any level
    return RowLevels(codes=k.to(torch.uint8), scale=scale)


@dataclass(frozen=True)
class TernaryWeight:
    # (parameter name, shape (*stack, out, in)) in stream order
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    stream: Tensor  # (words,) int16: 16-bit codewords (uint16 bit patterns)
    offsets: Tensor  # (matrices + 1,) int32: matrix m is stream[offsets[m]:offsets[m + 1]]
    level_codes: Tensor  # (rows, 2) uint8: [|min|, max] codes of every row of every matrix
    level_scales: Tensor  # (matrices,) float32, fp16-exact: each matrix's largest level
    pair_costs: Tensor  # (9,) int32: the dictionary's generator (`coding.build_dictionary`)
    dictionary_size: int = DICTIONARY_SIZE
    max_pairs: int = MAX_PAIRS

    @functools.cached_property
    def dictionary(self) -> Dictionary:
        """Rebuilt from `pair_costs` once per stored value (not a field: never stored)."""
        return build_dictionary(self.pair_costs, self.dictionary_size, self.max_pairs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shapes)

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the only parameter (a Linear's weight: (out, in))."""
        if len(self.shapes) != 1:
            raise ValueError(f"this TernaryWeight holds {len(self.shapes)} parameters: {self.names}")
        return self.shapes[0][1]

    def stored_bytes(self) -> int:
        """Bytes of what is saved (formats/ternary.py): codewords (2 each), offsets (4),
        row levels (LEVEL_BITS each, bit-packed), matrix scales (fp16), pair costs (4)."""
        level_bytes = -(-int(self.level_codes.numel()) * LEVEL_BITS // 8)
        return (2 * int(self.stream.numel()) + 4 * int(self.offsets.numel()) + level_bytes
                + 2 * int(self.level_scales.numel()) + 4 * int(self.pair_costs.numel()))

    def layout(self, name: str) -> tuple[int, int, int, int, int]:
        """(first matrix, matrices, out, in, first row of `level_codes`) of parameter `name`."""
        first = row = 0
        for other, shape in self.shapes:
            count = math.prod(shape[:-2])
            if other == name:
                return first, count, shape[-2], shape[-1], row
            first += count
            row += count * shape[-2]
        raise KeyError(f"no parameter {name!r}; stored: {', '.join(self.names)}")

    def codes(self, name: str) -> Tensor:
        """Ternary codes of parameter `name`: (*stack, out, in) int8 in {-1, 0, 1}."""
        first, count, rows, columns, _ = self.layout(name)
        words = self.stream[int(self.offsets[first]) : int(self.offsets[first + count])]
        digits = decode_digits(words, self.dictionary)  # each matrix padded to an even length
        per_matrix = rows * columns + (rows * columns) % 2
        if digits.numel() != count * per_matrix:
            raise ValueError(f"{name}: the stream holds {digits.numel()} digits, not {count * per_matrix}")
        digits = digits.reshape(count, per_matrix)[:, : rows * columns]
        return from_digits(digits).reshape(dict(self.shapes)[name])

    def levels(self, name: str) -> RowLevels:
        """The row levels of parameter `name`: codes (*stack, out, 2), scale (*stack,)."""
        first, count, rows, _, row = self.layout(name)
        stack = dict(self.shapes)[name][:-2]
        return RowLevels(
            codes=self.level_codes[row : row + count * rows].reshape(*stack, rows, 2),
            scale=self.level_scales[first : first + count].reshape(stack),
        )

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense values of parameter `name`: (*stack, out, in); the plain-torch reference."""
        codes = self.codes(name).to(torch.float32)  # (*stack, out, in)
        grid = self.levels(name).values()  # (*stack, out, 2)
        low, high = grid[..., 0:1], grid[..., 1:2]
        return torch.where(codes > 0, high, torch.where(codes < 0, low, torch.zeros_like(codes))).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight (out, in) of a Linear (the one parameter `weight`)."""
        if self.names != (WEIGHT,):
            raise ValueError(f"dequantize() is for a Linear's weight; this holds {', '.join(self.names)}: "
                             "use tensor(name)")
        return self.tensor(WEIGHT, dtype)

    @classmethod
    def from_codes(
        cls, codes: dict[str, Tensor], levels: dict[str, RowLevels],
        dictionary_size: int = DICTIONARY_SIZE, max_pairs: int = MAX_PAIRS,
    ) -> TernaryWeight:
        """Encode ternary codes {name: (*stack, out, in) in {-1, 0, 1}} on their row levels
        {name: RowLevels}; one dictionary fitted to all of them."""
        flat = {name: c.reshape(-1, c.shape[-2] * c.shape[-1]).to(torch.int8) for name, c in codes.items()}
        costs = pair_costs_of(torch.cat([_even(c).reshape(-1) for c in flat.values()]))
        dictionary = build_dictionary(costs, dictionary_size, max_pairs)
        streams, offsets = [], [0]
        for matrices in flat.values():
            for matrix in matrices:  # one stream per matrix: its codes decode on their own
                streams.append(encode(matrix, dictionary))
                offsets.append(offsets[-1] + int(streams[-1].numel()))
        stored = cls(
            shapes=tuple((name, tuple(int(s) for s in c.shape)) for name, c in codes.items()),
            stream=torch.cat(streams) if streams else torch.zeros(0, dtype=torch.int16),
            offsets=torch.tensor(offsets, dtype=torch.int32),
            level_codes=torch.cat([levels[name].codes.reshape(-1, 2) for name in codes]),
            level_scales=torch.cat([levels[name].scale.reshape(-1) for name in codes]),
            pair_costs=costs,
            dictionary_size=dictionary_size,
            max_pairs=max_pairs,
        )
        stored.__dict__["dictionary"] = dictionary  # already built: seed the cached property
        return stored


def _even(matrices: Tensor) -> Tensor:
    """(matrices, n) codes padded to an even n, as the encoder pads each matrix."""
    if matrices.shape[-1] % 2 == 0:
        return matrices
    return torch.nn.functional.pad(matrices, (0, 1))

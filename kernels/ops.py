"""Fast packed matmuls on CPU, each with a predicate naming the shapes it rejects.

- int8 weight-only, per output channel: `aten._weight_int8pack_mm`;
- int4 grouped: `aten._convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu`;
- W8A8 (int8 weights x int8 activations, per-token dynamic scales): oneDNN's int8
  GEMM on prepacked weights where available (x86), else `torch._int_mm`; the
  per-token quantization pass is fused by `torch.compile`.

Every op here has a plain-torch reference in `kernels/reference.py`; the parity tests
(tests/kernels/) hold them together. A rejected shape must never reach an aten op:
some of them read out of bounds instead of raising (measured: `_weight_int8pack_mm`
with bf16 inputs and K=40 returns garbage, with K=13 it segfaults).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.kernels.reference import INT8_MAX

log = logging.getLogger(__name__)

INT8_K_MULTIPLE = 16  # _weight_int8pack_mm is correct only when K is a multiple of 16
INT4_GROUP_SIZES = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs 16 output rows per tile
INT4_INNER_K_TILES = 1  # ignored by the CPU packing routine; any valid value packs the same
INT4_CODE_OFFSET = 8  # the int4 op dequantizes as (q - 8) * scale + zero
REDUCED_LEVELS = 63  # 7-bit activations: u8 x s8 pair sums stay below 2**15 (no VNNI needed)
REDUCED_ZERO_POINT = 64  # [-63, 63] shifted into uint8 [1, 127]


# ---------------------------------------------------------------- int8 weight-only


def int8_rejects(out_features: int, in_features: int, groups: int) -> str | None:
    """Why `int8_weight_only_mm` cannot run this weight, or None when it can."""
    if groups != 1:
        return f"{groups} groups per row; the int8 op takes one scale per output channel"
    if in_features % INT8_K_MULTIPLE:
        return f"in_features {in_features} is not a multiple of {INT8_K_MULTIPLE}"
    return None


def int8_weight_only_mm(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (m, k) @ (weight (n, k) int8 * scales (n,)).T -> (m, n), in x's dtype.

    x and scales must share a dtype; bf16 takes the vectorized path on x86
    (fp32 activations were slower than fp32 F.linear when measured).
    """
    out: Tensor = torch.ops.aten._weight_int8pack_mm(x, weight, scales)
    return out


# ---------------------------------------------------------------- int4 grouped


def int4_group_size(in_features: int, group_size: int) -> int | None:
    """The op's group size that represents `group_size`: the largest supported size
    dividing both (scales repeat across sub-groups), or None when there is none."""
    for size in INT4_GROUP_SIZES:
        if group_size % size == 0 and in_features % size == 0:
            return size
    return None


def int4_rejects(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why the int4 op cannot run this weight, or None when it can."""
    if out_features % INT4_N_MULTIPLE:
        return f"out_features {out_features} is not a multiple of {INT4_N_MULTIPLE}"
    if in_features % group_size:
        return f"in_features {in_features} has a partial last group of size {group_size}"
    if int4_group_size(in_features, group_size) is None:
        sizes = ", ".join(map(str, INT4_GROUP_SIZES))
        return f"group size {group_size} is not a multiple of one of {sizes}"
    return None


def int4_pack(
    codes: Tensor, scale: Tensor, zero: Tensor, group_size: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, int]:
    """Pack grouped codes for `int4_mm`.

    codes: (n, k) with values < 16 (2-, 3- and 4-bit codes all fit); scale, zero:
    (n, k // group_size). Returns the packed weight, scales_and_zeros
    (k // op_group, n, 2) in `dtype`, and the op's group size. The op computes
    (q - 8) * s + z', so z' = s * (8 - zero) reproduces s * (q - zero).
    """
    n, k = codes.shape
    op_group = int4_group_size(k, group_size)
    if op_group is None:
        raise ValueError(int4_rejects(n, k, group_size))
    repeat = group_size // op_group  # op groups per stored group
    s = scale.to(torch.float32).repeat_interleave(repeat, dim=1)[:, : k // op_group]  # (n, G')
    z = zero.to(torch.float32).repeat_interleave(repeat, dim=1)[:, : k // op_group]  # (n, G')
    offset = s * (INT4_CODE_OFFSET - z)  # (n, G')
    scales_and_zeros = torch.stack([s.T, offset.T], dim=-1).to(dtype).contiguous()  # (G', n, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.to(torch.int32).contiguous(), INT4_INNER_K_TILES
    )
    return packed, scales_and_zeros, op_group


def int4_mm(x: Tensor, packed: Tensor, op_group: int, scales_and_zeros: Tensor) -> Tensor:
    """x (m, k) @ W.T -> (m, n) in x's dtype; x and scales_and_zeros share a dtype."""
    out: Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, op_group, scales_and_zeros)
    return out


@dataclass(frozen=True)
class Int4Run:
    """Consecutive row blocks that aten packs alike: `blocks` blocks of `2 * width`
    rows from `first_row`, each stored k-major, `width` bytes per column, byte i of a
    column holding rows `low[i]` (low nibble) and `high[i]` (high nibble) of the block."""

    first_row: int
    blocks: int
    width: int
    low: tuple[int, ...]
    high: tuple[int, ...]


def int4_layout(n: int) -> tuple[Int4Run, ...]:
    """How `_convert_weight_to_int4pack_for_cpu` lays out n rows, read off probes.

    The layout depends on the dispatch level (measured: blocks of 64 rows with row r
    and r + 32 sharing a byte on AVX512, blocks of 32 with r and r + 16 on AVX2,
    neighbouring rows on the default level, and other blocks for a tail of rows), so
    it is measured here, never assumed: packing row numbers as codes shows where each
    row's nibbles land. Raises ValueError for a layout that is not made of such blocks.
    """
    return _int4_layout(n, torch.backends.cpu.get_cpu_capability())


@functools.cache
def _int4_layout(n: int, capability: str) -> tuple[Int4Run, ...]:
    columns = 4  # enough to see the column stride of every block
    rows = torch.arange(n)[:, None].expand(n, columns)
    row_of_low = torch.zeros(n * columns // 2, dtype=torch.int64)
    row_of_high = torch.zeros_like(row_of_low)
    for digit in range(max(1, (n - 1).bit_length() + 3) // 4):  # row number, 4 bits at a time
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            ((rows >> (4 * digit)) & 15).to(torch.int32).contiguous(), INT4_INNER_K_TILES
        ).reshape(-1).to(torch.int64)
        row_of_low |= (packed & 15) << (4 * digit)
        row_of_high |= (packed >> 4) << (4 * digit)
    runs: list[Int4Run] = []
    offset, row = 0, 0
    while row < n:
        width = 1  # bytes per column of this block: until the next column's rows repeat
        while offset + width < row_of_low.numel() and int(row_of_low[offset + width]) != int(
            row_of_low[offset]
        ):
            width += 1
        low = tuple(int(r) - row for r in row_of_low[offset: offset + width])
        high = tuple(int(r) - row for r in row_of_high[offset: offset + width])
        if sorted(low + high) != list(range(2 * width)):
            raise ValueError(f"int4 packing of {n} rows is not made of row blocks")
        if runs and (runs[-1].width, runs[-1].low, runs[-1].high) == (width, low, high):
            last = runs[-1]
            runs[-1] = Int4Run(last.first_row, last.blocks + 1, width, low, high)
        else:
            runs.append(Int4Run(row, 1, width, low, high))
        offset += width * columns
        row += 2 * width
    return tuple(runs)


def _as_slice(rows: tuple[int, ...]) -> slice | list[int]:
    """An evenly spaced row set as a slice (a strided copy, 2-3x faster than a gather)."""
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step > 0 and rows == tuple(range(rows[0], rows[0] + step * len(rows), step)):
        return slice(rows[0], rows[0] + step * len(rows), step)
    return list(rows)


def int4_unpack(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of `_convert_weight_to_int4pack_for_cpu`: packed -> codes (n, k) uint8."""
    flat = packed.reshape(-1)
    codes = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    offset = 0
    for run in int4_layout(n):
        size = run.blocks * k * run.width
        block = flat[offset: offset + size].view(run.blocks, k, run.width)  # (B, k, width)
        rows = codes[run.first_row: run.first_row + run.blocks * 2 * run.width]
        rows = rows.view(run.blocks, 2 * run.width, k)  # (B, 2 width, k)
        for nibbles, where in ((block & 15, run.low), (block >> 4, run.high)):
            rows[:, _as_slice(where)] = nibbles.transpose(1, 2)
        offset += size
    return codes


# ---------------------------------------------------------------- W8A8


def w8a8_mm(
    x: Tensor, weight_t: Tensor, weight_scale: Tensor, inv_input_scale: Tensor | None
) -> Tensor:
    """x (m, k) fp32 -> (m, n) fp32 through int8 x int8 -> int32 `torch._int_mm`.

    weight_t: (k, n) int8, the transposed view of a contiguous (n, k) weight (this
    column-major layout ran faster than a row-major copy); weight_scale: (n,);
    inv_input_scale: (k,) reciprocal SmoothQuant factor, folded into quantization.
    """
    q, t = quantize_per_token(x, inv_input_scale)  # (m, k) int8, (m, 1) per-token scale
    accumulated = torch._int_mm(q, weight_t)  # (m, n) int32
    return accumulated.to(torch.float32) * t * weight_scale


def onednn_prepack(weight: Tensor) -> Tensor | None:
    """weight (n, k) int8 in oneDNN's blocked layout for `onednn_w8a8_mm`; None when
    this build or CPU has no oneDNN int8 linear (the `torch._int_mm` path then runs)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed: Tensor = torch.ops.onednn.qlinear_prepack(weight, None)
    except (RuntimeError, AttributeError) as error:
        log.info("oneDNN int8 linear unavailable (%s); using torch._int_mm", error)
        return None
    return packed


def _saturates(matmul: Callable[[Tensor, Tensor], Tensor]) -> bool:
    """Whether an int8 GEMM errs on the worst case: all activations and weights at
    +127 (CPUs without VNNI sum u8 x s8 pairs in 16 bits, which saturate there)."""
    k = 256
    weight = torch.full((16, k), INT8_MAX, dtype=torch.int8)  # (n, k)
    y = matmul(torch.ones(2, k), weight)  # (2, n) fp32, per-token scale 1/127 applied
    exact = float(INT8_MAX * k)  # codes 127 * 127 * t summed over k, t = 1/127
    return not bool(torch.allclose(y, torch.full_like(y, exact), rtol=1e-5))


@functools.cache
def onednn_int8_saturates() -> bool:
    """Measured once per process: oneDNN's int8 GEMM with full-range activations."""
    if onednn_prepack(torch.ones(16, 16, dtype=torch.int8)) is None:
        return False

    def onednn(x: Tensor, weight: Tensor) -> Tensor:
        packed = onednn_prepack(weight)
        assert packed is not None
        n = weight.shape[0]
        return onednn_w8a8_mm(x, packed, torch.ones(n), torch.zeros(n, dtype=torch.int64),
                              None, None, fuse=False)

    saturates = _saturates(onednn)
    if saturates:
        log.info("oneDNN int8 GEMM saturates with 8-bit activations on this CPU; "
                 "W8A8 layers may use 7-bit activations")
    return saturates


@functools.cache
def int_mm_saturates() -> bool:
    """Measured once per process: `torch._int_mm` (oneDNN-backed on some builds)."""
    return _saturates(lambda x, weight: w8a8_mm(x, weight.t(), torch.ones(weight.shape[0]), None))


def onednn_w8a8_mm(
    x: Tensor, packed: Tensor, weight_scale: Tensor, weight_zero: Tensor,
    inv_input_scale: Tensor | None, bias: Tensor | None, fuse: bool = True,
    levels: int = INT8_MAX,
) -> Tensor:
    """Same product as `w8a8_mm` with oneDNN's int8 GEMM (AMX/VNNI on x86).

    oneDNN takes one activation scale per tensor, so it gets scale 1 on the integer
    codes and the per-token scales t are applied to its fp32 output; the integer
    accumulation is exact either way. Measured on MiniLM's Linear shapes (4096
    tokens, 1 thread): 0.8/9.3/2.4 ms vs `torch._int_mm` 1.9/27/5.5 ms.

    `levels` = REDUCED_LEVELS rounds activations to [-63, 63] and feeds them as uint8
    with zero point 64 (values 1..127): on CPUs without VNNI, oneDNN multiplies
    u8 x s8 pairs into 16-bit sums, which saturate for full-range int8 (reproduced with
    ONEDNN_MAX_CPU_ISA=AVX2 by tests/kernels/test_choice.py, where the contract
    rejects it at relative error 0.135 on Gaussian inputs) and
    cannot for 7-bit activations (|127 * 127 * 2| < 2**15). fbgemm's `reduce_range`
    rests on the same bound.
    """
    quantize = quantize_per_token_fused() if fuse else quantize_per_token
    zero_point = REDUCED_ZERO_POINT if levels == REDUCED_LEVELS else 0
    q, t = quantize(x, inv_input_scale, levels, zero_point)  # (m, k) int8 or uint8, (m, 1)
    y: Tensor = torch.ops.onednn.qlinear_pointwise(
        q, 1.0, zero_point, packed, weight_scale, weight_zero, None, 1.0, 0, torch.float32,
        "none", [], "",
    )
    # bias + y * t in one in-place pass; oneDNN's own bias would be added before the scale t
    return y.mul_(t) if bias is None else torch.addcmul(bias, y, t, out=y)


def quantize_per_token(
    x: Tensor, inv_input_scale: Tensor | None, levels: int = INT8_MAX, zero_point: int = 0
) -> tuple[Tensor, Tensor]:
    """x (m, k) -> codes (m, k) and per-token scales t (m, 1): round(x / t) in
    [-levels, levels], as int8, or shifted by `zero_point` as uint8 when it is not 0."""
    if inv_input_scale is not None:
        x = x * inv_input_scale
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    t = amax / levels  # (m, 1)
    q = torch.round(x / t).clamp(-levels, levels)
    if zero_point:
        return (q + zero_point).to(torch.uint8), t
    return q.to(torch.int8), t


@functools.cache
def quantize_per_token_fused() -> Callable[..., tuple[Tensor, Tensor]]:
    """`quantize_per_token` as one fused pass (torch.compile), compiled once per process."""
    compiled: Callable[..., tuple[Tensor, Tensor]] = torch.compile(
        quantize_per_token, dynamic=True, fullgraph=True
    )
    return compiled


@functools.cache
def w8a8_mm_fused() -> Callable[..., Tensor]:
    """`w8a8_mm` compiled once per process (lazily: importing torch._dynamo is slow).

    Fusing the quantize and dequantize passes is what makes W8A8 pay off on CPU:
    measured on MiniLM's three Linear shapes (4096 tokens, 1 thread) eager took
    194 ms, fused 100 ms, fp32 F.linear 133 ms. Dynamo keeps one graph per guard
    set (with or without smoothing), dynamic in every size.
    """
    compiled: Callable[..., Tensor] = torch.compile(w8a8_mm, dynamic=True, fullgraph=True)
    return compiled

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

import torch
from torch import Tensor

from squeezeflow.kernels.reference import INT8_MAX

log = logging.getLogger(__name__)

INT8_K_MULTIPLE = 16  # _weight_int8pack_mm is correct only when K is a multiple of 16
INT4_GROUP_SIZES = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs 16 output rows per tile
INT4_INNER_K_TILES = 1  # ignored by the CPU packing routine; any valid value packs the same
INT4_CODE_OFFSET = 8  # the int4 op dequantizes as (q - 8) * scale + zero


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


def onednn_w8a8_mm(
    x: Tensor, packed: Tensor, weight_scale: Tensor, weight_zero: Tensor,
    inv_input_scale: Tensor | None, bias: Tensor | None, fuse: bool = True,
) -> Tensor:
    """Same product as `w8a8_mm` with oneDNN's int8 GEMM (AMX/VNNI on x86).

    oneDNN takes one activation scale per tensor, so it gets scale 1 on the int8
    codes and the per-token scales t are applied to its fp32 output; the integer
    accumulation is exact either way. Measured on MiniLM's Linear shapes (4096
    tokens, 1 thread): 0.8/9.3/2.4 ms vs `torch._int_mm` 1.9/27/5.5 ms.
    """
    quantize = quantize_per_token_fused() if fuse else quantize_per_token
    q, t = quantize(x, inv_input_scale)  # (m, k) int8, (m, 1)
    y: Tensor = torch.ops.onednn.qlinear_pointwise(
        q, 1.0, 0, packed, weight_scale, weight_zero, None, 1.0, 0, torch.float32, "none", [], ""
    )
    # bias + y * t in one in-place pass; oneDNN's own bias would be added before the scale t
    return y.mul_(t) if bias is None else torch.addcmul(bias, y, t, out=y)


def quantize_per_token(x: Tensor, inv_input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """x (m, k) -> int8 codes (m, k) and per-token scales t (m, 1); see reference.py."""
    if inv_input_scale is not None:
        x = x * inv_input_scale
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    t = amax / INT8_MAX  # (m, 1)
    return torch.round(x / t).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), t


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

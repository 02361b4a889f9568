"""`QuantLinear` modules: Linear layers whose weights live packed and that call the
packed ops of `kernels/ops.py` in forward.

`pack_linear` picks the format for one quantized weight:

| format | when | op |
|---|---|---|
| `w8a8` | 8-bit symmetric per-channel weight marked for int8 activations | oneDNN int8 GEMM (else `torch._int_mm`), fused per-token quantization |
| `int8` | 8-bit, one scale per output channel, in_features % 16 == 0 | `aten._weight_int8pack_mm` (bf16 activations) |
| `int4` | <= 4 bits, groups of a multiple of 32, out_features % 16 == 0 | `aten._weight_int4pack_mm_for_cpu` (bf16 activations) |
| `dequant` | anything the fast ops reject | dequantize per call, fp32 F.linear |

Every module also has `reference(x)`: the same product in plain fp32 torch.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import Tensor, nn

from squeezeflow.kernels import ops
from squeezeflow.kernels.reference import dequantize, w8a8_reference

log = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.bfloat16  # weight-only ops: bf16 activations ran 2-50x faster than fp32
# Above this many rows per call the weight-only ops lose to a dense bf16 GEMM on a
# weight dequantized per call (measured, 1 thread: 1024x384->1536 int8 op 61 ms,
# int4 op 52 ms, dequantize + bf16 GEMM 11 ms, fp32 26 ms; at 8x4096->4096 the ops
# take 13.6/13.0 ms, dequantize + bf16 150 ms, fp32 54 ms).
LARGE_BATCH_TOKENS = 32


class QuantLinear(nn.Module):
    """Base class: a Linear (in_features -> out_features) with a packed weight."""

    format: ClassVar[str] = ""
    bias: Tensor | None  # (out,) fp32 buffer
    inv_input_scale: Tensor | None  # (in,) 1 / SmoothQuant factor, or None

    def __init__(
        self, in_features: int, out_features: int, bias: Tensor | None,
        input_scale: Tensor | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        # SmoothQuant factor s the weight was multiplied by: inputs are multiplied by 1/s.
        inv = None if input_scale is None else (1.0 / input_scale.to(torch.float32))
        self.register_buffer("inv_input_scale", inv)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        y = self._matmul(x2)  # (tokens, out) fp32, bias included
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _matmul(self, x: Tensor) -> Tensor:
        """x (tokens, in) -> x @ W.T + bias (tokens, out) in fp32."""
        raise NotImplementedError

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y.add_(self.bias)

    def dequantized_weight(self) -> Tensor:
        """W (out, in) fp32 as the layer applies it (smoothing divided back out)."""
        raise NotImplementedError

    def reference(self, x: Tensor) -> Tensor:
        """The layer's product in plain fp32 torch, for parity tests."""
        bias = None if self.bias is None else self.bias
        return nn.functional.linear(x.to(torch.float32), self.dequantized_weight(), bias)

    def _smoothed(self, x: Tensor) -> Tensor:
        return x if self.inv_input_scale is None else x * self.inv_input_scale

    def _unsmoothed(self, W: Tensor) -> Tensor:
        return W if self.inv_input_scale is None else W * self.inv_input_scale

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.inv_input_scale is not None else ""
        return f"{self.in_features} -> {self.out_features}, format={self.format}{smoothed}"


class WeightOnlyLinear(QuantLinear):
    """Weight-only formats: a packed op for few rows (decode), and for many rows
    (prefill, encoders) a dense GEMM in `compute_dtype` on the weight dequantized per
    call, which AMX/AVX512-bf16 runs faster than the packed op."""

    compute_dtype: torch.dtype

    def _matmul(self, x: Tensor) -> Tensor:
        x = self._smoothed(x).to(self.compute_dtype)
        if x.shape[0] > LARGE_BATCH_TOKENS:
            W = self._compute_weight()  # (out, in) in compute_dtype
            y = nn.functional.linear(x, W).to(torch.float32)
        else:
            y = self._packed_matmul(x)
        return self._add_bias(y)

    def _packed_matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _compute_weight(self) -> Tensor:
        raise NotImplementedError


def shifted_int8(codes: Tensor) -> Tensor:
    """uint8 codes c -> int8 c - 128, in one byte-wide pass (c ^ 0x80 read as int8)."""
    return torch.bitwise_xor(codes.to(torch.uint8), 0x80).view(torch.int8).contiguous()


class Int8Linear(WeightOnlyLinear):
    """int8 weight per output channel; `aten._weight_int8pack_mm` with bf16 activations.

    Codes c in [0, 255] with zero z are stored shifted, c' = c - 128 in int8, so
    y = s * (x @ c'.T) - s * (z - 128) * sum(x): the second term vanishes for
    symmetric weights (z = 128) and is kept as `offset` otherwise.
    """

    format = "int8"
    weight: Tensor  # (out, in) int8: codes - 128
    scales: Tensor  # (out,) in compute_dtype
    offset: Tensor | None  # (out,) scale * (zero - 128), only for asymmetric weights

    def __init__(
        self, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None,
        input_scale: Tensor | None = None, compute_dtype: torch.dtype = COMPUTE_DTYPE,
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, input_scale)
        self.compute_dtype = compute_dtype
        s = scale.to(torch.float32).reshape(-1)  # (out,)
        z = zero.to(torch.float32).reshape(-1) - 128  # (out,)
        self.register_buffer("weight", shifted_int8(codes))
        self.register_buffer("scales", s.to(compute_dtype))
        self.register_buffer("offset", (s * z) if bool((z != 0).any()) else None)

    def _packed_matmul(self, x: Tensor) -> Tensor:
        y = ops.int8_weight_only_mm(x, self.weight, self.scales).to(torch.float32)
        if self.offset is not None:
            y = y - x.to(torch.float32).sum(dim=-1, keepdim=True) * self.offset
        return y

    def _compute_weight(self) -> Tensor:
        W = self.weight.to(self.compute_dtype) * self.scales[:, None]  # (out, in)
        return W if self.offset is None else W - self.offset[:, None].to(self.compute_dtype)

    def dequantized_weight(self) -> Tensor:
        s = self.scales.to(torch.float32)[:, None]  # (out, 1)
        W = s * self.weight.to(torch.float32)
        if self.offset is not None:
            W = W - self.offset[:, None]
        return self._unsmoothed(W)


class Int4Linear(WeightOnlyLinear):
    """Grouped int4 weight (2- and 3-bit codes fit too); `_weight_int4pack_mm_for_cpu`.

    Columns reordered by act-order quantization (g_idx not ascending) are put back
    in group order once at packing; the input is then permuted the same way per call.
    """

    format = "int4"
    weight: Tensor  # aten's opaque int4 packing
    scales_and_zeros: Tensor  # (in // op_group, out, 2) in compute_dtype
    perm: Tensor | None  # (in,) column order that makes groups contiguous
    _codes: Tensor  # (out, in) uint8 codes in group order

    def __init__(
        self, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int,
        bias: Tensor | None, perm: Tensor | None = None, input_scale: Tensor | None = None,
        compute_dtype: torch.dtype = COMPUTE_DTYPE,
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, input_scale)
        self.compute_dtype = compute_dtype
        if perm is not None:
            codes = codes[:, perm]  # (out, in) in group order
        packed, scales_and_zeros, op_group = ops.int4_pack(codes, scale, zero, group_size, compute_dtype)
        self.op_group = op_group
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("perm", perm)
        # the aten packing is opaque: codes (1 byte each) for the many-rows path
        self.register_buffer("_codes", codes.to(torch.uint8), persistent=False)

    def _matmul(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x[:, self.perm]  # group order, as the weight is stored
        return super()._matmul(x)

    def _smoothed(self, x: Tensor) -> Tensor:
        # the permutation runs first, so the factor must be permuted the same way
        if self.inv_input_scale is None:
            return x
        inv = self.inv_input_scale if self.perm is None else self.inv_input_scale[self.perm]
        return x * inv

    def _packed_matmul(self, x: Tensor) -> Tensor:
        return ops.int4_mm(x, self.weight, self.op_group, self.scales_and_zeros).to(torch.float32)

    def _compute_weight(self) -> Tensor:
        s = self.scales_and_zeros[..., 0].T.repeat_interleave(self.op_group, dim=1)  # (out, in)
        offset = self.scales_and_zeros[..., 1].T.repeat_interleave(self.op_group, dim=1)
        return (self._codes.to(self.compute_dtype) - ops.INT4_CODE_OFFSET) * s + offset

    def dequantized_weight(self) -> Tensor:
        s = self.scales_and_zeros[..., 0].to(torch.float32).T  # (out, G')
        offset = self.scales_and_zeros[..., 1].to(torch.float32).T  # (out, G')
        g_idx = torch.arange(self.in_features) // self.op_group  # (in,)
        W = s[:, g_idx] * (self._codes.to(torch.float32) - ops.INT4_CODE_OFFSET) + offset[:, g_idx]
        if self.perm is not None:
            W = W[:, torch.argsort(self.perm)]  # back to the original column order
        return self._unsmoothed(W)


class W8A8Linear(QuantLinear):
    """int8 weight x int8 activations (per-token dynamic scales).

    The integer GEMM is oneDNN's on a prepacked weight where this build has it (x86:
    AMX/VNNI), else `torch._int_mm`. `fuse=True` compiles the per-token quantization
    (and, on the `_int_mm` path, the dequantization) with `torch.compile`; without a
    working compiler it falls back to eager once, with a warning.
    """

    format = "w8a8"
    weight: Tensor  # (out, in) int8, symmetric
    weight_scale: Tensor  # (out,) fp32
    weight_zero: Tensor  # (out,) int64 zeros, as oneDNN takes them

    def __init__(
        self, codes: Tensor, scale: Tensor, bias: Tensor | None,
        input_scale: Tensor | None = None, fuse: bool = True, use_onednn: bool = True,
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, input_scale)
        self.fuse = fuse
        self.register_buffer("weight", shifted_int8(codes))
        self.register_buffer("weight_scale", scale.to(torch.float32).reshape(-1).contiguous())
        self.register_buffer("weight_zero", torch.zeros(out_features, dtype=torch.int64))
        # oneDNN's blocked copy of the weight (opaque, so not a buffer); None -> torch._int_mm
        self.onednn_weight = ops.onednn_prepack(self.weight) if use_onednn else None

    def _matmul(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        if self.fuse:
            try:
                return self._integer_matmul(x, fuse=True)
            except (RuntimeError, torch._dynamo.exc.TorchDynamoException) as error:
                log.warning("torch.compile of the W8A8 kernel failed (%s); running eager", error)
                self.fuse = False
        return self._integer_matmul(x, fuse=False)

    def _integer_matmul(self, x: Tensor, fuse: bool) -> Tensor:
        if self.onednn_weight is not None:
            return ops.onednn_w8a8_mm(
                x, self.onednn_weight, self.weight_scale, self.weight_zero,
                self.inv_input_scale, self.bias, fuse=fuse,
            )
        weight_t = self.weight.t()  # (in, out) column-major view
        matmul = ops.w8a8_mm_fused() if fuse else ops.w8a8_mm
        return self._add_bias(matmul(x, weight_t, self.weight_scale, self.inv_input_scale))

    def dequantized_weight(self) -> Tensor:
        return self._unsmoothed(self.weight_scale[:, None] * self.weight.to(torch.float32))

    def reference(self, x: Tensor) -> Tensor:
        """Quantizes the activations too, in float64: what the integer kernel computes."""
        input_scale = None if self.inv_input_scale is None else 1.0 / self.inv_input_scale
        y = w8a8_reference(x, self.weight, self.weight_scale, self.bias, input_scale)
        return y


class DequantLinear(QuantLinear):
    """Fallback for shapes the fast ops reject: keep codes, dequantize on every call."""

    format = "dequant"
    codes: Tensor  # (out, in) uint8
    scale: Tensor  # (out, groups) fp32
    zero: Tensor  # (out, groups) fp32
    g_idx: Tensor  # (in,) int64

    def __init__(
        self, codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor,
        bias: Tensor | None, input_scale: Tensor | None = None,
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, input_scale)
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.register_buffer("zero", zero.to(torch.float32).contiguous())
        self.register_buffer("g_idx", g_idx.to(torch.int64).contiguous())

    def _matmul(self, x: Tensor) -> Tensor:
        W = dequantize(self.codes, self.scale, self.zero, self.g_idx)  # (out, in)
        return nn.functional.linear(self._smoothed(x.to(torch.float32)), W, self.bias)

    def dequantized_weight(self) -> Tensor:
        return self._unsmoothed(dequantize(self.codes, self.scale, self.zero, self.g_idx))


def pack_linear(
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    g_idx: Tensor,
    bits: int,
    bias: Tensor | None = None,
    *,
    activation_bits: int | None = None,
    input_scale: Tensor | None = None,
    compute_dtype: torch.dtype = COMPUTE_DTYPE,
    fuse: bool = True,
    use_onednn: bool = True,
) -> QuantLinear:
    """The fastest QuantLinear that runs this weight exactly; `DequantLinear` otherwise.

    codes: (out, in) unsigned; scale, zero: (out, groups); g_idx: (in,) group of
    each input column; input_scale: (in,) SmoothQuant factor or None.
    """
    out_features, in_features = codes.shape
    groups = int(scale.shape[1])
    rejected: list[str] = []
    if activation_bits is not None:
        reason = _w8a8_rejects(bits, groups, zero, activation_bits)
        if reason is None:
            return W8A8Linear(codes, scale, bias, input_scale, fuse=fuse, use_onednn=use_onednn)
        rejected.append(f"w8a8: {reason}")
    if bits == 8:
        reason = ops.int8_rejects(out_features, in_features, groups)
        if reason is None:
            return Int8Linear(codes, scale, zero, bias, input_scale, compute_dtype)
        rejected.append(f"int8: {reason}")
    if bits <= 4:
        perm, group_size = _group_order(g_idx, groups)
        reason = (
            "columns do not form equal contiguous groups" if group_size is None
            else ops.int4_rejects(out_features, in_features, group_size)
        )
        if reason is None and group_size is not None:
            return Int4Linear(codes, scale, zero, group_size, bias, perm, input_scale, compute_dtype)
        rejected.append(f"int4: {reason}")
    log.info(
        "%dx%d %d-bit weight runs dequantized per call (%s)",
        out_features, in_features, bits, "; ".join(rejected) or "no packed op for these bits",
    )
    return DequantLinear(codes, scale, zero, g_idx, bias, input_scale)


def _w8a8_rejects(bits: int, groups: int, zero: Tensor, activation_bits: int) -> str | None:
    if activation_bits != 8:
        return f"activation_bits {activation_bits}; only 8 is supported"
    if bits != 8 or groups != 1:
        return f"{bits}-bit weight with {groups} groups; needs 8-bit, one scale per channel"
    if not bool((zero == 128).all()):
        return "asymmetric weight; torch._int_mm needs zero points of 128 (symmetric)"
    return None


def _group_order(g_idx: Tensor, groups: int) -> tuple[Tensor | None, int | None]:
    """Column order that makes groups contiguous and equal-sized, and their size.

    Returns (None, size) when columns are already in order, (perm, size) when a
    permutation is needed, and (None, None) when groups are of unequal size.
    """
    columns = int(g_idx.numel())
    counts = torch.bincount(g_idx, minlength=groups)
    size = int(counts[0])
    if groups * size != columns or not bool((counts == size).all()):
        return None, None
    if bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None, size
    perm = torch.argsort(g_idx, stable=True)  # (in,)
    return perm, size

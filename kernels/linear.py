"""`QuantLinear` modules: Linear layers whose weights live packed, and whose product
runs on the kernel measured fastest on this machine for their shape and batch size.

`pack_linear` picks the format for one quantized weight:

| format | when | kernels offered (beside the dense ones every layer has) |
|---|---|---|
| `w8a8` | 8-bit symmetric per-channel weight marked for int8 activations | oneDNN int8 GEMM (int8 or 7-bit activations), `torch._int_mm` |
| `int8` | 8-bit, one scale per output channel, in_features % 16 == 0 | `aten._weight_int8pack_mm` with bf16 or fp32 activations |
| `int4` | <= 4 bits, groups of a multiple of 32, out_features % 16 == 0 | `aten._weight_int4pack_mm_for_cpu` with bf16 or fp32 activations |
| `dequant` | anything the packed ops reject | - |

Every layer also offers the dense kernels `dequant_fp32` and `dequant_bf16` (the
weight dequantized per call, then a dense GEMM), so a kernel choice never makes it
slower than its dense base; which kernel runs for each rows bucket is decided by
`kernels/choice.py` (accuracy contract first, then time) and is visible in
`kernel_mix(model)` and `layer.decisions`.

Every module also has `reference(x)`: the product of its stored weight in plain torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from squeezeflow.kernels import ops
from squeezeflow.kernels.choice import Decision, Kernel, default_chooser, row_bucket
from squeezeflow.kernels.reference import INT8_MAX, dequantize, w8a8_reference

log = logging.getLogger(__name__)

BF16 = torch.bfloat16  # activation dtype of the vectorized paths of the weight-only aten ops
DENSE_KERNELS = {torch.float32: "dequant_fp32", BF16: "dequant_bf16", torch.float16: "dequant_fp16"}


class QuantLinear(nn.Module):
    """Base class: a Linear (in_features -> out_features) with a packed weight.

    Subclasses give `dequantized_weight()`, their own `kernels()` and a `signature()`
    of what besides the shape changes kernel speed; the base runs the chosen kernel.
    """

    format: ClassVar[str] = ""
    # Accuracy contract: relative error of any kernel against `reference` on Gaussian
    # inputs. bf16 activations and scales round at 2**-9 relative each; a wrong zero
    # point, scale layout or group mapping errs by O(1).
    tolerance: ClassVar[float] = 0.02
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
        self.decisions: dict[int, Decision] = {}  # rows bucket -> measured choice
        self._chosen: dict[int, Kernel] = {}
        self._forced: str | None = None
        self.last_kernel = ""  # the kernel the latest forward ran

    # ------------------------------------------------------------ running

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32)  # (tokens, in)
        kernel = self._kernel_for(x2.shape[0])
        self.last_kernel = kernel.name
        y = self._add_bias(kernel.run(x2))  # (tokens, out) fp32
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def all_kernels(self) -> list[Kernel]:
        """Every kernel this layer can run here, most accurate first."""
        return [*self.dense_kernels(), *self.kernels()]

    def kernels(self) -> list[Kernel]:
        """The format's own kernels (x (rows, in) fp32 -> (rows, out) fp32, no bias)."""
        return []

    def dense_kernels(self) -> list[Kernel]:
        """The dense product, always a candidate: dequantize per call, then a GEMM.
        Nothing dense stays resident, so memory stays that of the packed weight."""
        def dense(dtype: torch.dtype) -> Kernel:
            def run(x: Tensor) -> Tensor:
                W = self.dequantized_weight(dtype)  # (out, in)
                return nn.functional.linear(x.to(dtype), W).to(torch.float32)
            return Kernel(DENSE_KERNELS[dtype], run)
        dtypes = [torch.float32, BF16] + ([torch.float16] if self._device() == "cuda" else [])
        return [dense(dtype) for dtype in dtypes]

    def force_kernel(self, name: str | None) -> None:
        """Run kernel `name` for every batch size (None: back to the measured choice).
        Raises ValueError naming the kernels this layer offers here."""
        if name is not None and name not in {k.name for k in self.all_kernels()}:
            offered = ", ".join(k.name for k in self.all_kernels())
            raise ValueError(f"{self.format} layer has no kernel {name!r} here; it offers {offered}")
        self._forced = name
        self._chosen.clear()

    def resident_bytes(self) -> int:
        """Bytes this layer keeps in memory: its buffers and any other tensor it holds
        (aten packings, copies of scales in another dtype), each storage counted once."""
        tensors = [*self.buffers(recurse=False),
                   *(value for value in vars(self).values() if isinstance(value, Tensor))]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def signature(self) -> str:
        """What besides format and shape changes which kernel is fastest."""
        return "smoothed" if self.inv_input_scale is not None else ""

    def _kernel_for(self, rows: int) -> Kernel:
        bucket = row_bucket(rows)
        kernel = self._chosen.get(bucket)
        if kernel is not None:
            return kernel
        kernels = {k.name: k for k in self.all_kernels()}
        if self._forced is not None:
            kernel = kernels[self._forced]
        else:
            device = self._device()
            key = (f"{device}|{self.format}|{self.out_features}x{self.in_features}"
                   f"|{self.signature()}|rows<={bucket}")
            decision = default_chooser().choose(
                key, list(kernels.values()), self.reference, self.tolerance,
                probe_rows=bucket, in_features=self.in_features, device=device,
            )
            self.decisions[bucket] = decision
            kernel = kernels[decision.kernel]
        self._chosen[bucket] = kernel
        return kernel

    def _device(self) -> str:
        for tensor in self.buffers():
            return tensor.device.type
        return "cpu"

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y.add_(self.bias)

    # ------------------------------------------------------------ the stored weight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W (out, in) as the layer applies it to its input (smoothing divided back out)."""
        raise NotImplementedError

    def reference(self, x: Tensor) -> Tensor:
        """The layer's product in plain fp32 torch (bias excluded, as kernels return it):
        fp32 products err ~1e-6 relative, far inside every contract, and need no second
        (fp64) copy of the weight while the first kernel choice runs."""
        return nn.functional.linear(x.to(torch.float32), self.dequantized_weight(torch.float32))

    def _smoothed(self, x: Tensor) -> Tensor:
        return x if self.inv_input_scale is None else x * self.inv_input_scale

    def _unsmoothed(self, W: Tensor) -> Tensor:
        if self.inv_input_scale is None:
            return W
        return W * self.inv_input_scale.to(W.dtype)

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.inv_input_scale is not None else ""
        chosen = ", ".join(f"rows<={b}: {d.kernel}" for b, d in sorted(self.decisions.items()))
        return (f"{self.in_features} -> {self.out_features}, format={self.format}{smoothed}"
                + (f", kernels [{chosen}]" if chosen else ""))


def kernel_mix(model: nn.Module) -> dict[str, int]:
    """How many packed layers run each kernel: {"format/kernel": layers}, counting a
    layer once per kernel it has chosen (one per rows bucket it has seen)."""
    counts: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for kernel in sorted({k.name for k in module._chosen.values()}):
                counts[f"{module.format}/{kernel}"] += 1
    return dict(sorted(counts.items()))


def kernel_table(model: nn.Module) -> list[tuple[str, str, int, str, dict[str, float]]]:
    """(layer, format, rows bucket, kernel, ms of each timed candidate) per decision."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for bucket, decision in sorted(module.decisions.items()):
                rows.append((name, module.format, bucket, decision.kernel, decision.ms))
    return rows


def shifted_int8(codes: Tensor) -> Tensor:
    """uint8 codes c -> int8 c - 128, in one byte-wide pass (c ^ 0x80 read as int8)."""
    return torch.bitwise_xor(codes.to(torch.uint8), 0x80).view(torch.int8).contiguous()


class Int8Linear(QuantLinear):
    """int8 weight per output channel; `aten._weight_int8pack_mm`.

    Codes c in [0, 255] with zero z are stored shifted, c' = c - 128 in int8, so
    y = s * (x @ c'.T) - s * (z - 128) * sum(x): the second term vanishes for
    symmetric weights (z = 128) and is kept as `offset` otherwise.
    """

    format = "int8"
    weight: Tensor  # (out, in) int8: codes - 128
    scales: Tensor  # (out,) fp32
    offset: Tensor | None  # (out,) scale * (zero - 128), only for asymmetric weights

    def __init__(
        self, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None,
        input_scale: Tensor | None = None,
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, input_scale)
        s = scale.to(torch.float32).reshape(-1)  # (out,)
        z = zero.to(torch.float32).reshape(-1) - 128  # (out,)
        self.register_buffer("weight", shifted_int8(codes))
        self.register_buffer("scales", s.contiguous())
        self.register_buffer("offset", (s * z) if bool((z != 0).any()) else None)
        self._scales_bf16 = s.to(BF16)  # the aten op wants scales in the activation dtype

    def signature(self) -> str:
        return super().signature() + ("|asym" if self.offset is not None else "")

    def kernels(self) -> list[Kernel]:
        return [Kernel("int8pack_fp32", lambda x: self._packed(x, self.scales)),
                Kernel("int8pack_bf16", lambda x: self._packed(x, self._scales_bf16))]

    def _packed(self, x: Tensor, scales: Tensor) -> Tensor:
        x = self._smoothed(x)  # (rows, in) fp32
        y = ops.int8_weight_only_mm(x.to(scales.dtype), self.weight, scales)  # (rows, out)
        y = y.to(torch.float32)
        if self.offset is not None:
            y = y - x.sum(dim=-1, keepdim=True) * self.offset
        return y

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        W = self.weight.to(dtype) * self.scales.to(dtype)[:, None]  # (out, in)
        if self.offset is not None:
            W = W - self.offset.to(dtype)[:, None]
        return self._unsmoothed(W)


class Int4Linear(QuantLinear):
    """Grouped int4 weight (2- and 3-bit codes fit too); `_weight_int4pack_mm_for_cpu`.

    Only aten's packing is kept (half a byte per weight); the dense kernels read the
    codes back from it (`ops.int4_unpack`). Columns reordered by act-order
    quantization (g_idx not ascending) are put back in group order once at packing;
    the input is then permuted the same way per call.
    """

    format = "int4"
    weight: Tensor  # aten's int4 packing of the codes in group order
    scales_and_zeros: Tensor  # (in // op_group, out, 2) fp32: scale, offset per op group
    perm: Tensor | None  # (in,) column order that makes groups contiguous

    def __init__(
        self, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int,
        bias: Tensor | None, perm: Tensor | None = None, input_scale: Tensor | None = None,
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, input_scale)
        if perm is not None:
            codes = codes[:, perm]  # (out, in) in group order
        packed, scales_and_zeros, op_group = ops.int4_pack(codes, scale, zero, group_size,
                                                           torch.float32)
        self.op_group = op_group
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("perm", perm)
        self._scales_and_zeros_bf16 = scales_and_zeros.to(BF16)

    def signature(self) -> str:
        return super().signature() + f"|g{self.op_group}" + ("|perm" if self.perm is not None else "")

    def kernels(self) -> list[Kernel]:
        return [
            Kernel("int4pack_fp32", lambda x: self._packed(x, self.scales_and_zeros)),
            Kernel("int4pack_bf16", lambda x: self._packed(x, self._scales_and_zeros_bf16)),
        ]

    def _packed(self, x: Tensor, scales_and_zeros: Tensor) -> Tensor:
        if self.perm is not None:
            x = x[:, self.perm]  # group order, as the weight is stored
        x = self._grouped_smoothed(x).to(scales_and_zeros.dtype)
        out = ops.int4_mm(x, self.weight, self.op_group, scales_and_zeros)
        return out.to(torch.float32)

    def _grouped_smoothed(self, x: Tensor) -> Tensor:
        # the permutation runs first, so the factor must be permuted the same way
        if self.inv_input_scale is None:
            return x
        inv = self.inv_input_scale if self.perm is None else self.inv_input_scale[self.perm]
        return x * inv

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        codes = ops.int4_unpack(self.weight, self.out_features, self.in_features)  # (out, in)
        groups = self.in_features // self.op_group
        s = self.scales_and_zeros[..., 0].T.to(dtype)[:, :, None]  # (out, G, 1)
        offset = self.scales_and_zeros[..., 1].T.to(dtype)[:, :, None]  # (out, G, 1)
        W = codes.view(self.out_features, groups, self.op_group).to(dtype)
        W = W.sub_(ops.INT4_CODE_OFFSET).mul_(s).add_(offset)  # (out, G, op_group)
        W = W.view(self.out_features, self.in_features)
        if self.perm is not None:
            W = W[:, torch.argsort(self.perm)]  # back to the original column order
        return self._unsmoothed(W)


class W8A8Linear(QuantLinear):
    """int8 weight x int8 activations (per-token dynamic scales).

    Kernels: oneDNN's int8 GEMM on a prepacked weight (x86; `onednn_s8`), the same
    with 7-bit activations (`onednn_u7`, offered only where a probe shows 8-bit ones
    saturate: CPUs without VNNI),
    `torch._int_mm` (`int_mm`, any CPU, exact), and the dense kernels (no activation
    rounding). Each integer kernel must reproduce its own exact product; the chooser
    drops one that does not (measured: oneDNN's int8 path on AVX2 without VNNI).
    `fuse=True` adds variants whose per-token quantization (and, on the `_int_mm`
    path, the dequantization) is compiled by `torch.compile`; without a working
    compiler they fail their contract and the eager ones run.
    """

    format = "w8a8"
    # The dense kernels skip activation rounding (more accurate); the integer ones err
    # by the rounding of activations to 7 or 8 bits per token: ~1 % on Gaussian inputs.
    tolerance = 0.05
    weight: Tensor  # (out, in) int8, symmetric
    weight_scale: Tensor  # (out,) fp32
    weight_zero: Tensor  # (out,) int64 zeros, as oneDNN takes them

    def __init__(
        self, codes: Tensor, scale: Tensor, bias: Tensor | None,
        input_scale: Tensor | None = None, fuse: bool = True,
    ) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, input_scale)
        self.fuse = fuse
        self.register_buffer("weight", shifted_int8(codes))
        self.register_buffer("weight_scale", scale.to(torch.float32).reshape(-1).contiguous())
        self.register_buffer("weight_zero", torch.zeros(out_features, dtype=torch.int64))
        # oneDNN's blocked copy of the weight (opaque, so not a buffer); None: no oneDNN
        self.onednn_weight = ops.onednn_prepack(self.weight)

    def kernels(self) -> list[Kernel]:
        """Integer kernels, eager and (with `fuse`) with the quantization compiled by
        torch.compile: both are candidates, as compiled code is only trusted once it
        has met the contract (measured: with ATEN_CPU_CAPABILITY=avx2 on an AVX512
        CPU, the compiled quantization rounded wrong codes)."""
        variants: list[tuple[str, Callable[[Tensor, bool], Tensor], int]] = []
        if self.onednn_weight is not None:
            variants.append(("onednn_s8", lambda x, fuse: self._onednn(x, INT8_MAX, fuse), INT8_MAX))
            if ops.onednn_int8_saturates():  # 7-bit activations only where 8-bit ones fail
                variants.append(("onednn_u7", lambda x, fuse: self._onednn(
                    x, ops.REDUCED_LEVELS, fuse), ops.REDUCED_LEVELS))
        variants.append(("int_mm", self._int_mm, INT8_MAX))
        kernels = []
        for name, run, levels in variants:
            def exact(x: Tensor, levels: int = levels) -> Tensor:
                return self.exact_product(x, levels)
            kernels.append(Kernel(name, lambda x, run=run: run(x, False), exact=exact))
            if self.fuse:
                kernels.append(Kernel(f"{name}_fused", lambda x, run=run: run(x, True), exact=exact))
        return kernels

    def _onednn(self, x: Tensor, levels: int, fuse: bool) -> Tensor:
        assert self.onednn_weight is not None
        return ops.onednn_w8a8_mm(
            x, self.onednn_weight, self.weight_scale, self.weight_zero, self.inv_input_scale,
            None, fuse=fuse, levels=levels,
        )

    def _int_mm(self, x: Tensor, fuse: bool) -> Tensor:
        weight_t = self.weight.t()  # (in, out) column-major view
        matmul = ops.w8a8_mm_fused() if fuse else ops.w8a8_mm
        return matmul(x, weight_t, self.weight_scale, self.inv_input_scale)

    def exact_product(self, x: Tensor, levels: int = INT8_MAX) -> Tensor:
        """What an integer kernel computes, in float64 (bias excluded)."""
        input_scale = None if self.inv_input_scale is None else 1.0 / self.inv_input_scale
        return w8a8_reference(x, self.weight, self.weight_scale, None, input_scale, levels)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._unsmoothed(self.weight_scale.to(dtype)[:, None] * self.weight.to(dtype))


class DequantLinear(QuantLinear):
    """Fallback for shapes the packed ops reject: codes kept, dequantized per call."""

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

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        W = dequantize(self.codes, self.scale, self.zero, self.g_idx)
        return self._unsmoothed(W).to(dtype)


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
    fuse: bool = True,
) -> QuantLinear:
    """The packed QuantLinear for this weight; `DequantLinear` when no packed op takes it.

    codes: (out, in) unsigned; scale, zero: (out, groups); g_idx: (in,) group of
    each input column; input_scale: (in,) SmoothQuant factor or None.
    """
    out_features, in_features = codes.shape
    groups = int(scale.shape[1])
    rejected: list[str] = []
    if activation_bits is not None:
        reason = _w8a8_rejects(bits, groups, zero, activation_bits)
        if reason is None:
            return W8A8Linear(codes, scale, bias, input_scale, fuse=fuse)
        rejected.append(f"w8a8: {reason}")
    if bits == 8:
        reason = ops.int8_rejects(out_features, in_features, groups)
        if reason is None:
            return Int8Linear(codes, scale, zero, bias, input_scale)
        rejected.append(f"int8: {reason}")
    if bits <= 4:
        perm, group_size = _group_order(g_idx, groups)
        reason = (
            "columns do not form equal contiguous groups" if group_size is None
            else ops.int4_rejects(out_features, in_features, group_size)
        )
        if reason is None:
            try:
                ops.int4_layout(out_features)
            except (ValueError, RuntimeError) as error:  # laid out otherwise, or no such op
                reason = f"int4 packing unavailable here: {error}".splitlines()[0]
        if reason is None and group_size is not None:
            return Int4Linear(codes, scale, zero, group_size, bias, perm, input_scale)
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
        return "asymmetric weight; the int8 GEMMs need zero points of 128 (symmetric)"
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

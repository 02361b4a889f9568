"""`bitstack`: residual blocks of sign bits and low-rank magnitudes (`BitStackWeight`),
loadable under any memory budget (Wang et al. 2024; the math is in
compression/quantization/bitstack/math.py).

    W ~= (sum over loaded blocks i of sign_i * (U_i V_i^T)) diag(s)^-1

Stored per Linear `NAME`, one tensor per block so that a budget reads whole tensors:
- `NAME.scale`: (in,) fp16 activation-aware column scales s;
- `NAME.signs.<i>`: block i's sign bits, packed 8 per byte (`qweight.pack_bits`, 1 bit);
- `NAME.u.<i>`: (out, k) fp16 and `NAME.v.<i>`: (k, in) fp16, block i's factors;
and in squeezeflow.json its shape, rank k, `blocks` (stored in this file), `niter`
(made by the decomposition) and `order`: each block's position in the model-wide
importance order.

Memory budget (`load_compressed(path, memory_budget_mb=...)`, see `fit_memory_budget`):
the budget counts the bytes of the tensors read from model.safetensors (MiB, 2**20
bytes). Every tensor that is not a block (embeddings, norms, the head, the scales) is
read; then blocks are taken in importance order, the longest prefix of the order whose
bytes fit. Each Linear so gets a prefix of its own stack. Saving the loaded model
writes exactly those blocks (`quantization/bitstack/budget.py: write_budget`).

Accuracy contract: the runtime module (`BitStackLinear`) keeps the packed blocks
(1 bit + the factors per weight, not a dense copy) and rebuilds the weight with the
reference's own arithmetic (`math.reconstruct`, fp32 from the fp16 factors) on each
call, so it matches the reference product to fp32 rounding: within 1e-5 relative.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.formats.base import Take, WeightFormat, register_format
from squeezeflow.compression.quantization.bitstack.math import reconstruct
from squeezeflow.compression.quantization.bitstack.stored import BITSTACK_ATTR, BitStackWeight

log = logging.getLogger(__name__)

MIB = 2**20  # memory budgets are in MiB, like the evaluation's weights_mb


@register_format
class BitStackFormat(WeightFormat[BitStackWeight]):
    name = "bitstack"
    attr = BITSTACK_ATTR
    stored_type = BitStackWeight
    tolerance = 1e-5  # same fp32 arithmetic as the reference; summation order only

    def spec(self, stored: BitStackWeight) -> dict[str, Any]:
        return {
            "shape": list(stored.shape),
            "rank": stored.rank,
            "blocks": stored.blocks,
            "niter": stored.niter,
            "order": [int(position) for position in stored.order],
        }

    def tensors(self, name: str, stored: BitStackWeight) -> dict[str, Tensor]:
        tensors = {f"{name}.scale": stored.scale.to(torch.float16).contiguous()}
        for i in range(stored.blocks):
            tensors[f"{name}.signs.{i}"] = stored.signs[i].contiguous()
            tensors[f"{name}.u.{i}"] = stored.U[i].contiguous()
            tensors[f"{name}.v.{i}"] = stored.V[i].contiguous()
        return tensors

    def read(self, name: str, spec: dict[str, Any], take: Take) -> BitStackWeight:
        scale = take("scale")
        parts = [(take(f"signs.{i}"), take(f"u.{i}"), take(f"v.{i}")) for i in range(spec["blocks"])]
        if scale is None or not parts or any(t is None for part in parts for t in part):
            raise ValueError(
                f"packed tensors of {name} are incomplete (scale, and signs/u/v of "
                f"{spec['blocks']} blocks)"
            )
        signs, U, V = (torch.stack([part[j] for part in parts]) for j in range(3))  # type: ignore[misc]
        return BitStackWeight(
            signs=signs, U=U, V=V, scale=scale.to(torch.float32),
            order=torch.tensor(spec["order"][: spec["blocks"]], dtype=torch.int64),
            niter=spec["niter"],
        )

    def runtime(self, module: nn.Module, stored: BitStackWeight, *, fuse: bool = True) -> nn.Module:
        bias = getattr(module, "bias", None)
        return BitStackLinear(stored, bias.detach() if isinstance(bias, Tensor) else None)


class BitStackLinear(nn.Module):
    """Runs a `BitStackWeight` from its packed blocks: memory ~ the loaded blocks' bytes.

    Each call rebuilds the dense weight (one rank-k product and one sign unpack per
    block) and multiplies: slower than a dense Linear, by design smaller in memory.
    """

    format = "bitstack"
    signs: Tensor
    U: Tensor
    V: Tensor
    scale: Tensor
    order: Tensor
    bias: Tensor | None

    def __init__(self, stored: BitStackWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = stored.shape
        self.niter = stored.niter
        self.register_buffer("signs", stored.signs)  # (blocks, bytes) uint8
        self.register_buffer("U", stored.U)  # (blocks, out, k) fp16
        self.register_buffer("V", stored.V)  # (blocks, k, in) fp16
        self.register_buffer("scale", stored.scale)  # (in,) float32
        self.register_buffer("order", stored.order)  # (blocks,) int64
        self.register_buffer("bias", bias)

    @property
    def stored(self) -> BitStackWeight:
        return BitStackWeight(signs=self.signs, U=self.U, V=self.V, scale=self.scale,
                              order=self.order, niter=self.niter)

    def forward(self, x: Tensor) -> Tensor:
        W = reconstruct(self.signs, self.U, self.V, self.scale)  # (out, in)
        bias = self.bias
        return nn.functional.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={int(self.U.shape[0])}/{self.niter}, rank={int(self.U.shape[2])}")


# --- memory budgets ---------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetPlan:
    """What a memory budget loads from one BitStack artifact."""

    budget_bytes: int | None  # None: everything stored
    fixed_bytes: int  # every stored tensor that is not a block (always read)
    block_bytes: int  # the loaded blocks
    loaded: dict[str, int]  # Linear -> blocks loaded
    stored: dict[str, int]  # Linear -> blocks in the file
    minimum_bytes: int  # the smallest loadable size: one block of every Linear
    skipped: frozenset[str] = field(default_factory=frozenset)  # block tensors not read

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.block_bytes

    @property
    def blocks_loaded(self) -> int:
        return sum(self.loaded.values())

    @property
    def blocks_stored(self) -> int:
        return sum(self.stored.values())


def block_tensor_names(layer: str, index: int) -> tuple[str, str, str]:
    return f"{layer}.signs.{index}", f"{layer}.u.{index}", f"{layer}.v.{index}"


def plan_memory_budget(
    layers: dict[str, dict[str, Any]], tensor_bytes: dict[str, int], budget_bytes: int | None
) -> BudgetPlan:
    """The longest prefix of the importance order whose blocks fit in `budget_bytes`.

    `layers`: {Linear: its bitstack spec}; `tensor_bytes`: {tensor name: bytes} of every
    tensor in the file. Raises ValueError below the minimum (a Linear without a block
    has no weight at all).
    """
    ranked: list[tuple[int, str, int, int]] = []  # (position, layer, index, bytes)
    for layer, spec in layers.items():
        order = spec["order"][: spec["blocks"]]
        if any(b <= a for a, b in zip(order, order[1:], strict=False)):
            raise ValueError(f"{layer}: block positions must increase along its stack, got {order}")
        for index, position in enumerate(order):
            size = sum(tensor_bytes[name] for name in block_tensor_names(layer, index))
            ranked.append((int(position), layer, index, size))
    ranked.sort()
    all_blocks = sum(size for *_, size in ranked)
    fixed = sum(tensor_bytes.values()) - all_blocks
    cumulative, prefix_bytes = 0, [0]
    for *_, size in ranked:
        cumulative += size
        prefix_bytes.append(cumulative)
    # the smallest loadable prefix ends with the last first block of any Linear
    shortest = max((rank + 1 for rank, (_, _, index, _) in enumerate(ranked) if index == 0), default=0)
    minimum = fixed + prefix_bytes[shortest]
    if budget_bytes is None:
        count = len(ranked)
    else:
        if budget_bytes < minimum:
            raise ValueError(
                f"memory_budget_mb={budget_bytes / MIB:.4g} is below the smallest loadable "
                f"size of this BitStack model, {minimum / MIB:.4g} MiB (every tensor that is "
                f"not a block, {fixed / MIB:.4g} MiB, plus the first block of each Linear)"
            )
        count = max(n for n in range(len(ranked) + 1) if fixed + prefix_bytes[n] <= budget_bytes)
    loaded = {layer: 0 for layer in layers}
    for _, layer, index, _ in ranked[:count]:
        loaded[layer] = max(loaded[layer], index + 1)
    skipped = {
        name for _, layer, index, _ in ranked[count:] for name in block_tensor_names(layer, index)
    }
    return BudgetPlan(
        budget_bytes=budget_bytes, fixed_bytes=fixed, block_bytes=prefix_bytes[count],
        loaded=loaded, stored={layer: spec["blocks"] for layer, spec in layers.items()},
        minimum_bytes=minimum, skipped=frozenset(skipped),
    )


def safetensors_bytes(path: Path) -> dict[str, int]:
    """{tensor name: bytes of its data} from a safetensors file's header (no data read)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header: dict[str, Any] = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return {name: int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
            for name, entry in header.items()}


def fit_memory_budget(
    specs: dict[str, dict[str, Any]], weights_file: Path, memory_budget_mb: float
) -> tuple[dict[str, dict[str, Any]], frozenset[str]]:
    """{format: {layer: spec}} cut down to the blocks that fit, and the tensors not to read.

    What `load_compressed(path, memory_budget_mb=...)` calls before reading any layer.
    """
    layers = specs.get(BitStackFormat.name, {})
    if not layers:
        raise ValueError(
            f"{weights_file.parent}: memory_budget_mb applies to BitStack models, and this one "
            "has no bitstack layers"
        )
    plan = plan_memory_budget(layers, safetensors_bytes(weights_file), int(memory_budget_mb * MIB))
    log.info(
        "bitstack: %d of %d blocks fit in %.4g MiB (%.4g MiB read: %.4g MiB blocks + %.4g MiB "
        "other tensors)", plan.blocks_loaded, plan.blocks_stored, memory_budget_mb,
        plan.total_bytes / MIB, plan.block_bytes / MIB, plan.fixed_bytes / MIB,
    )
    cut = {
        layer: {**spec, "blocks": plan.loaded[layer], "order": spec["order"][: plan.loaded[layer]]}
        for layer, spec in layers.items()
    }
    return {**specs, BitStackFormat.name: cut}, plan.skipped

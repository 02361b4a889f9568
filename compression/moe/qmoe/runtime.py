"""Runtime modules of QMoE-coded weights: every call decodes, then multiplies.

The paper's GPU kernel fuses decoding into a matrix-vector product (one warp per row);
on CPU decoding a matrix is one table gather over its codewords (`coding.lookup_digits`)
and one gather of the row levels, then a dense fp32 matmul. Only the coded stream
(~1 bit per weight) stays resident; the dense matrix exists during the call.

- `TernaryLinear` runs a Linear (`weight` (out, in)).
- `TernaryExperts` runs stacked MoE experts (`gate_up_proj` (E, 2I, H), `down_proj`
  (E, H, I), Mixtral's layout in transformers 5) like their eager forward: per expert
  that any token is routed to, decode its two matrices and apply them to its tokens.

The plain-torch reference both are checked against is `TernaryWeight.tensor(name)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.moe.qmoe.coding import lookup_digits
from squeezeflow.compression.moe.qmoe.weight import WEIGHT, TernaryWeight, level_table

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # transformers' stacked expert weights


class _Decoder(nn.Module):
    """The coded stream, the row levels and the dictionary's tables, as buffers."""

    stream: Tensor
    level_codes: Tensor
    level_scales: Tensor
    table_digits: Tensor
    table_lengths: Tensor
    table_levels: Tensor

    def __init__(self, stored: TernaryWeight) -> None:
        super().__init__()
        dictionary = stored.dictionary
        self.register_buffer("stream", stored.stream.clone())  # (words,) int16
        self.register_buffer("level_codes", stored.level_codes.clone())  # (rows, 2) uint8
        self.register_buffer("level_scales", stored.level_scales.clone())  # (matrices,) float32
        # rebuilt from the 9 pair costs and a constant, so not saved with the module
        self.register_buffer("table_digits", dictionary.digits, persistent=False)
        self.register_buffer("table_lengths", dictionary.lengths.to(torch.uint8), persistent=False)  # <= 14
        self.register_buffer("table_levels", level_table(), persistent=False)
        self.offsets = [int(o) for o in stored.offsets]  # word offset of each matrix
        self.layouts = {name: stored.layout(name) for name in stored.names}

    def matrix(self, name: str, index: int = 0) -> Tensor:
        """Decode matrix `index` of parameter `name`: (out, in) float32."""
        first, _, rows, columns, first_row = self.layouts[name]
        m = first + index
        words = self.stream[self.offsets[m] : self.offsets[m + 1]]
        digits = lookup_digits(words, self.table_digits, self.table_lengths)[: rows * columns]
        row = first_row + index * rows
        codes = self.level_codes[row : row + rows].to(torch.int64)  # (out, 2): |min|, max
        magnitude = self.level_scales[m] * self.table_levels[codes]  # (out, 2)
        # values of digit 0, 1 (the row's min), 2 (its max)
        levels = torch.stack([torch.zeros(rows), -magnitude[:, 0], magnitude[:, 1]], dim=1)  # (out, 3)
        return levels.gather(1, digits.reshape(rows, columns).to(torch.int64))


class TernaryLinear(nn.Module):
    """A Linear whose QMoE-coded weight is decoded on every call."""

    format = "qmoe"
    bias: Tensor | None

    def __init__(self, stored: TernaryWeight, bias: Tensor | None) -> None:
        super().__init__()
        if stored.names != (WEIGHT,):
            raise ValueError(f"TernaryLinear runs a Linear's weight; got {', '.join(stored.names)}")
        self.out_features, self.in_features = stored.shape
        self.decoder = _Decoder(stored)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        W = self.decoder.matrix(WEIGHT)  # (out, in)
        bias = self.bias
        return nn.functional.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))


class TernaryExperts(nn.Module):
    """Stacked MoE experts whose QMoE-coded matrices are decoded per call, per expert used."""

    format = "qmoe"

    def __init__(self, experts: nn.Module, stored: TernaryWeight) -> None:
        super().__init__()
        if stored.names != EXPERT_PARAMETERS:
            raise ValueError(f"TernaryExperts runs {EXPERT_PARAMETERS}; got {stored.names}")
        self.num_experts = int(stored.shapes[0][1][0])
        self.act_fn: Any = experts.act_fn  # type: ignore[union-attr]
        self.decoder = _Decoder(stored)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden_states: (tokens, H); top_k_index, top_k_weights: (tokens, k)."""
        final = torch.zeros_like(hidden_states)  # (tokens, H)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:
                continue  # transformers marks dropped routes with num_experts
            token, slot = torch.where(top_k_index == expert)  # (routed,)
            x = hidden_states[token]  # (routed, H)
            W_gate_up = self.decoder.matrix("gate_up_proj", expert).to(x.dtype)  # (2I, H)
            gate, up = nn.functional.linear(x, W_gate_up).chunk(2, dim=-1)  # (routed, I) each
            W_down = self.decoder.matrix("down_proj", expert).to(x.dtype)  # (H, I)
            y = nn.functional.linear(self.act_fn(gate) * up, W_down)  # (routed, H)
            y = y * top_k_weights[token, slot, None]
            final.index_add_(0, token, y.to(final.dtype))
        return final

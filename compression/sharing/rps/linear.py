"""The stored value of one Stable-RPS layer (`RPSWeight`) and the module that runs it.

`RPSLinear` computes W = s * g * z[idx] from the shared z, so that training (the
`distill` step) moves z itself: z is one nn.Parameter held by every RPSLinear of the
model (the same object, counted and updated once) and each layer's scale s is its own
Parameter. idx and g are regenerated from the seed (`math.layer_map`), never saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from squeezeflow.compression.sharing.rps.math import Hashing, Mapping, layer_map, shared_weight

RPS_ATTR = "squeezeflow_rps"  # attribute carrying a plain Linear's RPSWeight


@dataclass(frozen=True)
class RPSWeight:
    """One layer's share of z: W = scale * g * z[idx], idx and g from the seed."""

    z: Tensor  # (m,) the array every RPS layer of the model reads (one storage)
    scale: Tensor  # (1,) s_i, the layer's scale
    shape: tuple[int, int]  # (out, in)
    offset: int  # o_i: position of W[0, 0] among all shared weights laid end to end
    seed: int
    chunk_size: int
    mapping: Mapping = "randomfold"

    @property
    def hashing(self) -> Hashing:
        return Hashing(seed=self.seed, slots=self.z.numel(), chunk_size=self.chunk_size,
                       mapping=self.mapping)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight (out, in): the plain-torch reference of every RPS runtime."""
        idx, g = layer_map(self.hashing, self.offset, self.shape)
        z = self.z.detach()
        return shared_weight(z, idx.to(z.device), g.to(z.device), self.scale.detach()).to(dtype)


class RPSLinear(nn.Module):
    """y = x W^T + b with W = s * g * z[idx] computed from the shared z.

    While z or s train (grad enabled and either requires grad), W is computed at every
    call from idx and g (kept while training). Otherwise (evaluation, generation) W is
    computed once and kept until z or s change (their version counters), and idx and g
    are dropped meanwhile: inference then runs at the dense product's speed and holds
    the dense W and z, where keeping the map would cost 5 bytes a weight more (int32
    index, int8 sign) and a gather per call. The map is regenerated when needed again.
    """

    z: nn.Parameter
    scale: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, z: nn.Parameter, scale: nn.Parameter, shape: tuple[int, int], offset: int,
                 hashing: Hashing, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if hashing.slots != z.numel():
            raise ValueError(f"z has {z.numel()} slots, the map was made for {hashing.slots}")
        self.out_features, self.in_features = shape
        self.offset, self.hashing = offset, hashing
        self.z = z  # (m,) shared: the very same Parameter in every RPSLinear of a model
        self.scale = scale  # (1,)
        self.register_parameter("bias", bias)
        self._map: tuple[Tensor, Tensor] | None = None  # (idx, g), regenerated, never saved
        self._frozen: tuple[tuple[object, ...], Tensor] | None = None  # (key, W) for inference

    @classmethod
    def from_stored(cls, stored: RPSWeight, bias: Tensor | None = None) -> RPSLinear:
        """A module on `stored` (its z and scale become Parameters on the same storage)."""
        parameter_bias = None
        if bias is not None:
            parameter_bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
        return cls(nn.Parameter(stored.z.detach()), nn.Parameter(stored.scale.detach()),
                   stored.shape, stored.offset, stored.hashing, parameter_bias)

    def index_and_signs(self) -> tuple[Tensor, Tensor]:
        """idx: (out, in) slots of z and g: (out, in) signs, regenerated from the seed."""
        if self._map is None or self._map[0].device != self.z.device:
            idx, g = layer_map(self.hashing, self.offset, (self.out_features, self.in_features))
            self._map = (idx.to(self.z.device), g.to(self.z.device))
        return self._map

    @property
    def weight(self) -> Tensor:
        """W: (out, in), differentiable in z and s."""
        idx, g = self.index_and_signs()
        return shared_weight(self.z, idx, g, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (self.z.requires_grad or self.scale.requires_grad):
            self._frozen = None
            return nn.functional.linear(x, self.weight, self.bias)
        return nn.functional.linear(x, self._frozen_weight(), self.bias)

    def _frozen_weight(self) -> Tensor:
        """W for calls that train nothing: kept while z and s are unchanged."""
        z, scale = self.z, self.scale
        key = (z._version, scale._version, z.data_ptr(), scale.data_ptr(), z.device, z.dtype)
        if self._frozen is None or self._frozen[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, reusable anywhere
                W = shared_weight(z, *self.index_and_signs(), scale)
            self._frozen, self._map = (key, W), None
        return self._frozen[1]

    def stored(self) -> RPSWeight:
        """What this layer stores: z and its scale (live values), and the map's parameters."""
        h = self.hashing
        return RPSWeight(z=self.z.detach(), scale=self.scale.detach(),
                         shape=(self.out_features, self.in_features), offset=self.offset,
                         seed=h.seed, chunk_size=h.chunk_size, mapping=h.mapping)

    def extra_repr(self) -> str:
        h = self.hashing
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"offset={self.offset}, slots={h.slots}, chunk_size={h.chunk_size}, "
                f"seed={h.seed}, mapping={h.mapping}, bias={self.bias is not None}")

"""Stable-RPS: every shared weight reads one parameter array z through a hashed map.

Desai & Shrivastava 2024, "In defense of parameter sharing for model compression"
(ICLR). The shared weights of the model (Linear weights W_i: (out_i, in_i)) are laid
end to end in one virtual array of n = sum_i out_i * in_i numbers; weight (r, c) of
layer i sits at position

    P = o_i + r * in_i + c                        (o_i: the layer's offset)

and reads

    W_i[r, c] = s_i * g(P) * z[h(P)]              z: (m,), m ~= ratio * n

with g(P) in {-1, +1} a hashed sign and s_i the layer's scale (the paper's lambda_i:
layers of different magnitude share one z in one unit). h is RANDOMFOLD: the
virtual array is cut into folds of m positions, each fold into chunks of Z
consecutive positions, and the chunks of fold q land on the chunks of z in a
random order of their own (a permutation pi_q, the ranks of hashed chunk numbers):

    q = P // m,  w = P % m,  k = w // Z,  lane = w % Z
    h(P) = pi_q(k) * Z + lane

so every slot of z is read by floor(n/m) or ceil(n/m) weights (the optimal load
factor), chunks of Z weights stay contiguous in z, and m = n maps one weight per
slot (no sharing: the model is reproduced, the paper's Pareto continuity). The
`identity` mapping (h(P) = P % m, g = +1) is plain folding without hashing.

Everything here is a function of (seed, m, Z, o_i, shape): nothing of the map is
stored. The hash is a 32-bit integer mixer in int64 arithmetic (shifts, xors, masks and
products below 2**59; no random number generator), so the map does not depend on
torch's generators, the device or the process.

The paper's other stability fix scales each slot's gradient by a fixed factor (from the
lambda_i of the weights reading it) so that plain SGD updates every layer at its own
scale. It is not applied here: the `distill` step trains with AdamW, whose per-element
normalisation cancels any fixed per-slot factor of the gradient; with s_i keeping z in
the weights' own unit, Adam's steps on z move each layer's weights by about what they
would move the dense weights.

The paper applies RPS at the start of training; here it follows a trained model, so
z starts as the least-squares fit to the trained weights (`initial_memory`): each
slot the s_i^2-weighted average of the sign-corrected, scale-normalised weights that
map to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from squeezeflow.compression.sharing.rps.config import Mapping

MASK32 = 0xFFFFFFFF
MIX = 0x45D9F3B  # odd 27-bit multiplier of a well-mixing 32-bit hash; x * MIX < 2**59 fits int64
SIGN_SALT, CHUNK_SALT = 1, 2  # the two hashes drawn from one seed (signs, chunk order)


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash of x (int64, values in [0, 2**32)): two multiply-xorshift rounds."""
    x = ((x >> 16) ^ x) * MIX & MASK32
    x = ((x >> 16) ^ x) * MIX & MASK32
    return (x >> 16) ^ x


def salt(seed: int, stream: int) -> int:
    """A 32-bit salt for one hash stream of `seed` (the same mixer on one number)."""
    golden = 0x9E3779B1  # 2**32 / golden ratio (Knuth's multiplicative hash): spreads seeds 0, 1, ...
    value = mix32(torch.tensor([(seed * golden + stream) & MASK32], dtype=torch.int64))
    return int(value.item())


def hash32(x: Tensor, salt_value: int) -> Tensor:
    """Hash of non-negative int64 x (any size: the high 32 bits are mixed in too)."""
    low, high = x & MASK32, x >> 32
    return mix32(mix32(low ^ salt_value) ^ high)


def memory_slots(shared: int, ratio: float, chunk_size: int) -> int:
    """m: `ratio` of the `shared` weights, rounded up to whole chunks (at least one)."""
    return max(chunk_size, math.ceil(ratio * shared / chunk_size) * chunk_size)


@dataclass(frozen=True)
class Hashing:
    """What the map of one model depends on: the seed, |z| and the chunk size."""

    seed: int
    slots: int  # m = |z|, a multiple of chunk_size
    chunk_size: int  # Z
    mapping: Mapping = "randomfold"


def fold_permutation(hashing: Hashing, fold: int) -> Tensor:
    """pi_q: (chunks,) int64, the chunk of z that chunk k of fold `fold` lands on."""
    chunks = hashing.slots // hashing.chunk_size
    numbers = fold * chunks + torch.arange(chunks, dtype=torch.int64)  # global chunk numbers
    keys = hash32(numbers, salt(hashing.seed, CHUNK_SALT))  # (chunks,)
    order = torch.argsort(keys, stable=True)  # chunk numbers by key
    rank = torch.empty_like(order)
    rank[order] = torch.arange(chunks, dtype=torch.int64)
    return rank


def layer_map(hashing: Hashing, offset: int, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """idx: (out, in) slots of z (int32 below 2**31 slots) and g: (out, in) int8 signs."""
    out_features, in_features = shape
    index_dtype = torch.int32 if hashing.slots < 2**31 else torch.int64  # 4 bytes a weight
    P = offset + torch.arange(out_features * in_features, dtype=torch.int64)  # (out * in,)
    m, Z = hashing.slots, hashing.chunk_size
    if hashing.mapping == "identity":
        idx = P % m
        g = torch.ones_like(P, dtype=torch.int8)
        return idx.to(index_dtype).reshape(shape), g.reshape(shape)
    q, w = P // m, P % m  # fold, position within the fold
    k, lane = w // Z, w % Z  # chunk within the fold, position within the chunk
    idx = torch.empty_like(P)
    for fold in range(int(q[0]), int(q[-1]) + 1):  # a layer spans few folds
        here = q == fold
        idx[here] = fold_permutation(hashing, fold)[k[here]] * Z + lane[here]
    bit = hash32(P, salt(hashing.seed, SIGN_SALT)) >> 31  # top bit of the hash: 0 or 1
    g = (1 - 2 * bit).to(torch.int8)  # (out * in,) in {-1, +1}
    return idx.to(index_dtype).reshape(shape), g.reshape(shape)


def shared_weight(z: Tensor, idx: Tensor, g: Tensor, s: Tensor) -> Tensor:
    """W = s * g * z[idx]: (out, in) from z: (m,), idx, g: (out, in), s: (1,)."""
    return z[idx] * (g * s)  # g * s is exact (+-s), so W is exact wherever z[idx] is


def power_of_two_scales(weights: list[Tensor]) -> list[float]:
    """s_i: each layer's RMS over the RMS of all shared weights, rounded to a power of two.

    The paper's lambda_i puts layers of different magnitude into one unit for z; here
    z stays in the unit of the weights themselves (so a fine-tuning learning rate
    meant for the dense weights fits z), and a power of two makes s_i * (W / s_i)
    exact, so that a map without sharing reproduces the weights bit for bit.
    """
    squares = [float(W.double().pow(2).sum()) for W in weights]
    total_rms = math.sqrt(sum(squares) / max(1, sum(W.numel() for W in weights)))
    scales = []
    for W, square in zip(weights, squares, strict=True):
        rms = math.sqrt(square / max(1, W.numel()))
        scales.append(1.0 if rms == 0 or total_rms == 0 else 2.0 ** round(math.log2(rms / total_rms)))
    return scales


def initial_memory(
    weights: list[Tensor], maps: list[tuple[Tensor, Tensor]], scales: list[float], slots: int
) -> Tensor:
    """z: (m,) minimizing sum_i ||W_i - s_i g_i z[idx_i]||^2 for the given maps and scales.

    Slot j: z_j = sum_{i,P -> j} s_i g(P) W_i(P) / sum_{i,P -> j} s_i^2, the s_i^2-weighted
    average of g W_i / s_i over the weights that read it (0 where none does).
    """
    device = weights[0].device
    numerator = torch.zeros(slots, dtype=torch.float64, device=device)
    denominator = torch.zeros(slots, dtype=torch.float64, device=device)
    for W, (idx, g), s in zip(weights, maps, scales, strict=True):
        flat = idx.reshape(-1).to(torch.int64)  # (out * in,)
        numerator.index_add_(0, flat, (s * g.to(torch.float64) * W.to(torch.float64)).reshape(-1))
        denominator.index_add_(0, flat, torch.full((flat.numel(),), s * s, dtype=torch.float64, device=device))
    z = numerator / denominator.clamp(min=torch.finfo(torch.float64).tiny)  # (m,)
    return torch.where(denominator > 0, z, torch.zeros_like(z))


def load_factor(maps: list[tuple[Tensor, Tensor]], slots: int) -> Tensor:
    """(m,) int64: how many weights read each slot of z."""
    counts = torch.zeros(slots, dtype=torch.int64)
    for idx, _ in maps:
        counts += torch.bincount(idx.reshape(-1).to(torch.int64), minlength=slots).cpu()
    return counts

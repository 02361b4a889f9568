"""BitStack: a weight as a stack of ~1-bit residual blocks, any prefix of which is a model
(Wang et al. 2024, "BitStack: Any-Size Compression of Large Language Models in Variable
Memory Environments", Sec. 2).

1. Activation-aware scaling (Sec. 2.1): the error that matters is the layer's output
   error ||(W - W_hat) X^T||, and with s_j the RMS of input channel j over calibration
   tokens, ||(W - W_hat) diag(s)||_F is its diagonal estimate. So the weight is
   decomposed in the scaled space W_s = W diag(s) and mapped back by diag(s)^-1.
2. Absolute-value decomposition (AVD, Sec. 2.1): W_s = sign(W_s) * |W_s|, and |W_s|,
   non-negative and smooth, is close to low rank: |W_s| ~ U V^T, the rank-k truncated
   SVD with sqrt(Sigma) given to each side. A block is (packed signs, U, V).
3. Iterative AVD: R_0 = W_s; block i approximates what the blocks before it missed,
       B_i = sign(R_{i-1}) * (U_i V_i^T),   U_i V_i^T ~ |R_{i-1}|,   R_i = R_{i-1} - B_i.
   Since R_{i-1} - B_i = sign(R_{i-1}) * (|R_{i-1}| - U_i V_i^T) elementwise,
   ||R_i||_F = || |R_{i-1}| - U_i V_i^T ||_F < ||R_{i-1}||_F whenever R_{i-1} != 0:
   the error falls with every block.
4. Any prefix of the blocks is a weight: W_hat_j = (B_1 + ... + B_j) diag(s)^-1.

A block costs one sign bit per weight plus k (out + in) fp16 factors:
    bits per weight of a block = 1 + 16 k (out + in) / (out * in)
so k = 16 costs 0.125 extra bits on a 4096 x 4096 layer (the paper's k) but 6 extra bits
on a 64 x 128 one. `rank_for_factor_bits` picks k per shape for a fixed factor overhead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from squeezeflow.compression.quantization.qweight import pack_bits

FACTOR_BYTES = 2  # U and V are stored as fp16
# Above this many columns/rows a full SVD per block costs seconds to minutes on a CPU;
# the randomized range finder (Halko et al. 2011) with a few power iterations then
# finds the top k singular triplets of |R| to well within fp16 storage precision.
FULL_SVD_MAX_DIM = 1024
LOWRANK_OVERSAMPLE = 8  # extra random directions of the range finder (Halko et al.: 5-10)
LOWRANK_POWER_ITERATIONS = 4  # sharpens a slowly decaying spectrum; |R|'s top values stand out
# Elements of the (blocks, out, in) tensors `reconstruct` expands at once: 16 MiB in fp32,
# small next to a model, large enough that small layers expand every block in one go.
RECONSTRUCT_CHUNK = 2**22


@dataclass(frozen=True)
class Decomposition:
    signs: Tensor  # (blocks, ceil(out * in / 8)) uint8: bit set = negative entry of R_{i-1}
    U: Tensor  # (blocks, out, k) fp16, U_i sqrt(Sigma_i)
    V: Tensor  # (blocks, k, in) fp16, sqrt(Sigma_i) V_i^T
    residual_norms: Tensor  # (blocks + 1,) float64: ||R_0||_F, ||R_1||_F, ..., scaled space


def activation_scale(mean_square: Tensor, floor: float = 1e-2) -> Tensor:
    """s: (in,) from each input channel's mean square over calibration tokens, fp16-exact.

    s_j = RMS of channel j, divided by its mean over channels (only the ratios matter:
    the signs do not change with a global factor and the factors scale with it; values
    near 1 keep U, V well inside fp16's range). The paper uses each channel's L2 norm
    over a sequence, averaged over sequences: the same ratios for equal-length
    sequences up to the square root's concavity. Channels quieter than `floor` times
    the mean are raised to it: the reconstruction divides by s, and a channel never
    active in calibration may still be active later.
    """
    rms = mean_square.to(torch.float64).clamp(min=0).sqrt()  # (in,)
    mean = rms.mean()
    if not bool(mean > 0):
        return torch.ones_like(rms, dtype=torch.float32)
    s = (rms / mean).clamp(min=floor)  # (in,)
    return s.to(torch.float16).to(torch.float32)


def rank_for_factor_bits(out_features: int, in_features: int, factor_bits: float) -> int:
    """Largest k whose fp16 factors cost at most `factor_bits` per weight (at least 1)."""
    bits = 8 * FACTOR_BYTES
    return max(1, int(factor_bits * out_features * in_features // (bits * (out_features + in_features))))


def block_bytes(out_features: int, in_features: int, rank: int) -> int:
    """Bytes of one stored block: packed signs + U (out, k) + V (k, in) in fp16."""
    return math.ceil(out_features * in_features / 8) + FACTOR_BYTES * rank * (out_features + in_features)


def top_singular(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k SVD of A: (m, n) -> U (m, k), S (k,), Vh (k, n), float32."""
    m, n = A.shape
    k = min(k, m, n)
    if min(m, n) <= FULL_SVD_MAX_DIM:
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    q = min(k + LOWRANK_OVERSAMPLE, m, n)
    U, S, V = torch.svd_lowrank(A, q=q, niter=LOWRANK_POWER_ITERATIONS)
    return U[:, :k], S[:k], V[:, :k].T


def decompose(W_s: Tensor, niter: int, rank: int) -> Decomposition:
    """Iterative AVD of the scaled weight W_s: (out, in) into `niter` blocks of rank `rank`.

    Each block's factors are rounded to fp16 before its residual is formed, so later
    blocks also correct the rounding of earlier ones.
    """
    R = W_s.detach().to(torch.float32, copy=True)  # R_0: (out, in)
    out_features, in_features = R.shape
    k = min(rank, out_features, in_features)
    signs, Us, Vs = [], [], []
    norms = [float(torch.linalg.vector_norm(R, dtype=torch.float64))]
    for _ in range(niter):
        negative = R < 0  # (out, in); sign(0) = +1
        U, S, Vh = top_singular(R.abs(), k)  # |R_{i-1}| ~ U diag(S) Vh
        root = S.clamp(min=0).sqrt()  # (k,)
        U16 = (U * root[None, :]).to(torch.float16)  # (out, k)
        V16 = (root[:, None] * Vh).to(torch.float16)  # (k, in)
        magnitude = U16.to(torch.float32) @ V16.to(torch.float32)  # (out, in)
        R -= torch.where(negative, -magnitude, magnitude)  # R_i = R_{i-1} - B_i
        signs.append(pack_bits(negative.to(torch.uint8), 1))
        Us.append(U16)
        Vs.append(V16)
        norms.append(float(torch.linalg.vector_norm(R, dtype=torch.float64)))
    return Decomposition(
        signs=torch.stack(signs), U=torch.stack(Us), V=torch.stack(Vs),
        residual_norms=torch.tensor(norms, dtype=torch.float64),
    )


@functools.cache
def _sign_table() -> Tensor:
    """(256, 8) float32: the +1 / -1 signs that each byte value packs (bit j = weight j)."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # (256, 8)
    return 1.0 - 2.0 * bits.to(torch.float32)


def unpack_signs(signs: Tensor, shape: tuple[int, int]) -> Tensor:
    """Packed sign bits (..., bytes) uint8 -> (..., out, in) float32 of +1 / -1.

    One table lookup per byte (an embedding of the 256 byte values): several times
    faster than shifting and masking bit by bit, and the runtime does it every call.
    """
    expanded = nn.functional.embedding(signs.to(torch.int32), _sign_table())  # (..., bytes, 8)
    count = shape[0] * shape[1]
    flat = expanded.reshape(*signs.shape[:-1], -1)  # (..., bytes * 8)
    if flat.shape[-1] != count:
        flat = flat[..., :count]  # the last byte's padding bits
    return flat.reshape(*signs.shape[:-1], *shape)


def block(signs: Tensor, U: Tensor, V: Tensor, shape: tuple[int, int]) -> Tensor:
    """B_i = sign * (U V^T): (out, in) float32 from one block's packed signs and factors."""
    return unpack_signs(signs, shape) * (U.to(torch.float32) @ V.to(torch.float32))


def reconstruct(signs: Tensor, U: Tensor, V: Tensor, scale: Tensor, blocks: int | None = None) -> Tensor:
    """W_hat = (B_1 + ... + B_j) diag(s)^-1: (out, in) float32 from the first `blocks` blocks.

    signs: (blocks, bytes) uint8; U: (blocks, out, k); V: (blocks, k, in); scale: (in,).
    Blocks are expanded a few at a time (batched products, a handful of ops per group
    instead of per block: the runtime module calls this on every forward), keeping the
    transient (group, out, in) tensors near RECONSTRUCT_CHUNK elements.
    """
    count = U.shape[0] if blocks is None else blocks
    shape = (int(U.shape[1]), int(V.shape[2]))
    group = max(1, RECONSTRUCT_CHUNK // (shape[0] * shape[1]))
    W_s = torch.zeros(shape, dtype=torch.float32)  # (out, in)
    for start in range(0, count, group):
        stop = min(start + group, count)
        magnitude = torch.bmm(U[start:stop].to(torch.float32), V[start:stop].to(torch.float32))  # (g, out, in)
        W_s += (unpack_signs(signs[start:stop], shape).mul_(magnitude)).sum(dim=0)
    return W_s / scale.to(torch.float32)[None, :]

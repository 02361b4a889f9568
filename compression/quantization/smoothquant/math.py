"""SmoothQuant scales (Xiao et al. 2022, "SmoothQuant", Eq. 4).

Per input channel j of a Linear (or of several Linears reading the same input):

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

Dividing the input by s and multiplying the weight's columns by s leaves X @ W.T
unchanged, and moves activation outliers into the weights, which per-channel int8
quantization absorbs far better than per-token activation quantization does.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_SCALE = 1e-5  # keeps s (and 1/s) finite when a channel is nearly silent


def smoothing_scales(act_amax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s: (in,) from activation maxima act_amax (in,) and weights W_k (out_k, in)."""
    w_amax = torch.stack([W.abs().amax(dim=0) for W in weights]).amax(dim=0)  # (in,)
    act = act_amax.to(torch.float32)
    s = act.pow(alpha) / w_amax.to(torch.float32).pow(1.0 - alpha)  # (in,)
    # a silent channel (no activation or no weight) has nothing to migrate
    usable = (act > 0) & (w_amax > 0) & torch.isfinite(s)
    return torch.where(usable, s.clamp(min=MIN_SCALE), torch.ones_like(s))


def outlier_ratio(amax: Tensor) -> float:
    """max / median of per-channel maxima: how far the worst channel stands out."""
    return float(amax.max() / amax.median().clamp(min=torch.finfo(torch.float32).tiny))

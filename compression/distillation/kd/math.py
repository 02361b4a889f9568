"""Distillation losses: pure tensors in, a scalar loss out.

- logit KD: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
  Network": KL(p_teacher || p_student) of temperature-softened distributions,
  times T^2 so that its gradients keep their scale as T changes.
- hidden-state (feature) KD: the student's block outputs follow the teacher's
  mapped block outputs (FitNets, Romero et al. 2015; FoldGPT's tail-layer
  distillation and PELA's feature distillation are instances).
- embedding KD (encoders): mean-pooled sentence embeddings follow the teacher's.
- task loss (causal LMs): next-token cross-entropy on the training text.

Every loss is a mean over real tokens: `mask` (batch, seq) is 1 on tokens, 0 on padding.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from squeezeflow.compression.distillation.kd.config import Distance

EPS = 1e-12  # keeps relative errors finite on all-zero references



def logit_kd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over tokens of KL(softmax(z_t / T) || softmax(z_s / T))."""
    # student_logits, teacher_logits: (batch, seq, vocab); mask: (batch, seq)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (batch, seq, vocab)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (batch, seq, vocab)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # (batch, seq)
    return temperature**2 * masked_mean(kl, mask)


def hidden_kd(student: Tensor, teacher: Tensor, mask: Tensor, distance: Distance) -> Tensor:
    """Distance of two blocks' outputs per token, averaged over tokens.

    "mse" is relative: sum ||h_s - h_t||^2 / sum ||h_t||^2, so blocks whose outputs
    grow with depth (pre-norm residual streams) weigh alike.
    """
    # student, teacher: (batch, seq, hidden); mask: (batch, seq)
    if distance == "cosine":
        cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)  # (batch, seq)
        return masked_mean(1 - cos, mask)
    error = (student.float() - teacher.float()).pow(2).sum(dim=-1)  # (batch, seq)
    reference = teacher.float().pow(2).sum(dim=-1)  # (batch, seq)
    return (error * mask).sum() / (reference * mask).sum().clamp(min=EPS)


def embedding_kd(student: Tensor, teacher: Tensor, distance: Distance) -> Tensor:
    """1 - cosine (or relative MSE) of sentence embeddings, mean over the batch."""
    # student, teacher: (batch, hidden)
    if distance == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    error = (student.float() - teacher.float()).pow(2).sum()
    return error / teacher.float().pow(2).sum().clamp(min=EPS)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mask-weighted mean over tokens (sentence-transformers' pooling), not normalized."""
    # hidden: (batch, seq, hidden); mask: (batch, seq) -> (batch, hidden)
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def lm_loss(logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy, and the number of predicted tokens."""
    # logits: (batch, seq, vocab); input_ids, mask: (batch, seq)
    shift_logits = logits[:, :-1, :].float()  # (batch, seq-1, vocab)
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (batch, seq-1)
    count = int((labels != -100).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    return loss, count


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` (batch, seq) over positions where `mask` is 1."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def even_layer_map(student_blocks: int, teacher_blocks: int) -> dict[int, int]:
    """Student block i -> teacher block round((i + 1) * T / S) - 1: evenly spaced, last to last."""
    return {
        i: max(0, round((i + 1) * teacher_blocks / student_blocks) - 1)
        for i in range(student_blocks)
    }


def is_finite(value: Tensor) -> bool:
    return bool(torch.isfinite(value).all())

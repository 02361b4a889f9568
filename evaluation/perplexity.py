"""Causal-LM perplexity on held-out text: exp of the mean next-token loss."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted perplexity over padded batches (padding positions ignored)."""
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            input_ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            shift_logits = logits[:, :-1, :]  # (batch, seq-1, vocab)
            shift_labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (batch, seq-1)
            loss = nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total_loss += float(loss)
            total_tokens += int((shift_labels != -100).sum())
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one text longer than one token")
    return math.exp(total_loss / total_tokens)

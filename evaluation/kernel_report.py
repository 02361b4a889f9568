"""Which kernel each packed layer of a model runs, per batch size, and what the
candidates measured: what `squeeze kernels` prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeezeflow import sampledata
from squeezeflow.compression.families import family
from squeezeflow.compression.models import LoadedModel
from squeezeflow.kernels import kernel_table


@dataclass(frozen=True)
class KernelRow:
    """One decision shared by `layers` layers of the same format, shape and rows bucket."""

    format: str
    shape: str  # out x in
    rows: int  # the rows bucket's upper bound
    kernel: str
    layers: int
    ms: dict[str, float]  # each timed candidate (empty when read from the decisions file)
    rejected: dict[str, str]


def exercise_kernels(loaded: LoadedModel, batch_sizes: list[int], tokens: int) -> list[KernelRow]:
    """Run `loaded` once per batch size on sample sentences padded to `tokens`, so each
    packed layer decides its kernel for those rows, and collect the decisions."""
    texts = sampledata.sentences(max(batch_sizes), seed=3)
    with torch.inference_mode():
        for size in batch_sizes:
            batch = loaded.tokenizer(texts[:size], padding="max_length", truncation=True,
                                     max_length=tokens, return_tensors="pt")
            family(loaded.kind).forward(loaded.model, {"input_ids": batch["input_ids"],
                                                       "attention_mask": batch["attention_mask"]})
    modules = dict(loaded.model.named_modules())
    grouped: dict[tuple[str, str, int, str], KernelRow] = {}
    for name, fmt, bucket, kernel, ms in kernel_table(loaded.model):
        module = modules[name]
        shape = f"{module.out_features}x{module.in_features}"
        key = (fmt, shape, bucket, kernel)
        known = grouped.get(key)
        rejected = module.decisions[bucket].rejected  # type: ignore[union-attr, index]
        grouped[key] = KernelRow(fmt, shape, bucket, kernel, 1 + (known.layers if known else 0),
                                 dict(ms), dict(rejected))
    return sorted(grouped.values(), key=lambda row: (row.rows, row.format, row.shape))

"""Text data for calibration and evaluation: local files or hub datasets, hashed.

`load_texts` reads through `datasets` (txt, jsonl/json, parquet, csv, or a hub
dataset name) and returns the selected texts; `texts_sha256` is the content hash
that caching and the registry's lineage tags use.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from squeezeflow.compression.sources import BUILDERS  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)



def load_texts(
    source: str,
    *,
    split: str = "train",
    text_field: str = "text",
    num_samples: int | None = None,
    subset: str | None = None,
) -> list[str]:
    """The first `num_samples` non-empty texts of `source` (a file or a hub dataset)."""
    from datasets import load_dataset  # import on use: datasets is slow to import

    path = Path(source).expanduser()
    if path.exists():
        builder = BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"{path}: unsupported data file type {path.suffix!r}; "
                f"supported: {', '.join(sorted(BUILDERS))}"
            )
        dataset = load_dataset(builder, data_files=str(path), split="train")
    elif path.suffix in BUILDERS or "/" not in source and path.suffix:
        raise FileNotFoundError(f"data file {source} does not exist")
    else:
        log.info("loading dataset %s (%s) from the hub", source, split)
        dataset = load_dataset(source, subset, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(
            f"{source}: no text field {text_field!r}; fields: {', '.join(dataset.column_names)}"
        )
    texts = [t for t in dataset[text_field] if isinstance(t, str) and t.strip()]
    if num_samples is not None:
        if len(texts) < num_samples:
            log.warning("%s has %d texts, fewer than the %d asked for", source, len(texts), num_samples)
        texts = texts[:num_samples]
    if not texts:
        raise ValueError(f"{source}: no non-empty texts in field {text_field!r}")
    return texts


def texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def tokenized_batches(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    max_length: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded, truncated batches of `input_ids` and `attention_mask`."""
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

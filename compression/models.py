"""Loading base models: the bundled default, a local HF folder, or a hub id.

Two families are first-class: encoders (embeddings by mean pooling, as
sentence-transformers does for all-MiniLM-L6-v2) and causal LMs (perplexity); what
each family is and does lives in `compression/families.py`.

A source is read one way only (`source_kind`): a source that looks like a path is a
folder and is never looked up on the hub when it is missing; a hub id is resolved to
the commit it names (`hub_commit`) and downloaded at that commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from squeezeflow.compression.families import detect_family, family
from squeezeflow.compression.sources import (  # noqa: F401 (re-exported: where they were)
    DEFAULT_MODEL,
    HUB_ID_PATTERN,
    HUB_TIMEOUT_S,
    HubLookupError,
    HubNotFoundError,
    HubRevisionNotFoundError,
    HubUnreachableError,
    SourceKind,
    cached_hub_commit,
    hub_commit,
    hub_config_path,
    pinned_commit,
    resolve_source,
    source_kind,
)

log = logging.getLogger(__name__)

ModelKind = str  # a registered model family's name (compression/families.py)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: ModelKind
    path: Path


def detect_kind(config: PretrainedConfig) -> ModelKind:
    """The name of the model family `config` describes (compression/families.py)."""
    return detect_family(config).name


def model_class(kind: ModelKind) -> Any:  # an Auto* class: from_pretrained / from_config
    return family(kind).model_class()


def skeleton(
    config: PretrainedConfig, kind: ModelKind | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The model `config` describes, built on the meta device: its modules and their
    names without any weights (measured: 0.18 s and no memory for a 7B Llama config)."""
    options = {"dtype": dtype} if dtype is not None else {}
    with torch.device("meta"):
        model: PreTrainedModel = model_class(kind or detect_kind(config)).from_config(config, **options)
    return model


def load_pretrained(path: Path, kind: ModelKind | None = None) -> LoadedModel:
    """Load an uncompressed HF model folder in fp32, in eval mode."""
    config = AutoConfig.from_pretrained(path)
    kind = kind or detect_kind(config)
    model = model_class(kind).from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = load_tokenizer(path)
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, path=path)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # causal LMs often ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the largest ModuleList whose items hold Linears.

    Works for BERT (`encoder.layer`), Llama/Qwen2 (`model.layers`), OPT
    (`model.decoder.layers`) and GPT-2 (`transformer.h`) without naming them.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        holds_linear = any(  # GPT-2's Conv1D and RPS layers (W from a shared z) are Linears too
            isinstance(sub, nn.Linear) or type(sub).__name__ in ("Conv1D", "RPSLinear")
            for sub in module[0].modules()
        )
        if holds_linear and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks with Linear layers")
    return best


def mean_pooled_embeddings(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Sentence embeddings: mask-weighted mean of the last hidden state, L2-normalized."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (batch, hidden)
    return torch.nn.functional.normalize(pooled, dim=-1)

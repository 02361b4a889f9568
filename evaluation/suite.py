"""Evaluate a candidate against its base on the same data with the same settings.

Metrics of the candidate keep their plain names; the base's get a `base_` prefix;
comparisons (compression ratio, speed-up, perplexity ratio) are computed from the
two. Fidelity compares the candidate's embeddings with the base's, so it has no
base value.

Speeds are measured with base and candidate interleaved in one loop (see
`evaluation/latency.py`), and the report's tags say what they ran on: the CPU, its
vector capability, the torch build, the thread count and which packed kernels ran.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from squeezeflow.compression.artifact import load_compressed
from squeezeflow.compression.config import StrictModel
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.models import LoadedModel, ModelKind, mean_pooled_embeddings
from squeezeflow.evaluation import fidelity
from squeezeflow.evaluation.bitstack_curve import curve_metrics, is_bitstack, size_quality_curve
from squeezeflow.evaluation.latency import (
    Measured,
    decode_timer,
    interleaved,
    latency_stats,
    timed,
)
from squeezeflow.evaluation.machine import machine_tags
from squeezeflow.evaluation.memory import memory_metrics
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.evaluation.size import parameter_counts, weights_bytes
from squeezeflow.kernels import kernel_mix

log = logging.getLogger(__name__)

Suite = Literal["quality", "latency", "memory", "size"]
ALL_SUITES: tuple[Suite, ...] = ("quality", "latency", "memory", "size")

# Every metric name an evaluation can produce, for validating gates in recipes.
QUALITY_METRICS = {
    "encoder": ("fidelity_cosine", "fidelity_spearman", "fidelity_topk"),
    "causal-lm": ("perplexity", "base_perplexity", "perplexity_ratio"),
}
MEASURED_METRICS = (
    "latency_p50_ms", "latency_p95_ms", "latency_mean_ms", "peak_memory_mb", "size_mb",
    "weights_mb", "parameters", "nonzero_parameters", "linear_sparsity",
    "decode_tokens_per_s",  # causal LMs only
)
COMPARISON_METRICS = ("compression_ratio", "speedup", "decode_speedup", "memory_ratio")
KNOWN_METRICS = tuple(
    sorted(
        {m for names in QUALITY_METRICS.values() for m in names}
        | set(MEASURED_METRICS)
        | {f"base_{m}" for m in MEASURED_METRICS}
        | set(COMPARISON_METRICS)
    )
)
DECODE_PROMPT_TOKENS = 16  # a short prompt: what is timed is decoding, not the prompt


class LatencySettings(StrictModel):
    warmup: int = Field(3, ge=0)  # first calls pay for allocation and thread start-up
    repeats: int = Field(10, ge=1)  # enough for a stable median on a quiet machine
    batch_size: int = Field(8, ge=1)
    # causal LMs: greedy tokens generated per timed decode; enough steps for a stable
    # per-token time, few enough that a repeat stays short on a CPU
    decode_tokens: int = Field(32, ge=2)


class EvaluationSettings(StrictModel):
    suites: tuple[Suite, ...] = ALL_SUITES
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=2)
    top_k: int = Field(5, ge=1)  # neighbours compared by the retrieval-agreement metric
    latency: LatencySettings = LatencySettings()


class EvaluationReport(BaseModel):
    kind: ModelKind
    metrics: dict[str, float]
    # what the speeds ran on (see `run_tags`); the registry logs them as `squeezeflow.*`
    tags: dict[str, str] = Field(default_factory=dict)


Progress = Callable[[str], None]


def evaluate(
    base_dir: Path,
    candidate_dir: Path,
    texts: list[str],
    settings: EvaluationSettings,
    progress: Progress | None = None,
) -> EvaluationReport:
    """Measure base and candidate on `texts`; both see the same batches and settings."""
    tell = progress or (lambda message: log.info(message))
    # Both as a user loads them (`squeezeflow.load_compressed`): quantized Linears run
    # on packed kernels, so quality and latency are those of the packed runtime.
    base = load_compressed(base_dir, runtime="packed")
    candidate = load_compressed(candidate_dir, runtime="packed")
    if base.kind != candidate.kind:
        raise ValueError(f"base is a {base.kind} but the candidate is a {candidate.kind}")
    metrics: dict[str, float] = {}
    if "quality" in settings.suites:
        tell("evaluating quality")
        metrics |= _quality(base, candidate, texts, settings)
        if is_bitstack(candidate_dir):  # one artifact, every size: its quality at several budgets
            tell("evaluating the BitStack size/quality curve")
            metrics |= curve_metrics(size_quality_curve(
                candidate_dir, texts, base_dir=base_dir, batch_size=settings.batch_size,
                max_length=settings.max_length,
            ))
    if "latency" in settings.suites:
        tell("measuring latency (base and candidate interleaved)")
        metrics |= _latency(base, candidate, texts, settings)
        metrics["speedup"] = metrics["base_latency_p50_ms"] / metrics["latency_p50_ms"]
        if candidate.kind == "causal-lm":
            tell(f"measuring decode throughput ({settings.latency.decode_tokens} tokens)")
            metrics |= _decode(base, candidate, texts, settings)
            metrics["decode_speedup"] = (
                metrics["decode_tokens_per_s"] / metrics["base_decode_tokens_per_s"]
            )
    tags = run_tags(base, candidate)  # after the timed loops: the kernels they chose
    if "size" in settings.suites:
        for prefix, loaded, folder in (("base_", base, base_dir), ("", candidate, candidate_dir)):
            metrics[prefix + "weights_mb"] = weights_bytes(folder) / 2**20
            metrics[prefix + "size_mb"] = sum(
                f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()
            ) / 2**20
            metrics |= {prefix + k: v for k, v in parameter_counts(loaded.model).items()}
        metrics["compression_ratio"] = metrics["base_weights_mb"] / metrics["weights_mb"]
    if "memory" in settings.suites:
        tell("measuring peak memory")
        memory, memory_tags = memory_metrics(base_dir, candidate_dir, texts,
                                             settings.latency.batch_size, settings.max_length)
        metrics |= memory
        tags |= memory_tags  # memory_method, or memory_skipped_reason where the OS has none
    return EvaluationReport(kind=candidate.kind, metrics=metrics, tags=tags)


def run_tags(base: LoadedModel, candidate: LoadedModel) -> dict[str, str]:
    """The machine (CPU model and capability, torch version, threads) and, as JSON
    {"format/kernel": layers}, the packed kernels each model has run so far."""
    return machine_tags() | {
        "kernel_mix": json.dumps(kernel_mix(candidate.model), sort_keys=True),
        "base_kernel_mix": json.dumps(kernel_mix(base.model), sort_keys=True),
    }


def embed(loaded: LoadedModel, texts: list[str], settings: EvaluationSettings) -> torch.Tensor:
    """Sentence embeddings of `texts`: (n, hidden)."""
    with torch.inference_mode():
        return torch.cat([
            mean_pooled_embeddings(loaded.model, b["input_ids"], b["attention_mask"])
            for b in tokenized_batches(
                texts, loaded.tokenizer, batch_size=settings.batch_size,
                max_length=settings.max_length,
            )
        ])


def _quality(
    base: LoadedModel, candidate: LoadedModel, texts: list[str], settings: EvaluationSettings
) -> dict[str, float]:
    if candidate.kind == "encoder":
        base_emb, cand_emb = embed(base, texts, settings), embed(candidate, texts, settings)
        return {
            "fidelity_cosine": fidelity.mean_cosine(base_emb, cand_emb),
            "fidelity_spearman": fidelity.similarity_spearman(base_emb, cand_emb),
            "fidelity_topk": fidelity.topk_agreement(base_emb, cand_emb, settings.top_k),
        }
    scores = {}
    for prefix, loaded in (("base_", base), ("", candidate)):
        batches = tokenized_batches(
            texts, loaded.tokenizer, batch_size=settings.batch_size, max_length=settings.max_length
        )
        scores[prefix + "perplexity"] = perplexity(loaded.model, batches)
    scores["perplexity_ratio"] = scores["perplexity"] / scores["base_perplexity"]
    return scores


def _latency(
    base: LoadedModel, candidate: LoadedModel, texts: list[str], settings: EvaluationSettings
) -> dict[str, float]:
    """p50/p95/mean of one forward of the same batch, base and candidate interleaved;
    causal LMs run without the KV cache, so this is prefill latency."""
    base_seconds, candidate_seconds = interleaved(
        _forward_timer(base, texts, settings), _forward_timer(candidate, texts, settings),
        warmup=settings.latency.warmup, repeats=settings.latency.repeats,
    )
    return {"base_" + k: v for k, v in latency_stats(base_seconds).items()} | latency_stats(
        candidate_seconds
    )


def _forward_timer(loaded: LoadedModel, texts: list[str], settings: EvaluationSettings) -> Measured:
    batch = next(
        tokenized_batches(
            texts[: settings.latency.batch_size], loaded.tokenizer,
            batch_size=settings.latency.batch_size, max_length=settings.max_length,
        )
    )
    if loaded.kind == "encoder":
        def call() -> object:
            return mean_pooled_embeddings(loaded.model, batch["input_ids"], batch["attention_mask"])
    else:
        def call() -> object:
            return loaded.model(**batch, use_cache=False)
    return timed(call)


def _decode(
    base: LoadedModel, candidate: LoadedModel, texts: list[str], settings: EvaluationSettings
) -> dict[str, float]:
    """Greedy decode tokens/s at batch 1 with the KV cache, base and candidate interleaved."""
    base_seconds, candidate_seconds = interleaved(
        _decode_timer(base, texts, settings), _decode_timer(candidate, texts, settings),
        warmup=settings.latency.warmup, repeats=settings.latency.repeats,
    )
    # seconds per token -> tokens/s; the median keeps one stalled repeat from counting
    return {
        "base_decode_tokens_per_s": 1.0 / statistics.median(base_seconds),
        "decode_tokens_per_s": 1.0 / statistics.median(candidate_seconds),
    }


def _decode_timer(loaded: LoadedModel, texts: list[str], settings: EvaluationSettings) -> Measured:
    prompt = next((text for text in texts if text.strip()), None)
    if prompt is None:
        raise ValueError("decode throughput needs a non-empty evaluation text as its prompt")
    encoded = loaded.tokenizer(
        prompt, truncation=True, max_length=min(settings.max_length, DECODE_PROMPT_TOKENS),
        return_tensors="pt",
    )
    input_ids = encoded["input_ids"]  # (1, prompt)
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return decode_timer(loaded.model, input_ids, settings.latency.decode_tokens, pad)

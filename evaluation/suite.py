"""Evaluate a candidate against its base on the same data with the same settings.

Metrics of the candidate keep their plain names; the base's get a `base_` prefix;
comparisons (compression ratio, speed-up, perplexity ratio) are computed from the
two. Fidelity compares the candidate's embeddings with the base's, so it has no
base value.

Speeds are measured with base and candidate interleaved in one loop (see
`evaluation/latency.py`), and the report's tags say what they ran on: the CPU, its
vector capability, the torch build, the thread count and which packed kernels ran.

The base's side of the quality metrics (its perplexity, its embeddings) and its
parameter counts depend only on the base, the texts and the settings, so they can be
kept between evaluations against the same base (`ReferenceCache`): a search's trials,
or a recipe run again, compute them once, and then do not load the base at all unless
another suite runs it. Speeds are never kept: they are measured side by side each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from squeezeflow.compression.artifact import load_compressed, stored_kind
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.families import family
from squeezeflow.compression.integrity import atomic_write_bytes
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
from squeezeflow.evaluation.metrics import METRICS
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.evaluation.settings import (  # noqa: F401 (re-exported)
    ALL_SUITES,
    EvaluationSettings,
    LatencySettings,
    Suite,
)
from squeezeflow.evaluation.size import parameter_counts, weights_bytes
from squeezeflow.kernels import kernel_mix

log = logging.getLogger(__name__)


# Every metric name an evaluation can produce, with its direction and unit, is in the
# metric table (evaluation/metrics.py); a base model's value is `base_<name>`.
KNOWN_METRICS = tuple(METRICS.evaluated_names())
DECODE_PROMPT_TOKENS = 16  # a short prompt: what is timed is decoding, not the prompt


class EvaluationReport(BaseModel):
    kind: ModelKind
    metrics: dict[str, float]
    # what the speeds ran on (see `run_tags`); the registry logs them as `squeezeflow.*`
    tags: dict[str, str] = Field(default_factory=dict)


Progress = Callable[[str], None]

# The base's side of a quality evaluation: named tensors (a perplexity, embeddings).
Reference = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ReferenceCache:
    """Where the base's quality references (and parameter counts) are kept between
    evaluations.

    `base_id` must change whenever the base's outputs could: the caller's hash of the
    base's files together with the code and library versions that compute them. The
    texts, the evaluator, the settings that shape the batches and the CPU capability
    (which picks the packed kernels of a compressed base) are added here.
    A file that cannot be read is computed again; one that cannot be written only
    costs the time."""

    folder: Path
    base_id: str

    def path(self, evaluator: str, texts: list[str], settings: EvaluationSettings) -> Path:
        digest = hashlib.sha256()
        for part in (self.base_id, evaluator, str(settings.batch_size), str(settings.max_length),
                     torch.backends.cpu.get_cpu_capability()):
            digest.update(part.encode() + b"\0")
        for text in texts:
            digest.update(text.encode() + b"\0")
        return self.folder / f"{digest.hexdigest()}.pt"

    def read(self, path: Path) -> Reference | None:
        try:
            stored = torch.load(path, weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as error:  # a damaged entry is recomputed, not trusted
            log.warning("base reference %s unreadable (%s); computing it again", path.name, error)
            return None
        if not isinstance(stored, dict) or not all(isinstance(v, torch.Tensor) for v in stored.values()):
            return None
        with contextlib.suppress(OSError):
            path.touch()  # its last use, for `squeeze cache gc`
        return stored

    def write(self, path: Path, reference: Reference) -> None:
        buffer = io.BytesIO()
        torch.save(reference, buffer)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as error:
            log.warning("base reference not kept in %s: %s", self.folder, error)


def evaluate(
    base_dir: Path,
    candidate_dir: Path,
    texts: list[str],
    settings: EvaluationSettings,
    progress: Progress | None = None,
    references: ReferenceCache | None = None,
) -> EvaluationReport:
    """Measure base and candidate on `texts`; both see the same batches and settings.
    `references`: where the base's side of the quality metrics and its parameter counts
    are kept (None: computed, the base loaded)."""
    tell = progress or (lambda message: log.info(message))
    # Both as a user loads them (`squeezeflow.load_compressed`): quantized Linears run
    # on packed kernels, so quality and latency are those of the packed runtime. The
    # base is loaded only when something runs it: with its references kept, a search's
    # trials measuring quality and size never load it (half the memory, no load time).
    candidate = load_compressed(candidate_dir, runtime="packed")
    base_kind = stored_kind(base_dir)
    if base_kind != candidate.kind:
        raise ValueError(f"base is a {base_kind} but the candidate is a {candidate.kind}")
    base = _Loaded(base_dir)
    metrics: dict[str, float] = {}
    if "quality" in settings.suites:
        tell("evaluating quality")
        metrics |= _quality(base, candidate, texts, settings, references)
        if is_bitstack(candidate_dir):  # one artifact, every size: its quality at several budgets
            tell("evaluating the BitStack size/quality curve")
            metrics |= curve_metrics(size_quality_curve(
                candidate_dir, texts, base_dir=base_dir, batch_size=settings.batch_size,
                max_length=settings.max_length,
            ))
    task_tags: dict[str, str] = {}
    if settings.tasks:  # labelled task accuracy (evaluation/task_accuracy.py)
        tell(f"evaluating {len(settings.tasks)} task(s) on base and candidate")
        task_metrics, task_tags = _tasks(base.get(), candidate, settings)
        metrics |= task_metrics
    if "latency" in settings.suites:
        tell("measuring latency (base and candidate interleaved)")
        metrics |= _latency(base.get(), candidate, texts, settings)
        metrics["speedup"] = metrics["base_latency_p50_ms"] / metrics["latency_p50_ms"]
        if "decode" in family(candidate.kind).latency:
            tell(f"measuring decode throughput ({settings.latency.decode_tokens} tokens)")
            metrics |= _decode(base.get(), candidate, texts, settings)
            metrics["decode_speedup"] = (
                metrics["decode_tokens_per_s"] / metrics["base_decode_tokens_per_s"]
            )
    tags = run_tags(base.loaded, candidate)  # after the timed loops: the kernels they chose
    tags |= task_tags  # each task's version and data sha256
    if "size" in settings.suites:
        for prefix, folder in (("base_", base_dir), ("", candidate_dir)):
            metrics[prefix + "weights_mb"] = weights_bytes(folder) / 2**20
            metrics[prefix + "size_mb"] = sum(
                f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()
            ) / 2**20
        metrics |= {"base_" + k: v for k, v in _base_counts(base, settings, references).items()}
        metrics |= parameter_counts(candidate.model)
        metrics["compression_ratio"] = metrics["base_weights_mb"] / metrics["weights_mb"]
    if "memory" in settings.suites:
        tell("measuring peak memory")
        memory, memory_tags = memory_metrics(base_dir, candidate_dir, texts,
                                             settings.latency.batch_size, settings.max_length)
        metrics |= memory
        tags |= memory_tags  # memory_method, or memory_skipped_reason where the OS has none
    return EvaluationReport(kind=candidate.kind, metrics=metrics, tags=tags)


class _Loaded:
    """A model folder loaded (packed runtime) on first use, then kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loaded: LoadedModel | None = None

    def get(self) -> LoadedModel:
        if self.loaded is None:
            self.loaded = load_compressed(self.path, runtime="packed")
        return self.loaded


def run_tags(base: LoadedModel | None, candidate: LoadedModel) -> dict[str, str]:
    """The machine (CPU model and capability, torch version, threads) and, as JSON
    {"format/kernel": layers}, the packed kernels each model has run so far (the base's
    only where this evaluation loaded it)."""
    tags = machine_tags() | {"kernel_mix": json.dumps(kernel_mix(candidate.model), sort_keys=True)}
    if base is not None:
        tags["base_kernel_mix"] = json.dumps(kernel_mix(base.model), sort_keys=True)
    return tags


def _base_counts(base: _Loaded, settings: EvaluationSettings,
                 references: ReferenceCache | None) -> dict[str, float]:
    """`parameter_counts` of the base, kept with its quality references."""
    if references is None:
        return parameter_counts(base.get().model)
    path = references.path("parameter_counts", [], settings)
    stored = references.read(path)
    if stored is None:
        stored = {k: torch.tensor(v, dtype=torch.float64)
                  for k, v in parameter_counts(base.get().model).items()}
        references.write(path, stored)
    return {k: float(v) for k, v in stored.items()}


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


QualityEvaluator = Callable[[LoadedModel, LoadedModel, list[str], EvaluationSettings],
                            dict[str, float]]


@dataclass(frozen=True)
class AgainstReference:
    """A quality evaluator in two parts: the base's side (`reference`, which depends on
    the base, the texts and the settings only, so it can be kept) and the comparison of
    a candidate with it (`compare`)."""

    reference: Callable[[LoadedModel, list[str], EvaluationSettings], Reference]
    compare: Callable[[Reference, LoadedModel, list[str], EvaluationSettings], dict[str, float]]


def _quality(
    base: _Loaded, candidate: LoadedModel, texts: list[str], settings: EvaluationSettings,
    references: ReferenceCache | None = None,
) -> dict[str, float]:
    """The quality metrics of the candidate's model family, by the family's evaluator."""
    name = family(candidate.kind).evaluator
    if name not in QUALITY_EVALUATORS:
        raise ValueError(f"model family {candidate.kind!r} names quality evaluator {name!r}; "
                         f"known evaluators: {', '.join(sorted(QUALITY_EVALUATORS))}")
    evaluator = QUALITY_EVALUATORS[name]
    if not isinstance(evaluator, AgainstReference):
        return evaluator(base.get(), candidate, texts, settings)
    if references is None:
        return evaluator.compare(evaluator.reference(base.get(), texts, settings), candidate,
                                 texts, settings)
    path = references.path(name, texts, settings)
    reference = references.read(path)
    if reference is None:
        reference = evaluator.reference(base.get(), texts, settings)
        references.write(path, reference)
    return evaluator.compare(reference, candidate, texts, settings)


def _embeddings(loaded: LoadedModel, texts: list[str], settings: EvaluationSettings) -> Reference:
    return {"embeddings": embed(loaded, texts, settings)}


def _fidelity(reference: Reference, candidate: LoadedModel, texts: list[str],
              settings: EvaluationSettings) -> dict[str, float]:
    """Agreement of the candidate's embeddings with the base's on the same texts."""
    base_emb, cand_emb = reference["embeddings"], embed(candidate, texts, settings)
    return {
        "fidelity_cosine": fidelity.mean_cosine(base_emb, cand_emb),
        "fidelity_spearman": fidelity.similarity_spearman(base_emb, cand_emb),
        "fidelity_topk": fidelity.topk_agreement(base_emb, cand_emb, settings.top_k),
    }


def _perplexity_of(loaded: LoadedModel, texts: list[str], settings: EvaluationSettings) -> float:
    batches = tokenized_batches(
        texts, loaded.tokenizer, batch_size=settings.batch_size, max_length=settings.max_length
    )
    return perplexity(loaded.model, batches)


def _base_perplexity(base: LoadedModel, texts: list[str], settings: EvaluationSettings) -> Reference:
    # float64 keeps the Python float perplexity() returned exactly
    return {"perplexity": torch.tensor(_perplexity_of(base, texts, settings), dtype=torch.float64)}


def _perplexity_ratio(reference: Reference, candidate: LoadedModel, texts: list[str],
                      settings: EvaluationSettings) -> dict[str, float]:
    """Perplexity of base and candidate on the same texts, and their ratio."""
    scores = {"base_perplexity": float(reference["perplexity"]),
              "perplexity": _perplexity_of(candidate, texts, settings)}
    scores["perplexity_ratio"] = scores["perplexity"] / scores["base_perplexity"]
    return scores


def _tasks(
    base: LoadedModel, candidate: LoadedModel, settings: EvaluationSettings
) -> tuple[dict[str, float], dict[str, str]]:
    """Every `evaluation.tasks` entry on base (`base_` names) and candidate."""
    from squeezeflow.evaluation.task_accuracy import check_kinds, run_tasks

    check_kinds(settings.tasks, candidate.kind)  # before minutes of evaluation, not after

    def embed_texts(loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
        return embed(loaded, texts, settings)

    base_metrics, _ = run_tasks(base, settings.tasks, embed_texts, settings.max_length)
    metrics, tags = run_tasks(candidate, settings.tasks, embed_texts, settings.max_length)
    return {"base_" + k: v for k, v in base_metrics.items()} | metrics, tags


# Quality evaluators by the name a model family gives (compression/families.py); a new
# family registers its own here (`QUALITY_EVALUATORS["name"] = function`, or an
# `AgainstReference` whose base side is kept between evaluations).
QUALITY_EVALUATORS: dict[str, QualityEvaluator | AgainstReference] = {
    "fidelity": AgainstReference(reference=_embeddings, compare=_fidelity),
    "perplexity": AgainstReference(reference=_base_perplexity, compare=_perplexity_ratio),
}


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
    forward = family(loaded.kind).forward  # pooled embeddings, or logits without the KV cache

    def call() -> object:
        return forward(loaded.model, batch)
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

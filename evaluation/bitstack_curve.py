"""The size/quality curve of a BitStack model: one decomposition, many memory budgets.

A BitStack artifact (compression/formats/bitstack.py) loads at any memory budget, so its
quality is a curve, not a point. `size_quality_curve` loads the artifact under each
budget (nothing is recompressed) and measures the suite's quality metric: perplexity
for causal LMs, cosine fidelity of the embeddings to the base's for encoders.
`curve_metrics` flattens the curve into metrics the registry logs with the version
(`bitstack_curve_<i>_mb`, `_bits_per_weight`, `_blocks`, `_<metric>`, i = 0 the
smallest); `curve_from_metrics` reads it back, `curve_plot` draws it and `pick_budget`
picks the smallest budget that meets a quality target: a search over sizes reads the
curve instead of recompressing.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal, get_args

import torch
from pydantic import BaseModel

from squeezeflow.compression.artifact import FORMAT_FILE, load_compressed
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.families import family
from squeezeflow.compression.formats.bitstack import MIB, BitStackFormat
from squeezeflow.compression.models import LoadedModel, mean_pooled_embeddings
from squeezeflow.compression.quantization.bitstack.budget import bitstack_loaded, read_plan
from squeezeflow.evaluation import fidelity
from squeezeflow.evaluation.metrics import metric as metric_of
from squeezeflow.evaluation.perplexity import perplexity

log = logging.getLogger(__name__)

# Budgets evaluated by default, evenly spaced from the smallest loadable size to the
# whole artifact: enough to see the curve's shape, each costs one evaluation pass.
CURVE_POINTS = 6
PREFIX = "bitstack_curve"
# the headline quality metrics the curve can measure (directions: the metric table)
QualityMetric = Literal["perplexity", "fidelity_cosine"]


class CurvePoint(BaseModel):
    budget_mb: float  # the memory budget asked for (MiB)
    weights_mb: float  # stored tensors read under it: the loaded blocks and every non-block tensor
    bits_per_weight: float  # the BitStack Linears' loaded blocks and scales, per weight
    blocks: int  # blocks loaded (of every BitStack Linear)
    metric: QualityMetric
    quality: float


def is_bitstack(path: Path) -> bool:
    """Whether `path` is a saved model with BitStack layers."""
    description = Path(path) / FORMAT_FILE
    return description.exists() and bool(json.loads(description.read_text()).get(BitStackFormat.name))


def default_budgets(path: Path, points: int = CURVE_POINTS) -> list[float]:
    """`points` budgets (MiB) evenly spaced from the smallest loadable size to everything."""
    full = read_plan(path)
    low, high = full.minimum_bytes, full.total_bytes
    if points < 2 or high == low:
        return [high / MIB]
    return [(low + (high - low) * i / (points - 1)) / MIB for i in range(points)]


def size_quality_curve(
    path: Path,
    texts: list[str],
    budgets_mb: list[float] | None = None,
    *,
    base_dir: Path | None = None,
    batch_size: int = 16,
    max_length: int = 128,
) -> list[CurvePoint]:
    """Quality of the BitStack model at `path` under each memory budget (default:
    `default_budgets`), smallest budget first. Encoders need `base_dir` (fidelity)."""
    budgets = sorted(budgets_mb if budgets_mb is not None else default_budgets(path))
    reference: torch.Tensor | None = None
    points = []
    for budget in budgets:
        plan = read_plan(path, budget)
        loaded = load_compressed(path, memory_budget_mb=budget)
        metric = family(loaded.kind).quality_metric  # the family's headline quality metric
        if metric == "perplexity":
            quality = perplexity(loaded.model, _batches(loaded, texts, batch_size, max_length))
        elif metric == "fidelity_cosine":
            if base_dir is None:
                raise ValueError("the size/quality curve of an encoder needs base_dir (fidelity to the base)")
            if reference is None:
                reference = _embeddings(load_compressed(base_dir), texts, batch_size, max_length)
            quality = fidelity.mean_cosine(reference, _embeddings(loaded, texts, batch_size, max_length))
        else:
            raise ValueError(f"the size/quality curve measures {', '.join(get_args(QualityMetric))}; "
                             f"{loaded.kind} models are scored by {metric}")
        blocks = bitstack_loaded(loaded.model)
        points.append(CurvePoint(
            budget_mb=budget, weights_mb=plan.total_bytes / MIB,
            bits_per_weight=blocks.bits_per_weight, blocks=blocks.loaded, metric=metric,
            quality=quality,
        ))
        log.info("bitstack curve: %.4g MiB (%d blocks, %.3g bits/weight): %s %.6g",
                 budget, blocks.loaded, blocks.bits_per_weight, metric, quality)
    return points


def curve_metrics(points: list[CurvePoint]) -> dict[str, float]:
    """`bitstack_curve_<i>_<field>` for each point, smallest budget first."""
    metrics: dict[str, float] = {}
    for i, point in enumerate(sorted(points, key=lambda p: p.budget_mb)):
        metrics[f"{PREFIX}_{i}_mb"] = point.weights_mb
        metrics[f"{PREFIX}_{i}_budget_mb"] = point.budget_mb
        metrics[f"{PREFIX}_{i}_bits_per_weight"] = point.bits_per_weight
        metrics[f"{PREFIX}_{i}_blocks"] = float(point.blocks)
        metrics[f"{PREFIX}_{i}_{point.metric}"] = point.quality
    return metrics


def curve_from_metrics(metrics: dict[str, float]) -> list[CurvePoint]:
    """The curve `curve_metrics` flattened (e.g. a registered version's metrics)."""
    indices = sorted({int(m.group(1)) for key in metrics
                      if (m := re.fullmatch(rf"{PREFIX}_(\d+)_mb", key))})
    points = []
    for i in indices:
        metric = next((name for name in get_args(QualityMetric) if f"{PREFIX}_{i}_{name}" in metrics),
                      None)
        if metric is None:
            continue
        points.append(CurvePoint(
            budget_mb=metrics.get(f"{PREFIX}_{i}_budget_mb", metrics[f"{PREFIX}_{i}_mb"]),
            weights_mb=metrics[f"{PREFIX}_{i}_mb"],
            bits_per_weight=metrics.get(f"{PREFIX}_{i}_bits_per_weight", float("nan")),
            blocks=int(metrics.get(f"{PREFIX}_{i}_blocks", 0)),
            metric=metric,  # type: ignore[arg-type]
            quality=metrics[f"{PREFIX}_{i}_{metric}"],
        ))
    return points


def pick_budget(points: list[CurvePoint], target: float) -> CurvePoint | None:
    """The smallest budget whose quality meets `target` (perplexity at most, fidelity at
    least), or None when no point does."""
    for point in sorted(points, key=lambda p: p.budget_mb):
        quality = metric_of(point.metric)
        if quality.score(point.quality) >= quality.score(target):  # target or better
            return point
    return None


def curve_plot(points: list[CurvePoint], path: Path, base_quality: float | None = None) -> Path:
    """Quality vs MiB read, one marker per budget (and the base as a line): a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError("no curve points to plot")
    ordered = sorted(points, key=lambda p: p.weights_mb)
    metric = ordered[0].metric
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot([p.weights_mb for p in ordered], [p.quality for p in ordered], marker="o")
    for point in ordered:
        axes.annotate(f"{point.bits_per_weight:.2g} b/w", (point.weights_mb, point.quality),
                      textcoords="offset points", xytext=(4, 4), fontsize=7)
    if base_quality is not None:
        axes.axhline(base_quality, linestyle="--", color="gray", label="base")
        axes.legend()
    better = metric_of(metric).direction
    axes.set_xlabel("memory budget: stored tensors read (MiB)")
    axes.set_ylabel(f"{metric} ({better} is better)")
    axes.set_title("BitStack: one decomposition, every size")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _batches(loaded: LoadedModel, texts: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    return list(tokenized_batches(texts, loaded.tokenizer, batch_size=batch_size, max_length=max_length))


def _embeddings(loaded: LoadedModel, texts: list[str], batch_size: int, max_length: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([
            mean_pooled_embeddings(loaded.model, b["input_ids"], b["attention_mask"])
            for b in _batches(loaded, texts, batch_size, max_length)
        ])

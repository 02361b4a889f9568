"""Comparison tables and trade-off plots from measured metrics (pure: no registry).

Plots put every version of a registered model, the base and the new candidate on
two charts, quality vs size and quality vs latency, so a reviewer sees where the
new variant sits on the trade-off.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from squeezeflow.evaluation.metrics import headline_quality

# (label, candidate metric, base metric) rows of the comparison table
COMPARED = (
    ("fidelity cosine", "fidelity_cosine", None),
    ("fidelity Spearman", "fidelity_spearman", None),
    ("fidelity top-k", "fidelity_topk", None),
    ("perplexity", "perplexity", "base_perplexity"),
    ("weights (MB)", "weights_mb", "base_weights_mb"),
    ("latency p50 (ms)", "latency_p50_ms", "base_latency_p50_ms"),
    ("latency p95 (ms)", "latency_p95_ms", "base_latency_p95_ms"),
    ("decode tokens/s", "decode_tokens_per_s", "base_decode_tokens_per_s"),
    ("peak memory (MB)", "peak_memory_mb", "base_peak_memory_mb"),
    ("parameters", "parameters", "base_parameters"),
    ("linear sparsity", "linear_sparsity", "base_linear_sparsity"),
)


class ComparisonRow(BaseModel):
    metric: str
    base: float | None
    candidate: float
    ratio: float | None  # candidate / base


class TradeoffPoint(BaseModel):
    label: str
    quality: float
    size_mb: float | None
    latency_ms: float | None


def comparison_rows(metrics: dict[str, float]) -> list[ComparisonRow]:
    rows = []
    for label, name, base_name in COMPARED:
        if name not in metrics:
            continue
        base = metrics.get(base_name) if base_name else None
        ratio = metrics[name] / base if base else None
        rows.append(ComparisonRow(metric=label, base=base, candidate=metrics[name], ratio=ratio))
    return rows


def comparison_markdown(rows: list[ComparisonRow]) -> str:
    def show(value: float | None) -> str:
        return "" if value is None else f"{value:.6g}"

    lines = ["| metric | base | candidate | candidate / base |", "|---|---|---|---|"]
    lines += [f"| {r.metric} | {show(r.base)} | {show(r.candidate)} | {show(r.ratio)} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def quality_axis(metrics: dict[str, float]) -> tuple[str, float, float] | None:
    """(axis label, candidate quality, base quality) of the model family's headline
    quality metric (the metric table), or None when it or its base value is missing."""
    quality = headline_quality(metrics)
    if quality is None:
        return None
    base = quality.base_value(metrics)
    if base is None:
        return None
    label = f"{quality.name} ({quality.direction} is better)"
    return label, metrics[quality.name], base


def tradeoff_plots(points: list[TradeoffPoint], quality_label: str, folder: Path) -> list[Path]:
    """Write quality_vs_size.png and quality_vs_latency.png; skips an axis nobody measured."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for attribute, axis_label, filename in (
        ("size_mb", "weights on disk (MB)", "quality_vs_size.png"),
        ("latency_ms", "latency p50 (ms)", "quality_vs_latency.png"),
    ):
        measured = [p for p in points if getattr(p, attribute) is not None]
        if not measured:
            continue
        figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
        for point in measured:
            marker = "s" if point.label == "base" else "*" if point.label == "new" else "o"
            axes.scatter(getattr(point, attribute), point.quality, marker=marker, s=80)
            axes.annotate(point.label, (getattr(point, attribute), point.quality),
                          textcoords="offset points", xytext=(5, 5), fontsize=8)
        axes.set_xlabel(axis_label)
        axes.set_ylabel(quality_label)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        path = folder / filename
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written

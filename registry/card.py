"""A markdown model card written from the measured metrics of a run."""

from __future__ import annotations

from squeezeflow.evaluation.metrics import METRICS, headline_quality
from squeezeflow.registry.records import RunRecord

# the metrics a card shows, in this order; units and directions come from the metric table
HEADLINE = (
    "fidelity_cosine", "fidelity_spearman", "fidelity_topk", "perplexity", "base_perplexity",
    "perplexity_ratio", "compression_ratio", "weights_mb", "base_weights_mb", "speedup",
    "latency_p50_ms", "base_latency_p50_ms", "decode_tokens_per_s", "base_decode_tokens_per_s",
    "decode_speedup", "peak_memory_mb", "base_peak_memory_mb",
    "parameters", "linear_sparsity",
)


def model_card(record: RunRecord) -> str:
    lines = [
        f"# {record.model_name}: {record.recipe_name}",
        "",
        f"Compressed from `{record.base_model}` ({record.kind}) by squeezeflow "
        f"{record.code_version}.",
        "",
        "## Lineage",
        f"- base model sha256: `{record.base_sha256}`",
        f"- recipe sha256: `{record.recipe_sha256}`",
        *[f"- {name} data sha256: `{digest}`" for name, digest in record.data_sha256.items()],
        f"- model sha256: `{record.candidate_sha256}`",
        "",
        "## Stages",
        *[
            f"- `{stage.name}`: {stage.seconds:.1f} s, checkpoint `{stage.checkpoint_sha256[:12]}`"
            for stage in record.stages
        ],
        "",
        "## Measured metrics",
        *_quality_line(record.metrics),
        "| metric | value | unit | better |",
        "|---|---|---|---|",
        *[_metric_row(name, record.metrics[name]) for name in HEADLINE if name in record.metrics],
        "",
        *_measured_on(record.evaluation_tags),
        "## Gates",
    ]
    if not record.gate_results:
        lines.append("No gates in the recipe.")
    for result in record.gate_results:
        value = "missing" if result.value is None else f"{result.value:.6g}"
        lines.append(f"- {'PASS' if result.passed else 'FAIL'}: {result.gate} (measured {value})")
    return "\n".join(lines) + "\n"


def _quality_line(metrics: dict[str, float]) -> list[str]:
    """Which metric is this model's quality, and which way is better."""
    quality = headline_quality(metrics)
    if quality is None:
        return []
    return [f"Quality: {quality.name} ({quality.description}; {quality.direction} is better).", ""]


def _metric_row(name: str, value: float) -> str:
    known = METRICS.get(name)
    unit = known.unit if known is not None else ""
    better = known.direction if known is not None and known.direction is not None else "-"
    return f"| {name} | {value:.6g} | {unit} | {better} |"


def _measured_on(tags: dict[str, str]) -> list[str]:
    """One line naming the machine and kernels the speeds were measured with."""
    if not tags:
        return []
    threads = tags.get("threads", "?")
    line = (
        f"Speeds measured on {tags.get('cpu_model', 'an unknown CPU')} "
        f"({tags.get('cpu_capability', '?')}, {threads} threads), "
        f"torch {tags.get('torch_version', '?')}"
    )
    if tags.get("kernel_mix"):
        line += f"; kernels: `{tags['kernel_mix']}`"
    return [line + ".", ""]

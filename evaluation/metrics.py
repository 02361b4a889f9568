"""The metric table: what each metric measures, its unit, and which direction is better.

Every metric an evaluation logs has one record here (`Metric`), or matches a registered
pattern (`register_metric_pattern`, for families of names such as
`task_<name>_acc`). Gates, promotion, model cards, the CLI and recipe validation ask
this table instead of deciding "is perplexity lower-is-better?" on their own:

    >>> metric("perplexity").direction
    'lower'
    >>> metric("perplexity").better(9.0, 10.0)
    True

A base model's value of a metric is logged as `base_<name>`; it is looked up as
`<name>` (same direction and unit), so the table lists each metric once.

Quality metrics say which model families they measure (`quality_for`); each family's
headline quality metric is named by the family itself (`compression/families.py`).
A quality "drop" is measured in the metric's direction, as a fraction: 0.01 = one
percent worse (`relative`: perplexity 10 -> 10.1) or one point worse on a metric that
is already a fraction (`absolute`: cosine 1.00 -> 0.99).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from squeezeflow.compression.families import FAMILIES

Direction = Literal["higher", "lower"]
DropKind = Literal["absolute", "relative"]
BASE_PREFIX = "base_"  # the base model's value of a metric (evaluation/suite.py)


class UnknownMetricError(KeyError):
    """A metric name that is neither in the table nor matched by a registered pattern."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class Metric:
    """One metric: its name, which direction is better (None: informational, no
    better or worse), unit, a short description, and the families whose quality it
    measures (empty: not a quality metric)."""

    name: str
    direction: Direction | None
    unit: str
    description: str
    quality_for: tuple[str, ...] = ()
    # how a drop is measured: "absolute" for metrics that are fractions already (cosine,
    # accuracy: 0.01 = one point), "relative" for unbounded ones (perplexity: 0.01 = 1 %)
    drop: DropKind = "relative"
    # the base model's value by definition when it has none of its own (fidelity of the
    # base to itself is 1.0); None: the base's value is the logged `base_<name>`
    reference: float | None = None
    label: str = ""  # short name for narrow tables ("ppl"); default: the name
    # a comparison of the candidate with its base (speed-up, ratio, fidelity): the base
    # has no value of its own, so there is no `base_<name>`
    compares: bool = False
    evaluated: bool = True  # logged by an evaluation (False: computed at promotion time)

    @property
    def is_quality(self) -> bool:
        return bool(self.quality_for)

    @property
    def short(self) -> str:
        return self.label or self.name

    def score(self, value: float) -> float:
        """`value` as a higher-is-better number (negated when lower is better)."""
        if self.direction is None:
            raise ValueError(f"metric {self.name!r} is informational: it has no better or worse")
        return value if self.direction == "higher" else -value

    def better(self, value: float, other: float) -> bool:
        """Whether `value` is strictly better than `other`."""
        return self.score(value) > self.score(other)

    def drop_from(self, value: float, reference: float) -> float:
        """How much worse `value` is than `reference`, in this metric's direction
        (negative: better). Relative drops divide by the reference."""
        worse_by = self.score(reference) - self.score(value)
        if self.drop == "absolute":
            return worse_by
        return worse_by / abs(reference)

    def base_value(self, metrics: dict[str, float]) -> float | None:
        """The base model's value among a run's `metrics` (or the definitional one)."""
        if self.reference is not None:
            return self.reference
        return metrics.get(BASE_PREFIX + self.name)


@dataclass(frozen=True)
class MetricPattern:
    """A family of metric names matched by a regular expression (full match); the
    description may use the pattern's named groups: "accuracy on task {task}"."""

    pattern: re.Pattern[str]
    direction: Direction | None
    unit: str
    description: str
    quality_for: tuple[str, ...] = ()
    drop: DropKind = "relative"

    def match(self, name: str) -> Metric | None:
        found = self.pattern.fullmatch(name)
        if found is None:
            return None
        return Metric(
            name=name, direction=self.direction, unit=self.unit,
            description=self.description.format(**found.groupdict()),
            quality_for=self.quality_for, drop=self.drop,
        )


class MetricTable:
    """Metrics by name and name patterns. One instance lives in this module (`METRICS`)."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._patterns: list[MetricPattern] = []

    def add(self, entry: Metric) -> Metric:
        if entry.name in self._metrics:
            raise ValueError(f"metric {entry.name!r} is already in the metric table")
        if entry.direction not in ("higher", "lower", None):
            raise ValueError(
                f"metric {entry.name!r}: direction {entry.direction!r}; valid: higher, lower, None"
            )
        self._metrics[entry.name] = entry
        return entry

    def add_pattern(self, entry: MetricPattern) -> MetricPattern:
        if any(p.pattern.pattern == entry.pattern.pattern for p in self._patterns):
            raise ValueError(f"metric pattern {entry.pattern.pattern!r} is already registered")
        self._patterns.append(entry)
        return entry

    def remove(self, name_or_pattern: str) -> None:
        """Unregister a metric or a pattern (tests registering a temporary one)."""
        self._metrics.pop(name_or_pattern, None)
        self._patterns = [p for p in self._patterns if p.pattern.pattern != name_or_pattern]

    def get(self, name: str) -> Metric | None:
        """The metric `name`, or None when neither the table nor a pattern knows it."""
        if name in self._metrics:
            return self._metrics[name]
        for pattern in self._patterns:  # registration order: the first match wins
            if (found := pattern.match(name)) is not None:
                return found
        if name.startswith(BASE_PREFIX):
            own = self.get(name[len(BASE_PREFIX):])
            if own is not None and not own.compares:
                return Metric(
                    name=name, direction=own.direction, unit=own.unit,
                    description=f"the base model's {own.description}", drop=own.drop,
                    label=f"base {own.short}",
                )  # not a quality metric of its own: it is the reference
        return None

    def __getitem__(self, name: str) -> Metric:
        found = self.get(name)
        if found is None:
            raise UnknownMetricError(
                f"unknown metric {name!r}; known metrics: {', '.join(self.names())}"
                + (f"; and names matching {', '.join(self.patterns())}" if self._patterns else "")
                + f" (a base model's value is {BASE_PREFIX}<name>)"
            )
        return found

    def names(self) -> list[str]:
        """Every metric registered by name (not the base_ variants or patterns), sorted."""
        return sorted(self._metrics)

    def evaluated_names(self) -> list[str]:
        """What an evaluation logs by name (recipe gates can use these): each metric
        and, for those that are not comparisons with the base, `base_<name>`; sorted."""
        logged = [m for m in self._metrics.values() if m.evaluated]
        return sorted({m.name for m in logged}
                      | {BASE_PREFIX + m.name for m in logged if not m.compares})

    def patterns(self) -> list[str]:
        return [p.pattern.pattern for p in self._patterns]

    def pattern_entries(self) -> list[MetricPattern]:
        return list(self._patterns)

    def entries(self) -> list[Metric]:
        """Every metric registered by name, in registration order."""
        return list(self._metrics.values())

    def quality_metrics(self, family: str | None = None) -> list[Metric]:
        """Quality metrics (of `family`, or all), in registration order."""
        return [m for m in self._metrics.values()
                if m.is_quality and (family is None or family in m.quality_for)]


METRICS = MetricTable()


def register_metric(
    name: str,
    direction: Direction | None,
    unit: str,
    description: str,
    *,
    quality_for: Iterable[str] = (),
    drop: DropKind = "relative",
    reference: float | None = None,
    label: str = "",
    compares: bool = False,
    evaluated: bool = True,
) -> Metric:
    """Add one metric to the table; a name registered twice is an error."""
    return METRICS.add(Metric(
        name=name, direction=direction, unit=unit, description=description,
        quality_for=tuple(quality_for), drop=drop, reference=reference, label=label,
        compares=compares, evaluated=evaluated,
    ))


def register_metric_pattern(
    pattern: str,
    direction: Direction | None,
    unit: str,
    description: str,
    *,
    quality_for: Iterable[str] = (),
    drop: DropKind = "relative",
) -> MetricPattern:
    """Add a family of metric names: `pattern` is a regular expression the whole name
    must match, e.g. `task_(?P<task>\\w+)_acc` (then "{task}" in the description is
    the matched task). Names registered one by one win over patterns; among patterns
    the first registered that matches wins."""
    return METRICS.add_pattern(MetricPattern(
        pattern=re.compile(pattern), direction=direction, unit=unit, description=description,
        quality_for=tuple(quality_for), drop=drop,
    ))


def metric(name: str) -> Metric:
    """The metric `name`; an unknown name raises UnknownMetricError listing the known."""
    return METRICS[name]


def is_known(name: str) -> bool:
    return METRICS.get(name) is not None


def is_evaluated(name: str) -> bool:
    """Whether an evaluation can log `name` (what a recipe gate may name): a metric an
    evaluation logs, its base's value, or a name a registered pattern matches."""
    return name in METRICS.evaluated_names() or any(
        p.pattern.fullmatch(name) for p in METRICS.pattern_entries()
    )


def describe_evaluated() -> str:
    """The names `is_evaluated` accepts, for error messages."""
    patterns = METRICS.patterns()
    return ", ".join(METRICS.evaluated_names()) + (
        f"; and names matching {', '.join(patterns)}" if patterns else ""
    )


def direction(name: str) -> Direction | None:
    """Which way `name` is better; None for informational and unknown metrics."""
    found = METRICS.get(name)
    return None if found is None else found.direction


# ---- the built-in metrics (what evaluation/suite.py and promotion produce) ----

# quality: encoders are scored by fidelity of their embeddings to the base's
register_metric("fidelity_cosine", "higher", "cosine",
                "mean cosine similarity of the candidate's embeddings to the base's",
                quality_for=("encoder",), drop="absolute", reference=1.0, label="cos", compares=True)
register_metric("fidelity_spearman", "higher", "rho",
                "Spearman correlation of pairwise similarities, candidate vs base",
                quality_for=("encoder",), drop="absolute", reference=1.0, label="spearman", compares=True)
register_metric("fidelity_topk", "higher", "fraction",
                "fraction of top-k nearest neighbours shared with the base",
                quality_for=("encoder",), drop="absolute", reference=1.0, label="top-k", compares=True)
# quality: causal LMs are scored by perplexity on held-out text
register_metric("perplexity", "lower", "ppl", "perplexity on the evaluation texts",
                quality_for=("causal-lm",), label="ppl")
register_metric("perplexity_ratio", "lower", "x", "candidate perplexity / base perplexity",
                quality_for=("causal-lm",), reference=1.0, label="ppl ratio", compares=True)
# speed
register_metric("latency_p50_ms", "lower", "ms", "median latency of one batch forward",
                label="p50 ms")
register_metric("latency_p95_ms", "lower", "ms", "95th percentile latency of one batch forward")
register_metric("latency_mean_ms", "lower", "ms", "mean latency of one batch forward")
register_metric("decode_tokens_per_s", "higher", "tokens/s",
                "greedy decode throughput at batch 1 with the KV cache (causal LMs)")
register_metric("speedup", "higher", "x", "base p50 latency / candidate p50 latency", compares=True)
register_metric("decode_speedup", "higher", "x",
                "candidate decode tokens/s / base decode tokens/s", compares=True)
# size and memory
register_metric("weights_mb", "lower", "MiB", "stored weight tensors on disk", label="MB")
register_metric("size_mb", "lower", "MiB", "every file of the model folder on disk")
register_metric("compression_ratio", "higher", "x", "base weights MiB / candidate weights MiB",
                label="ratio", compares=True)
register_metric("peak_memory_mb", "lower", "MiB", "peak resident memory loading and running once")
register_metric("memory_ratio", "lower", "x", "candidate peak memory / base peak memory", compares=True)
register_metric("parameters", "lower", "count", "unique parameters")
register_metric("nonzero_parameters", "lower", "count", "non-zero parameters")
register_metric("linear_sparsity", None, "fraction", "zero fraction of Linear weights")
# promotion (evaluation/gates.py): drops in the quality metric's own direction
register_metric("quality_drop_vs_base", "lower", "fraction",
                "quality drop of the candidate vs its base (0.01 = 1 % worse)",
                compares=True, evaluated=False)
register_metric("quality_drop_vs_champion", "lower", "fraction",
                "quality drop of the candidate vs the current champion (0.01 = 1 % worse)",
                compares=True, evaluated=False)
# the BitStack size/quality curve (evaluation/bitstack_curve.py): points, not verdicts
register_metric_pattern(r"bitstack_curve_(?P<i>\d+)_(?P<field>\w+)", None, "",
                        "BitStack size/quality curve point {i}: {field}")
# task accuracy (evaluation/task_specs.py): task_<task>_<metric>, scores of labelled tasks
_TASK = r"task_(?P<task>[A-Za-z0-9][A-Za-z0-9_.-]*?)_"
register_metric_pattern(_TASK + r"(?P<name>\w+)_stderr", None, "",
                        "standard error of {name} on task {task}")
register_metric_pattern(  # fractions of examples (lm-eval's and our encoder tasks')
    _TASK + r"(?P<name>acc|acc_norm|exact_match\w*|f1|mcc|recall_at_\d+|mrr)", "higher", "fraction",
    "{name} on task {task}", drop="absolute")
register_metric_pattern(_TASK + r"(?P<name>spearman)", "higher", "rho",
                        "Spearman of cosine vs gold similarity on task {task}", drop="absolute")
register_metric_pattern(_TASK + r"(?P<name>word_perplexity|byte_perplexity|bits_per_byte)",
                        "lower", "", "{name} on task {task}")


def headline_quality(metrics: dict[str, float]) -> Metric | None:
    """The headline quality metric among a run's `metrics`: that of the first model
    family (in registration order) whose headline metric was measured; None if none."""
    for entry in FAMILIES.entries():
        if entry.quality_metric in metrics:
            return metric(entry.quality_metric)
    return None

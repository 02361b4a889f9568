"""Promotion gates: pure checks of measured metrics against thresholds.

A gate passes only when its metric was measured; a missing metric fails the gate
(an alias never moves on missing numbers). Which way a metric is better comes from
the metric table (`evaluation/metrics.py`): a gate can say `worst:` (the worst
acceptable value, a max for perplexity, a min for fidelity), and a lone bound that
would let only worse models pass (`min` on perplexity) is an error.
"""

from __future__ import annotations

from pydantic import BaseModel, model_validator

from squeezeflow.compression.config import StrictModel
from squeezeflow.evaluation.metrics import METRICS, Metric, headline_quality


class Gate(StrictModel):
    metric: str
    min: float | None = None
    max: float | None = None
    worst: float | None = None  # the worst acceptable value, in the metric's direction

    @model_validator(mode="after")
    def _has_bound(self) -> Gate:
        if self.min is None and self.max is None and self.worst is None:
            raise ValueError(f"gate on {self.metric!r} needs 'min' or 'max' (or 'worst', "
                             "the worst acceptable value in the metric's direction)")
        known = METRICS.get(self.metric)  # unknown names: the recipe says which are known
        if self.worst is not None:
            if known is None or known.direction is None:
                why = "is not in the metric table" if known is None else "is informational"
                raise ValueError(f"gate on {self.metric!r}: 'worst' needs a direction, and "
                                 f"{self.metric!r} {why}; use 'min' or 'max'")
            if self.min is not None or self.max is not None:
                raise ValueError(f"gate on {self.metric!r}: give 'worst' or 'min'/'max', not both")
        elif known is not None and known.direction is not None:
            wrong, right = ("min", "max") if known.direction == "lower" else ("max", "min")
            if getattr(self, wrong) is not None and getattr(self, right) is None:
                raise ValueError(  # a lone bound that only worse models can pass
                    f"gate on {self.metric!r}: {known.direction} is better, so a lone "
                    f"'{wrong}' would pass only worse models; use '{right}' or 'worst' "
                    f"(both 'min' and 'max' for a range)"
                )
        return self

    def bounds(self) -> tuple[float | None, float | None]:
        """(min, max), with `worst` turned into the bound its metric's direction gives."""
        if self.worst is None:
            return self.min, self.max
        if METRICS[self.metric].direction == "higher":
            return self.worst, None
        return None, self.worst

    def describe(self) -> str:
        low, high = self.bounds()
        bounds = []
        if low is not None:
            bounds.append(f">= {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        return f"{self.metric} {' and '.join(bounds)}"


class GateResult(BaseModel):
    gate: str
    value: float | None
    passed: bool


def check_gates(gates: list[Gate], metrics: dict[str, float]) -> list[GateResult]:
    results = []
    for gate in gates:
        value = metrics.get(gate.metric)
        passed = value is not None and value == value  # NaN never passes
        low, high = gate.bounds()
        if passed and low is not None:
            passed = value >= low  # type: ignore[operator]
        if passed and high is not None:
            passed = value <= high  # type: ignore[operator]
        results.append(GateResult(gate=gate.describe(), value=value, passed=passed))
    return results


# Promotion compares a candidate with the current champion (and the base). Quality is
# the headline quality metric of the model's family (fidelity to the base for
# encoders, perplexity for causal LMs); a "drop" is a fraction in that metric's
# direction: 0.01 = one percent worse (see Metric.drop_from).
class PromotionGates(StrictModel):
    max_quality_drop: float | None = None  # vs the base and vs the current champion
    min_speedup: float | None = None  # candidate latency speed-up over the base
    min_decode_speedup: float | None = None  # decode tokens/s over the base (causal LMs)
    max_size_mb: float | None = None  # weights on disk
    max_latency_ms: float | None = None  # p50 latency

    def is_empty(self) -> bool:
        return all(value is None for value in self.model_dump().values())

    def merged(self, overrides: PromotionGates) -> PromotionGates:
        """These gates with every value set in `overrides` replaced."""
        values = {k: v for k, v in overrides.model_dump().items() if v is not None}
        return self.model_copy(update=values)


def quality_drops(
    candidate: dict[str, float], champion: dict[str, float] | None
) -> dict[str, float | None]:
    """Fractional quality drop of the candidate vs the base and vs the champion, in
    the direction of the candidate's headline quality metric (None: not measured)."""
    drops: dict[str, float | None] = {"vs_base": None, "vs_champion": None}
    quality: Metric | None = headline_quality(candidate)
    if quality is None:
        return drops
    value = candidate[quality.name]
    base = quality.base_value(candidate)
    if base is not None:
        drops["vs_base"] = quality.drop_from(value, base)
    if champion is not None and quality.name in champion:
        drops["vs_champion"] = quality.drop_from(value, champion[quality.name])
    return drops


def promotion_checks(
    gates: PromotionGates, candidate: dict[str, float], champion: dict[str, float] | None
) -> list[GateResult]:
    """Every promotion gate as a GateResult; a missing metric fails its gate."""
    checks: list[Gate] = []
    values = dict(candidate)
    if gates.max_quality_drop is not None:
        drops = quality_drops(candidate, champion)
        values["quality_drop_vs_base"] = drops["vs_base"]  # type: ignore[assignment]
        checks.append(Gate(metric="quality_drop_vs_base", max=gates.max_quality_drop))
        if champion is not None:
            values["quality_drop_vs_champion"] = drops["vs_champion"]  # type: ignore[assignment]
            checks.append(Gate(metric="quality_drop_vs_champion", max=gates.max_quality_drop))
    if gates.min_speedup is not None:
        checks.append(Gate(metric="speedup", min=gates.min_speedup))
    if gates.min_decode_speedup is not None:
        checks.append(Gate(metric="decode_speedup", min=gates.min_decode_speedup))
    if gates.max_size_mb is not None:
        checks.append(Gate(metric="weights_mb", max=gates.max_size_mb))
    if gates.max_latency_ms is not None:
        checks.append(Gate(metric="latency_p50_ms", max=gates.max_latency_ms))
    present = {k: v for k, v in values.items() if v is not None}
    return check_gates(checks, present)


def quality_score(metrics: dict[str, float]) -> float:
    """Higher is better: the headline quality metric of the model's family, negated
    when lower is better (perplexity); -inf when none was measured."""
    quality = headline_quality(metrics)
    if quality is None:
        return float("-inf")
    return quality.score(metrics[quality.name])

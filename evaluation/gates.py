"""Promotion gates: pure checks of measured metrics against thresholds.

A gate passes only when its metric was measured; a missing metric fails the gate
(an alias never moves on missing numbers).
"""

from __future__ import annotations

from pydantic import BaseModel, model_validator

from squeezeflow.compression.config import StrictModel


class Gate(StrictModel):
    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_bound(self) -> Gate:
        if self.min is None and self.max is None:
            raise ValueError(f"gate on {self.metric!r} needs 'min' or 'max'")
        return self

    def describe(self) -> str:
        bounds = []
        if self.min is not None:
            bounds.append(f">= {self.min:g}")
        if self.max is not None:
            bounds.append(f"<= {self.max:g}")
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
        if passed and gate.min is not None:
            passed = value >= gate.min  # type: ignore[operator]
        if passed and gate.max is not None:
            passed = value <= gate.max  # type: ignore[operator]
        results.append(GateResult(gate=gate.describe(), value=value, passed=passed))
    return results


# Promotion compares a candidate with the current champion (and the base). Quality is
# fidelity to the base for encoders and perplexity for causal LMs; a "drop" is a
# fraction: 0.01 = one percent worse.
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
    """Fractional quality drop of the candidate vs the base and vs the champion."""
    drops: dict[str, float | None] = {"vs_base": None, "vs_champion": None}
    if "fidelity_cosine" in candidate:
        drops["vs_base"] = 1.0 - candidate["fidelity_cosine"]
        if champion is not None:
            drops["vs_champion"] = (
                champion["fidelity_cosine"] - candidate["fidelity_cosine"]
                if "fidelity_cosine" in champion else None
            )
    elif "perplexity" in candidate:
        if "base_perplexity" in candidate:
            drops["vs_base"] = candidate["perplexity"] / candidate["base_perplexity"] - 1.0
        if champion is not None:
            drops["vs_champion"] = (
                candidate["perplexity"] / champion["perplexity"] - 1.0
                if "perplexity" in champion else None
            )
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
    """Higher is better: fidelity for encoders, negative perplexity for causal LMs."""
    if "fidelity_cosine" in metrics:
        return metrics["fidelity_cosine"]
    if "perplexity" in metrics:
        return -metrics["perplexity"]
    return float("-inf")

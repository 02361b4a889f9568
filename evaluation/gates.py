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

"""Inference latency: warm-up calls, then timed repeats; p50/p95 in milliseconds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def measure_latency(call: Callable[[], object], *, warmup: int, repeats: int) -> dict[str, float]:
    """Time `call` `repeats` times after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    with torch.inference_mode():
        for _ in range(warmup):
            call()
        times_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times_ms.append((time.perf_counter() - start) * 1000.0)
    times_ms.sort()
    return {
        "latency_p50_ms": statistics.median(times_ms),
        "latency_p95_ms": _percentile(times_ms, 0.95),
        "latency_mean_ms": statistics.fmean(times_ms),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list."""
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)

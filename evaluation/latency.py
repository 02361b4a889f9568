"""Inference speed: warm-up calls, then timed repeats; p50/p95 in milliseconds.

Base and candidate are timed interleaved (`interleaved`): after both are warmed up,
every repeat runs one then the other, swapping which goes first each repeat, so a
burst of load from elsewhere on the machine (or a clock change) hits both alike and
neither always runs on the caches the other left behind. Timing one model fully and
then the other lets a change of machine state between the two show up as a speed-up.

Decode throughput (`decode_timer`) is greedy generation with the KV cache at batch 1:
the time from the end of the prompt's forward (prefill) to the end of the last
token's forward, per decoded token, so prefill never inflates or hides it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

Measured = Callable[[], float]  # runs once; returns the seconds it measured


def timed(call: Callable[[], object]) -> Measured:
    """`call` as a Measured: the wall-clock seconds of one call."""

    def run() -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    return run


def interleaved(
    base: Measured, candidate: Measured, *, warmup: int, repeats: int
) -> tuple[list[float], list[float]]:
    """`warmup` untimed calls of each, then `repeats` measurements of each, interleaved.

    Repeat i runs base then candidate for even i, candidate then base for odd i (the
    warm-up alternates the same way). Returns (base seconds, candidate seconds).
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    base_seconds: list[float] = []
    candidate_seconds: list[float] = []
    pairs = ((base, base_seconds), (candidate, candidate_seconds))
    with torch.inference_mode():
        for index in range(warmup):
            for measured, _ in pairs if index % 2 == 0 else pairs[::-1]:
                measured()
        for index in range(repeats):
            for measured, seconds in pairs if index % 2 == 0 else pairs[::-1]:
                seconds.append(measured())
    return base_seconds, candidate_seconds


def latency_stats(seconds: list[float]) -> dict[str, float]:
    """p50, p95 and mean of measured seconds, in milliseconds."""
    times_ms = sorted(s * 1000.0 for s in seconds)
    return {
        "latency_p50_ms": statistics.median(times_ms),
        "latency_p95_ms": _percentile(times_ms, 0.95),
        "latency_mean_ms": statistics.fmean(times_ms),
    }


def measure_latency(call: Callable[[], object], *, warmup: int, repeats: int) -> dict[str, float]:
    """Time `call` `repeats` times after `warmup` untimed calls (one model alone)."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    measured = timed(call)
    with torch.inference_mode():
        for _ in range(warmup):
            call()
        seconds = [measured() for _ in range(repeats)]
    return latency_stats(seconds)


def decode_timer(
    model: nn.Module,
    input_ids: Tensor,
    new_tokens: int,
    pad_token_id: int | None,
) -> Measured:
    """A Measured that generates exactly `new_tokens` greedily after `input_ids` (1, prompt)
    with the KV cache, and returns the seconds per decoded token (prefill excluded)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"decode is timed at batch 1, got a batch of {input_ids.shape[0]}")

    def run() -> float:
        sequences, forward_ends = greedy_generate(model, input_ids, new_tokens, pad_token_id)
        generated = sequences.shape[1] - input_ids.shape[1]
        if generated != new_tokens:
            raise RuntimeError(
                f"asked for {new_tokens} new tokens, the model generated {generated} "
                "(lower evaluation.latency.decode_tokens?)"
            )
        # forward 0 is the prefill; each later forward decodes one token
        return (forward_ends[-1] - forward_ends[0]) / (len(forward_ends) - 1)

    return run


def greedy_generate(
    model: nn.Module, input_ids: Tensor, new_tokens: int, pad_token_id: int | None
) -> tuple[Tensor, list[float]]:
    """Greedy `generate` of exactly `new_tokens` tokens (min_new_tokens stops EOS from
    ending it early); returns the sequences (batch, prompt + new) and the perf_counter
    time at the end of each forward of the model (prefill first)."""
    forward_ends: list[float] = []

    def stamp(*_: object) -> None:
        forward_ends.append(time.perf_counter())

    hook = model.register_forward_hook(stamp)
    try:
        sequences = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id,
        )
    finally:
        hook.remove()
    return sequences, forward_ends


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list."""
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)

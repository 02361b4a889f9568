"""The metric table: directions, gates and promotion read in each metric's direction."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from squeezeflow.evaluation import metrics as table
from squeezeflow.evaluation.gates import (
    Gate,
    PromotionGates,
    check_gates,
    promotion_checks,
    quality_drops,
    quality_score,
)
from squeezeflow.evaluation.metrics import UnknownMetricError, metric, register_metric_pattern
from squeezeflow.registry.card import model_card
from squeezeflow.registry.records import RunRecord


@pytest.mark.parametrize(("name", "direction"), [
    ("perplexity", "lower"), ("base_perplexity", "lower"), ("perplexity_ratio", "lower"),
    ("fidelity_cosine", "higher"), ("fidelity_spearman", "higher"), ("fidelity_topk", "higher"),
    ("latency_p50_ms", "lower"), ("base_latency_p95_ms", "lower"), ("speedup", "higher"),
    ("decode_tokens_per_s", "higher"), ("decode_speedup", "higher"), ("weights_mb", "lower"),
    ("compression_ratio", "higher"), ("peak_memory_mb", "lower"), ("memory_ratio", "lower"),
    ("quality_drop_vs_base", "lower"), ("linear_sparsity", None), ("bitstack_curve_2_mb", None),
])
def test_directions(name: str, direction: str | None) -> None:
    assert metric(name).direction == direction


def test_better_follows_the_direction() -> None:
    assert metric("perplexity").better(9.0, 10.0) and not metric("perplexity").better(11.0, 10.0)
    assert metric("fidelity_cosine").better(0.99, 0.9)
    assert not metric("fidelity_cosine").better(0.9, 0.99)
    with pytest.raises(ValueError, match="informational"):
        metric("linear_sparsity").score(0.5)


def test_unknown_metric_names_the_known_ones() -> None:
    with pytest.raises(UnknownMetricError, match="unknown metric 'perplexty'; known metrics: .*perplexity"):
        metric("perplexty")
    # a comparison with the base has no base value of its own
    assert table.METRICS.get("base_speedup") is None and table.METRICS.get("base_fidelity_cosine") is None


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="already in the metric table"):
        table.register_metric("perplexity", "lower", "ppl", "again")


def test_gate_on_perplexity_ratio_with_max() -> None:
    gate = Gate(metric="perplexity_ratio", max=1.05)
    assert [r.passed for r in check_gates([gate] * 2, {"perplexity_ratio": 1.02})] == [True, True]
    assert check_gates([gate], {"perplexity_ratio": 1.10})[0].passed is False


def test_a_lone_bound_on_the_wrong_side_is_an_error() -> None:
    with pytest.raises(ValueError, match="lower is better, so a lone 'min' would pass only worse"):
        Gate(metric="perplexity_ratio", min=1.05)
    with pytest.raises(ValueError, match="higher is better, so a lone 'max'"):
        Gate(metric="fidelity_cosine", max=0.9)
    ranged = Gate(metric="perplexity_ratio", min=0.5, max=1.05)  # a range is deliberate
    assert check_gates([ranged], {"perplexity_ratio": 0.4})[0].passed is False


@pytest.mark.parametrize(("name", "worst", "good", "bad", "described"), [
    ("perplexity_ratio", 1.05, 1.01, 1.2, "perplexity_ratio <= 1.05"),
    ("fidelity_cosine", 0.95, 0.99, 0.9, "fidelity_cosine >= 0.95"),
])
def test_worst_is_a_bound_in_the_metric_direction(
    name: str, worst: float, good: float, bad: float, described: str
) -> None:
    gate = Gate(metric=name, worst=worst)
    assert gate.describe() == described
    assert check_gates([gate], {name: good})[0].passed is True
    assert check_gates([gate], {name: bad})[0].passed is False


def test_worst_needs_a_direction() -> None:
    with pytest.raises(ValueError, match="informational"):
        Gate(metric="linear_sparsity", worst=0.5)


def test_quality_score_orders_the_better_model_higher() -> None:
    better_encoder, worse_encoder = {"fidelity_cosine": 0.99}, {"fidelity_cosine": 0.90}
    better_lm, worse_lm = {"perplexity": 10.0}, {"perplexity": 12.0}
    assert quality_score(better_encoder) > quality_score(worse_encoder)
    assert quality_score(better_lm) > quality_score(worse_lm)
    assert quality_score({"speedup": 2.0}) == float("-inf")


def test_quality_drops_are_in_the_metric_direction() -> None:
    lm = {"perplexity": 11.0, "base_perplexity": 10.0}
    drops = quality_drops(lm, {"perplexity": 12.0})
    assert drops["vs_base"] == pytest.approx(0.1)  # 10 -> 11: 10 % worse
    assert drops["vs_champion"] == pytest.approx(11.0 / 12.0 - 1.0)  # better than it: negative
    encoder = quality_drops({"fidelity_cosine": 0.97}, {"fidelity_cosine": 0.99})
    assert encoder["vs_base"] == pytest.approx(0.03)  # vs the base itself (cosine 1.0)
    assert encoder["vs_champion"] == pytest.approx(0.02)
    assert quality_drops({"speedup": 2.0}, None) == {"vs_base": None, "vs_champion": None}


def test_promotion_gate_on_quality_drop() -> None:
    gates = PromotionGates(max_quality_drop=0.05)
    ok = promotion_checks(gates, {"perplexity": 10.2, "base_perplexity": 10.0}, None)
    worse = promotion_checks(gates, {"perplexity": 11.0, "base_perplexity": 10.0}, None)
    assert [r.passed for r in ok] == [True] and [r.passed for r in worse] == [False]


@pytest.fixture
def task_patterns() -> Iterator[None]:
    """Task accuracy as another helper registers it: one name per task."""
    acc = r"mytask_(?P<task>\w+)_acc"
    stderr = r"mytask_(?P<task>\w+)_acc_stderr"
    register_metric_pattern(acc, "higher", "fraction", "accuracy on task {task}",
                            drop="absolute")
    register_metric_pattern(stderr, None, "fraction", "standard error of task {task}'s accuracy")
    yield
    table.METRICS.remove(acc)
    table.METRICS.remove(stderr)


@pytest.mark.usefixtures("task_patterns")
def test_patterns_name_families_of_metrics() -> None:
    acc, stderr = metric("mytask_hellaswag_acc"), metric("mytask_hellaswag_acc_stderr")
    assert (acc.direction, stderr.direction) == ("higher", None)
    assert acc.description == "accuracy on task hellaswag"
    assert metric("base_mytask_hellaswag_acc").direction == "higher"
    assert table.is_evaluated("mytask_hellaswag_acc") and not table.is_evaluated("mytask_hellaswag")
    gate = Gate(metric="mytask_hellaswag_acc", worst=0.5)  # a min: higher is better
    assert check_gates([gate], {"mytask_hellaswag_acc": 0.4})[0].passed is False
    with pytest.raises(ValueError, match="informational"):
        Gate(metric="mytask_hellaswag_acc_stderr", worst=0.1)


def test_a_removed_pattern_no_longer_matches() -> None:
    register_metric_pattern(r"toy_(?P<n>\d+)", "lower", "s", "toy {n}")
    assert metric("toy_3").description == "toy 3"
    with pytest.raises(ValueError, match="already registered"):
        register_metric_pattern(r"toy_(?P<n>\d+)", "lower", "s", "again")
    table.METRICS.remove(r"toy_(?P<n>\d+)")
    with pytest.raises(UnknownMetricError):
        metric("toy_3")


def test_card_gives_unit_and_direction() -> None:
    record = RunRecord(
        recipe_name="r", recipe={}, recipe_sha256="a" * 64, model_name="m", experiment="e",
        tracking_uri=None, alias="candidate", base_model="base", base_sha256="b" * 64,
        kind="causal-lm", data_sha256={}, stages=[],
        metrics={"perplexity": 11.0, "base_perplexity": 10.0, "speedup": 1.5},
        gate_results=[], model_dir="/nowhere", candidate_sha256="d" * 64, code_version="0",
    )
    card = model_card(record)
    assert "Quality: perplexity (perplexity on the evaluation texts; lower is better)." in card
    assert "| perplexity | 11 | ppl | lower |" in card and "| speedup | 1.5 | x | higher |" in card

from __future__ import annotations

import math

import pytest
import torch

from squeezeflow.evaluation import fidelity
from squeezeflow.evaluation.gates import Gate, check_gates
from squeezeflow.evaluation.latency import measure_latency
from squeezeflow.evaluation.perplexity import perplexity


def test_identical_embeddings_have_perfect_fidelity() -> None:
    emb = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    assert fidelity.mean_cosine(emb, emb) == pytest.approx(1.0)
    assert fidelity.similarity_spearman(emb, emb) == pytest.approx(1.0)
    assert fidelity.topk_agreement(emb, emb, k=3) == pytest.approx(1.0)


def test_unrelated_embeddings_have_low_fidelity() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    assert abs(fidelity.mean_cosine(a, b)) < 0.2
    assert abs(fidelity.similarity_spearman(a, b)) < 0.2
    assert fidelity.topk_agreement(a, b, k=3) < 0.3


def test_spearman_matches_a_hand_computed_case_with_ties() -> None:
    x = torch.tensor([1.0, 2.0, 2.0, 4.0, 5.0])
    y = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])
    # ranks x: 0, 1.5, 1.5, 3, 4; y: 0, 1, 2.5, 4, 2.5 -> Pearson of the ranks
    rx = torch.tensor([0, 1.5, 1.5, 3, 4], dtype=torch.float64)
    ry = torch.tensor([0, 1, 2.5, 4, 2.5], dtype=torch.float64)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    expected = float(rx @ ry / (rx.norm() * ry.norm()))
    assert fidelity.spearman(x, y) == pytest.approx(expected)
    assert fidelity.spearman(x, -x) == pytest.approx(-1.0)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    vocab = 37

    class Uniform(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            logits = torch.zeros(*input_ids.shape, vocab)
            return type("Out", (), {"logits": logits})()

    ids = torch.randint(0, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding is ignored
    assert perplexity(Uniform(), [{"input_ids": ids, "attention_mask": mask}]) == pytest.approx(vocab)


def test_latency_percentiles_are_ordered() -> None:
    calls = []
    stats = measure_latency(lambda: calls.append(sum(range(20000))), warmup=2, repeats=7)
    assert len(calls) == 9
    assert 0 < stats["latency_p50_ms"] <= stats["latency_p95_ms"]


def test_gates_fail_on_missing_or_nan_metrics() -> None:
    gates = [Gate(metric="fidelity_cosine", min=0.99), Gate(metric="speedup", min=1.0),
             Gate(metric="weights_mb", max=10)]
    results = check_gates(gates, {"fidelity_cosine": 0.995, "weights_mb": math.nan})
    assert [r.passed for r in results] == [True, False, False]
    assert results[1].value is None
    assert check_gates([Gate(metric="weights_mb", max=10)], {"weights_mb": 12.0})[0].passed is False


def test_gate_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="needs 'min' or 'max'"):
        Gate(metric="speedup")

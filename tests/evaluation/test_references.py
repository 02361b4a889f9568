"""The base's side of the quality metrics, kept between evaluations (`ReferenceCache`):
computed once per base, texts and settings, and the metrics the same as computing it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertModel, PreTrainedModel

from squeezeflow import sampledata
from squeezeflow.compression.artifact import save_compressed
from squeezeflow.compression.cache import collect_garbage, entries
from squeezeflow.evaluation import suite
from squeezeflow.testing import tiny_bert, tiny_llama

SETTINGS = suite.EvaluationSettings(suites=("quality",), batch_size=4, max_length=32)


def _pair(kind: str, folder: Path) -> tuple[Path, Path]:
    """A saved base and a visibly perturbed candidate of `kind`."""
    model: PreTrainedModel
    if kind == "causal-lm":
        model, tokenizer = tiny_llama(seed=0)
    else:
        bert, tokenizer = tiny_bert(seed=0)
        model = BertModel(bert.config).eval()  # with the pooler AutoModel builds on loading
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in candidate.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return (save_compressed(model, tokenizer, kind, folder / "base"),
            save_compressed(candidate, tokenizer, kind, folder / "candidate"))


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of a function of the suite (a forward over all texts of one model)."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(suite, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(suite, name, counted)
    return calls


@pytest.mark.parametrize(("kind", "model_pass"), [("causal-lm", "perplexity"), ("encoder", "embed")])
def test_the_base_reference_is_computed_once_and_gives_the_same_metrics(
    kind: str, model_pass: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, candidate_dir = _pair(kind, tmp_path)
    texts = sampledata.sentences(12, seed=3)
    uncached = suite.evaluate(base_dir, candidate_dir, texts, SETTINGS).metrics

    passes = _counting(monkeypatch, model_pass)
    cache = suite.ReferenceCache(tmp_path / "references", base_id="base-1")
    first = suite.evaluate(base_dir, candidate_dir, texts, SETTINGS, references=cache).metrics
    assert len(passes) == 2  # base and candidate
    assert len(list((tmp_path / "references").glob("*.pt"))) == 1
    second = suite.evaluate(base_dir, candidate_dir, texts, SETTINGS, references=cache).metrics
    assert len(passes) == 3  # the candidate only
    assert first == uncached and second == uncached  # the kept reference is exact

    # other texts, other batch settings, another base: computed again, and different
    other_texts = suite.evaluate(base_dir, candidate_dir, sampledata.sentences(12, seed=4), SETTINGS,
                                 references=cache).metrics
    assert len(passes) == 5
    assert other_texts != uncached
    shorter = SETTINGS.model_copy(update={"max_length": 8})
    suite.evaluate(base_dir, candidate_dir, texts, shorter, references=cache)
    assert len(passes) == 7
    suite.evaluate(base_dir, candidate_dir, texts, SETTINGS,
                   references=suite.ReferenceCache(cache.folder, base_id="base-2"))
    assert len(passes) == 9
    assert len(list(cache.folder.glob("*.pt"))) == 4


def test_a_damaged_reference_is_computed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    base_dir, candidate_dir = _pair("causal-lm", tmp_path)
    texts = sampledata.sentences(8, seed=3)
    root = tmp_path / "work"  # a workspace: its references are cache entries like the rest
    cache = suite.ReferenceCache(root / "references", base_id="base-1")
    expected = suite.evaluate(base_dir, candidate_dir, texts, SETTINGS, references=cache).metrics
    (entry,) = cache.folder.glob("*.pt")
    entry.write_bytes(b"not a tensor file")
    passes = _counting(monkeypatch, "perplexity")
    again = suite.evaluate(base_dir, candidate_dir, texts, SETTINGS, references=cache).metrics
    assert len(passes) == 2 and again == expected
    assert "unreadable" in caplog.text
    assert torch.load(entry, weights_only=True)["perplexity"].item() == expected["base_perplexity"]
    (listed,) = entries(root)
    assert (listed.kind, listed.path, listed.in_use) == ("references", entry, False)
    assert collect_garbage(root, max_bytes=0) == [listed] and not entry.exists()


def test_with_its_references_kept_the_base_is_not_loaded(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir, candidate_dir = _pair("causal-lm", tmp_path)
    texts = sampledata.sentences(8, seed=3)
    settings = SETTINGS.model_copy(update={"suites": ("quality", "size")})
    uncached = suite.evaluate(base_dir, candidate_dir, texts, settings)
    loads: list[Path] = []
    load = suite.load_compressed
    monkeypatch.setattr(suite, "load_compressed",
                        lambda path, **kw: loads.append(Path(path)) or load(path, **kw))
    cache = suite.ReferenceCache(tmp_path / "references", base_id="base-1")
    first = suite.evaluate(base_dir, candidate_dir, texts, settings, references=cache)
    assert loads == [candidate_dir, base_dir]
    second = suite.evaluate(base_dir, candidate_dir, texts, settings, references=cache)
    assert loads == [candidate_dir, base_dir, candidate_dir]  # the base's side came from the cache
    assert first.metrics == uncached.metrics == second.metrics
    assert uncached.metrics["base_parameters"] == uncached.metrics["parameters"] > 0  # same shapes
    # its kernels are reported only where it ran
    assert "base_kernel_mix" in first.tags and "base_kernel_mix" not in second.tags
    latency = settings.model_copy(update={"suites": ("quality", "size", "latency")})
    suite.evaluate(base_dir, candidate_dir, texts, latency, references=cache)
    assert loads[-2:] == [candidate_dir, base_dir]  # a suite that runs the base loads it

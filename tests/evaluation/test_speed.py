"""Honest speed metrics: interleaved timing, decode throughput, what they ran on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation import latency, machine, suite
from squeezeflow.evaluation.latency import decode_timer, greedy_generate, interleaved
from squeezeflow.evaluation.suite import EvaluationSettings, evaluate
from squeezeflow.testing import save_model, tiny_llama


def recorder(name: str, calls: list[str], seconds: float) -> Callable[[], float]:
    def run() -> float:
        calls.append(name)
        return seconds

    return run


def test_interleaving_alternates_which_model_runs_first() -> None:
    calls: list[str] = []
    base_s, cand_s = interleaved(recorder("base", calls, 1.0), recorder("cand", calls, 2.0),
                                 warmup=2, repeats=5)
    warmup = ["base", "cand", "cand", "base"]
    timed = ["base", "cand", "cand", "base", "base", "cand", "cand", "base", "base", "cand"]
    assert calls == warmup + timed
    # each side keeps its own measurements, warm-up excluded
    assert base_s == [1.0] * 5 and cand_s == [2.0] * 5


def test_interleaving_without_warmup_and_its_stats() -> None:
    calls: list[str] = []
    base_s, cand_s = interleaved(recorder("b", calls, 0.004), recorder("c", calls, 0.002),
                                 warmup=0, repeats=3)
    assert calls == ["b", "c", "c", "b", "b", "c"]
    stats = latency.latency_stats(cand_s)
    assert stats["latency_p50_ms"] == pytest.approx(2.0)
    assert stats["latency_mean_ms"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="repeats"):
        interleaved(recorder("b", calls, 0.0), recorder("c", calls, 0.0), warmup=0, repeats=0)


def count_forwards(model: nn.Module) -> tuple[list[int], Callable[[], None]]:
    count = [0]

    def hook(*_: object) -> None:
        count[0] += 1

    handle = model.register_forward_hook(hook)
    return count, handle.remove


def test_decode_generates_exactly_n_tokens_even_when_eos_wins() -> None:
    model, tokenizer = tiny_llama(seed=3)
    eos = tokenizer.eos_token_id
    assert eos is not None

    def eos_always_wins(_: nn.Module, __: object, logits: Tensor) -> Tensor:
        boosted = logits.clone()
        boosted[..., eos] += 1e4  # greedy would stop after one token without min_new_tokens
        return boosted

    model.lm_head.register_forward_hook(eos_always_wins)
    prompt = tokenizer("The robot repaired the fence", return_tensors="pt")["input_ids"]
    new_tokens = 12

    sequences, forward_ends = greedy_generate(model, prompt, new_tokens, tokenizer.pad_token_id)
    assert sequences.shape == (1, prompt.shape[1] + new_tokens)
    assert len(forward_ends) == new_tokens  # the prefill, then one forward per later token
    assert forward_ends == sorted(forward_ends)

    count, remove = count_forwards(model)
    seconds_per_token = decode_timer(model, prompt, new_tokens, tokenizer.pad_token_id)()
    remove()
    assert count[0] == new_tokens
    assert 0 < seconds_per_token < 1.0  # a 2-layer, 64-wide model decodes far faster than 1 tok/s
    with pytest.raises(ValueError, match="at least 2"):
        decode_timer(model, prompt, 1, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="batch 1"):
        decode_timer(model, prompt.repeat(2, 1), 4, tokenizer.pad_token_id)


@pytest.mark.slow
def test_evaluate_interleaves_and_reports_decode_and_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny_llama(hidden=64, layers=2, intermediate=128, seed=1)
    base_dir = save_model(model, tokenizer, tmp_path / "base")
    run_stage_steps(model, [CATALOG.build(CATALOG.parse({"kind": "rtn", "bits": 8}))], [])
    candidate_dir = save_compressed(model, tokenizer, "causal-lm", tmp_path / "int8")

    # count the timed forwards: warm-up + repeats of a prefill each, then of N-token decodes
    spied: list[tuple[int, int]] = []

    def spy(base: latency.Measured, candidate: latency.Measured, *, warmup: int,
            repeats: int) -> tuple[list[float], list[float]]:
        spied.append((warmup, repeats))
        return interleaved(base, candidate, warmup=warmup, repeats=repeats)

    monkeypatch.setattr(suite, "interleaved", spy)
    settings = EvaluationSettings.model_validate({
        "suites": ["latency"], "max_length": 32,
        "latency": {"warmup": 1, "repeats": 3, "batch_size": 4, "decode_tokens": 8},
    })
    report = evaluate(base_dir, candidate_dir, sampledata.sentences(8, seed=4), settings)

    assert spied == [(1, 3), (1, 3)]  # prefill latency, then decode: both interleaved
    metrics = report.metrics
    for prefix in ("", "base_"):
        assert 0 < metrics[prefix + "latency_p50_ms"] <= metrics[prefix + "latency_p95_ms"]
        # positive and finite; no lower bound: on a loaded 2-core machine a tiny model's
        # decode fell from ~300 to ~4 tokens/s (thread oversubscription), base and candidate alike
        assert 0 < metrics[prefix + "decode_tokens_per_s"] < float("inf")
    assert metrics["speedup"] == pytest.approx(
        metrics["base_latency_p50_ms"] / metrics["latency_p50_ms"])
    assert metrics["decode_speedup"] == pytest.approx(
        metrics["decode_tokens_per_s"] / metrics["base_decode_tokens_per_s"])
    assert set(metrics) <= set(suite.KNOWN_METRICS)

    tags = report.tags
    assert tags["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["cpu_model"] == machine.cpu_model() and tags["cpu_model"]
    assert tags["torch_version"] == torch.__version__
    assert tags["threads"] == str(torch.get_num_threads())
    mix = json.loads(tags["kernel_mix"])
    # 2 blocks x 7 Linears, all 8-bit; each counts once per kernel it chose
    assert mix and all("/" in name and count >= 1 for name, count in mix.items())
    assert sum(mix.values()) >= 14
    assert json.loads(tags["base_kernel_mix"]) == {}  # the base is dense


def test_cpu_model_falls_back_without_torch_cpuinfo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("cpuinfo unavailable")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000 @ 3.0GHz\n")
    monkeypatch.setattr(machine, "CPUINFO", cpuinfo)
    assert machine.cpu_model() == "Test CPU 9000 @ 3.0GHz"

    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")  # off Linux
    monkeypatch.setattr(machine.platform, "processor", lambda: "arm")
    assert machine.cpu_model() == "arm"
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    assert machine.cpu_model() == "unknown"

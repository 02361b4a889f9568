"""The machine a run's speeds were measured on: tags on the run and version, a card line."""

from __future__ import annotations

import torch

from squeezeflow.evaluation.machine import machine_tags
from squeezeflow.registry.card import model_card
from squeezeflow.registry.records import RunRecord
from squeezeflow.registry.runs import lineage_tags


def record(evaluation_tags: dict[str, str]) -> RunRecord:
    return RunRecord(
        recipe_name="r", recipe={}, recipe_sha256="a" * 64, model_name="m", experiment="e",
        tracking_uri=None, alias="candidate", base_model="base", base_sha256="b" * 64,
        kind="causal-lm", data_sha256={"evaluation": "c" * 64}, stages=[],
        metrics={"decode_tokens_per_s": 120.0, "base_decode_tokens_per_s": 100.0,
                 "decode_speedup": 1.2},
        gate_results=[], model_dir="/nowhere", candidate_sha256="d" * 64, code_version="0",
        evaluation_tags=evaluation_tags,
    )


def test_evaluation_tags_become_prefixed_tags_and_a_card_line() -> None:
    measured_on = machine_tags() | {"kernel_mix": '{"int8/int8pack_bf16": 14}'}
    tags = lineage_tags(record(measured_on))
    assert tags["squeezeflow.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["squeezeflow.kernel_mix"] == '{"int8/int8pack_bf16": 14}'
    assert tags["squeezeflow.model_sha256"] == "d" * 64  # lineage tags unchanged

    card = model_card(record(measured_on))
    capability = torch.backends.cpu.get_cpu_capability()
    assert f"Speeds measured on {measured_on['cpu_model']} ({capability}, " in card
    assert '`{"int8/int8pack_bf16": 14}`' in card
    assert "| decode_tokens_per_s | 120 |" in card and "| decode_speedup | 1.2 |" in card


def test_lineage_keys_win_over_a_clashing_evaluation_tag() -> None:
    tags = lineage_tags(record({"model_sha256": "forged", "threads": "4"}))
    assert tags["squeezeflow.model_sha256"] == "d" * 64
    assert tags["squeezeflow.threads"] == "4"
    assert "Speeds measured on" in model_card(record({"threads": "4"}))
    assert "Speeds measured on" not in model_card(record({}))

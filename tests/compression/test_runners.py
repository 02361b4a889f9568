"""The layer-wise runner: each block must observe what the compressed blocks before it produce."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import pytest
import torch
from torch import nn

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.config import StepConfig
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.step import Needs, Step, StepReport, calibration_tokens, hooks
from squeezeflow.testing import tiny_bert, tiny_llama, tiny_mixtral


class RecordConfig(StepConfig):
    kind: Literal["record"] = "record"
    targets: tuple[str, ...] = ("*q_proj", "*query")


class RecordInputsStep(Step[RecordConfig]):
    """Records the inputs its modules see, then zeroes their weights (a big change)."""

    needs = Needs.LAYERWISE

    def __init__(self, config: RecordConfig) -> None:
        super().__init__(config)
        self.seen: dict[str, list[torch.Tensor]] = {}

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        handles = []
        for name, module in modules.items():
            def record(_: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                self.seen.setdefault(name, []).append(args[0].detach().clone())
            handles.append(module.register_forward_pre_hook(record))
        with hooks(handles):
            yield

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        for module in modules.values():
            module.weight.data.mul_(0.5)
        return StepReport(kind="record", per_module={n: {"seen": 1.0} for n in modules})


def test_layerwise_blocks_see_outputs_of_compressed_predecessors() -> None:
    model, tokenizer = tiny_llama(layers=3)
    batch = dict(tokenizer(["The robot repaired the garden fence.", "Yesterday it rained."],
                           padding=True, return_tensors="pt"))
    step = RecordInputsStep(RecordConfig())
    reference = RecordInputsStep(RecordConfig())
    run_stage_steps(model, [step], [batch])
    # Replay on the final model: block k's q_proj input must equal what the runner showed it,
    # because blocks < k were already compressed when block k was observed.
    prefix, blocks = find_blocks(model)
    with reference.observe(reference.select(model)):
        model(**batch, use_cache=False)
    assert len(step.seen) == len(blocks) == 3
    for name, seen in step.seen.items():
        # the last block's own weights changed after observation, but its input did not
        torch.testing.assert_close(seen[0], reference.seen[name][0], rtol=1e-5, atol=1e-5)
    # an uncompressed forward would differ from block 1 on: the test could catch a stale input
    fresh, _ = tiny_llama(layers=3)
    other = RecordInputsStep(RecordConfig())
    with other.observe(other.select(fresh)):
        fresh(**batch, use_cache=False)
    name = sorted(step.seen)[-1]
    assert not torch.allclose(other.seen[name][0], step.seen[name][0], atol=1e-4)


def test_layerwise_runner_on_encoder_blocks() -> None:
    model, tokenizer = tiny_bert()
    batch = dict(tokenizer(["The robot repaired the garden fence."], return_tensors="pt"))
    step = RecordInputsStep(RecordConfig())
    reports = run_stage_steps(model, [step], [batch])
    assert reports[0].metrics["modules"] == 2.0
    for module in model.modules():
        assert not module._forward_pre_hooks


def test_stage_needing_data_without_data_is_an_error() -> None:
    model, _ = tiny_llama()
    try:
        run_stage_steps(model, [RecordInputsStep(RecordConfig())], [])
    except ValueError as error:
        assert "calibration" in str(error)
    else:
        raise AssertionError("expected a ValueError")


@pytest.mark.parametrize("kind", ["wanda", "gptq", "smoothquant"])
def test_calibration_statistics_leave_padding_out(kind: str) -> None:
    """One padded batch calibrates exactly like the same sentences unpadded, one per batch."""
    model, tokenizer = tiny_llama(layers=2)
    sentences = ["The robot repaired the garden fence before the storm came.", "It rained.",
                 "A small dog ran."]
    padded = [dict(tokenizer(sentences, padding=True, return_tensors="pt"))]
    assert int(padded[0]["attention_mask"].sum()) < padded[0]["attention_mask"].numel()
    alone = [dict(tokenizer([s], return_tensors="pt")) for s in sentences]
    config: dict[str, object] = {"kind": kind}
    if kind == "wanda":
        config["sparsity"] = 0.5
    if kind == "gptq":
        config["calibration_precision"] = "fp32"
    results = []
    for batches in (padded, alone):
        candidate = copy.deepcopy(model)
        run_stage_steps(candidate, [CATALOG.build(CATALOG.parse(config))], batches)
        results.append(candidate.state_dict())
    for name, tensor in results[0].items():
        torch.testing.assert_close(tensor, results[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_moe_routing_statistics_leave_padding_out() -> None:
    """The router's logits come flattened (batch * seq, experts); padding is still dropped."""
    model, tokenizer = tiny_mixtral()
    sentences = ["The robot repaired the garden fence before the storm came.", "It rained."]
    padded = [dict(tokenizer(sentences, padding=True, return_tensors="pt"))]
    alone = [dict(tokenizer([s], return_tensors="pt")) for s in sentences]
    stats = []
    for batches in (padded, alone):
        step = CATALOG.build(CATALOG.parse({"kind": "moe_merge", "experts": 2}))
        modules = step.select(model)
        with step.observe(modules), torch.no_grad():
            for batch in batches:
                with calibration_tokens(batch["attention_mask"]):
                    model(**batch, use_cache=False)
        stats.append({name: step.stats[name] for name in modules})
    for name, routing in stats[0].items():
        torch.testing.assert_close(routing.counts, stats[1][name].counts)
        torch.testing.assert_close(routing.gram, stats[1][name].gram)


@pytest.mark.parametrize("config", [
    {"kind": "wanda", "sparsity": 0.5},
    {"kind": "sparsegpt", "sparsity": 0.5},
    {"kind": "gptq", "calibration_precision": "fp32"},
    {"kind": "smoothquant"},
    {"kind": "structured", "remove_heads": 2, "remove_channels": 0.25},
    {"kind": "depth", "remove": 1},
    {"kind": "share", "group_size": 2},
    {"kind": "lowrank", "param_ratio": 0.6},
], ids=lambda config: str(config["kind"]))
def test_more_padding_changes_no_result_and_no_reported_statistic(config: dict[str, object]) -> None:
    """The same sentences padded further: the compressed model's outputs and every reported
    metric are unchanged (outputs, not weights: low-rank factors are defined up to a basis)."""
    model, tokenizer = tiny_llama(layers=3)
    sentences = ["The robot repaired the garden fence before the storm came.", "It rained."]
    longest = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    width = longest["input_ids"].shape[1] + 9
    wider = dict(tokenizer(sentences, padding="max_length", max_length=width, return_tensors="pt"))
    probe = dict(tokenizer(["A small dog ran past the old mill."], return_tensors="pt"))
    outcomes = []
    for batch in (longest, wider):
        candidate = copy.deepcopy(model)
        (report,) = run_stage_steps(candidate, [CATALOG.build(CATALOG.parse(config))], [batch])
        with torch.no_grad():
            logits = candidate(**probe, use_cache=False).logits
        outcomes.append((logits, report.per_module))
    (logits, reported), (wider_logits, wider_reported) = outcomes
    torch.testing.assert_close(logits, wider_logits, rtol=1e-4, atol=1e-4)
    assert reported.keys() == wider_reported.keys()
    for module, values in reported.items():
        assert values == pytest.approx(wider_reported[module], rel=1e-4, abs=1e-6), module


def test_observing_pass_stops_once_every_observed_input_was_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ observes only its Linears' inputs: the observing forward stops after the last
    of them (down_proj never runs in that pass) and the result is the same as a full pass."""
    model, tokenizer = tiny_llama(layers=2)
    batch = dict(tokenizer(["The robot repaired the garden fence.", "Yesterday it rained."],
                           padding=True, return_tensors="pt"))
    config = CATALOG.parse({"kind": "gptq", "bits": 4, "group_size": 32,
                            "targets": ["*q_proj", "*k_proj", "*v_proj", "*gate_proj", "*up_proj"]})
    _, blocks = find_blocks(model)
    calls: list[str] = []

    def count(module: nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
        calls.append("down")

    full = copy.deepcopy(model)
    handles = [block.mlp.down_proj.register_forward_pre_hook(count) for block in blocks]
    run_stage_steps(model, [CATALOG.build(config)], [batch])
    for handle in handles:
        handle.remove()
    assert len(calls) == len(blocks) - 1  # recompute passes only (none after the last block)

    monkeypatch.setattr(type(CATALOG.build(config)), "observes_inputs_only", property(lambda self: False))
    _, full_blocks = find_blocks(full)
    calls.clear()
    handles = [block.mlp.down_proj.register_forward_pre_hook(count) for block in full_blocks]
    run_stage_steps(full, [CATALOG.build(config)], [batch])
    assert len(calls) == 2 * len(blocks) - 1  # observing and recompute passes
    for (name, ours), theirs in zip(model.state_dict().items(), full.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name

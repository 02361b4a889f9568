"""True-sequential GPTQ (`sequential: true`): one paused forward per batch gives exactly
what compressing group by group with a full replay per group gives."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import load_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.pruning.sparsegpt.config import SparseGPTConfig
from squeezeflow.compression.quantization.gptq.gptqmodel_backend import gptqmodel_quantize_config
from squeezeflow.compression.quantization.gptq.step import GPTQConfig, GPTQStep
from squeezeflow.compression.quantization.rtn.step import RTNConfig, RTNStep
from squeezeflow.compression.runners import (
    calibration_matmuls,
    capture_block_inputs,
    hidden_of,
    run_stage_steps,
)
from squeezeflow.compression.sequential import input_groups
from squeezeflow.compression.step import calibration_tokens
from squeezeflow.compression.streaming import stream_stage
from squeezeflow.testing import save_model, tiny_bert, tiny_llama

LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _calibration(tokenizer: object, count: int = 12, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    # sentences of different lengths: padded batches, so the masks matter too
    return list(tokenized_batches(sampledata.sentences(count, seed=3), tokenizer,
                                  batch_size=batch_size, max_length=32))


def _replayed(model: nn.Module, config: Any, calibration: list[dict[str, torch.Tensor]]) -> None:
    """True-sequential compression the plain way: per block, per group of Linears sharing
    an input, a full forward of every batch observes the group, which is then compressed;
    a last forward gives the next block's inputs."""
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], calibration)
    masks = [batch.get("attention_mask") for batch in calibration]
    # bf16 calibration matmuls where this CPU has them, as the runners use (apply: fp32)
    bf16 = CATALOG.build(config).calibration_precision == "bf16"
    for index, block in enumerate(blocks):
        for group in LLAMA_GROUPS:
            step = CATALOG.build(config.model_copy(update={"sequential": False}))
            modules = {f"{prefix}.{index}.{name}": block.get_submodule(name) for name in group}
            with step.observe(modules), calibration_matmuls(bf16):
                for (args, kwargs), mask in zip(inputs, masks, strict=True):
                    with calibration_tokens(mask):
                        block(*args, **kwargs)
            step.apply(modules)
        with calibration_matmuls(bf16):
            inputs = [((hidden_of(block(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in inputs]


@pytest.mark.parametrize("config", [
    GPTQConfig(bits=3, group_size=32, sequential=True, calibration_precision="fp32"),
    GPTQConfig(bits=3, group_size=32, sequential=True, calibration_precision="bf16"),
    SparseGPTConfig(sparsity=0.5, sequential=True),
    SparseGPTConfig(pattern="2:4", bits=4, group_size=32, sequential=True),
], ids=["gptq-fp32", "gptq-bf16", "sparsegpt", "sparsegpt-2:4-int4"])
def test_one_paused_forward_per_batch_equals_a_replay_per_group(config: Any) -> None:
    model, tokenizer = tiny_llama(layers=3)
    calibration = _calibration(tokenizer)
    expected = copy.deepcopy(model)
    with torch.no_grad():
        _replayed(expected, config, calibration)
    default = copy.deepcopy(model)
    run_stage_steps(default, [CATALOG.build(config.model_copy(update={"sequential": False}))], calibration)
    reports = run_stage_steps(model, [CATALOG.build(config)], calibration)
    differs = False
    for (name, tensor), (_, wanted), (_, plain) in zip(model.state_dict().items(),
                                                       expected.state_dict().items(),
                                                       default.state_dict().items(), strict=True):
        assert torch.equal(tensor, wanted), name
        differs = differs or not torch.equal(tensor, plain)
    assert differs  # later groups' Hessians come from the quantized earlier groups
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert sorted(reports[0].per_module) == sorted(linears)


def test_each_linear_computes_once_per_batch() -> None:
    model, tokenizer = tiny_llama(layers=3)
    calibration = _calibration(tokenizer)  # 3 batches
    calls: Counter[str] = Counter()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            module.register_forward_hook(lambda m, a, o, name=name: calls.update([name]))
    run_stage_steps(model, [GPTQStep(GPTQConfig(sequential=True))], calibration)
    for index in range(3):
        for group in LLAMA_GROUPS:
            for name in group:
                full = f"model.layers.{index}.{name}"
                probe = int(index == 0 and group != LLAMA_GROUPS[-1])  # first layout only, cut at down
                unused = index == 2 and group == LLAMA_GROUPS[-1]  # the last block's outputs feed nothing
                assert calls[full] == (0 if unused else 3 + probe), full


def test_groups_are_learned_from_the_inputs_each_linear_sees() -> None:
    model, tokenizer = tiny_llama(layers=1)
    block = find_blocks(model)[1][0]
    inputs = capture_block_inputs(model, block, _calibration(tokenizer, count=4))
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert input_groups(block, linears, inputs[0], None) == LLAMA_GROUPS
    bert, bert_tokenizer = tiny_bert(layers=1)
    bert_block = find_blocks(bert)[1][0]
    bert_inputs = capture_block_inputs(bert, bert_block, _calibration(bert_tokenizer, count=4))
    linears = {n: m for n, m in bert_block.named_modules() if isinstance(m, nn.Linear)}
    assert input_groups(bert_block, linears, bert_inputs[0], None) == [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"], ["intermediate.dense"], ["output.dense"]]


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_streamed_sequential_stage_writes_the_in_memory_weights(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = build(layers=3)
    folder = save_model(model, tokenizer, tmp_path / "model")
    calibration = _calibration(tokenizer)
    config = GPTQConfig(bits=4, group_size=32, sequential=True)
    in_memory = load_compressed(folder).model
    run_stage_steps(in_memory, [GPTQStep(config)], calibration)
    reports = stream_stage(folder, [GPTQStep(config)], calibration, tmp_path / "out")
    streamed = load_compressed(tmp_path / "out").model.state_dict()
    for name, tensor in in_memory.state_dict().items():
        if not name.startswith("pooler."):  # not in the checkpoint: initialized at random
            assert torch.equal(streamed[name], tensor), name
    assert reports[0].metrics["modules"] == 18 if build is tiny_bert else 21


def test_a_sequential_step_must_be_alone_in_its_stage() -> None:
    model, tokenizer = tiny_llama(layers=1)
    steps = [GPTQStep(GPTQConfig(sequential=True, targets=["*q_proj"])),
             RTNStep(RTNConfig(targets=["*down_proj"]))]
    with pytest.raises(ValueError, match="sequential: true must be the only step of its stage"):
        run_stage_steps(model, steps, _calibration(tokenizer, count=4))


def test_a_forward_that_skips_a_group_for_some_batch_is_refused() -> None:
    model, tokenizer = tiny_llama(layers=1)
    block = find_blocks(model)[1][0]
    mlp = block.mlp
    original = mlp.forward
    seen = Counter[str]()

    def forward(x: torch.Tensor) -> torch.Tensor:  # the second batch skips the MLP (1st call: probe)
        seen.update(["mlp"])
        return original(x) if seen["mlp"] != 3 else torch.zeros_like(x)

    mlp.forward = forward
    with pytest.raises(RuntimeError, match="calibration batch 1 ended its forward before "):
        run_stage_steps(model, [GPTQStep(GPTQConfig(sequential=True))],
                        _calibration(tokenizer, count=8))


def test_gptqmodel_backend_gets_the_same_sequential_setting() -> None:
    pytest.importorskip("gptqmodel")
    assert gptqmodel_quantize_config(GPTQConfig(sequential=True)).true_sequential is True
    assert gptqmodel_quantize_config(GPTQConfig()).true_sequential is False

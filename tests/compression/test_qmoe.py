"""QMoE: the dictionary coder, the ternary grid, GPTQ on it, the step on a tiny Mixtral,
and the `qmoe` weight format (save, load, packed runtime, bits per parameter on disk)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors import safe_open
from torch import Tensor, nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import (
    FORMAT_FILE,
    WEIGHTS_FILE,
    load_compressed,
    save_compressed,
)
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.formats import FORMATS, stored_linears
from squeezeflow.compression.moe.qmoe.coding import (
    MAX_PAIRS,
    PAIR_SYMBOLS,
    Dictionary,
    build_dictionary,
    code_bits,
    decode,
    encode,
    pair_costs_of,
)
from squeezeflow.compression.moe.qmoe.math import (
    gptq_ternary,
    round_ternary,
    ternary_grid,
    ternary_values,
)
from squeezeflow.compression.moe.qmoe.runtime import TernaryExperts, TernaryLinear
from squeezeflow.compression.moe.qmoe.step import QMoEConfig
from squeezeflow.compression.moe.qmoe.weight import TERNARY_ATTR, TernaryWeight, row_levels
from squeezeflow.compression.quantization.gptq.math import output_error
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.testing import tiny_llama, tiny_mixtral, train_causal_lm


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: every op is too small to gain from threads, and on a busy 2-core machine
    their synchronization dominated (training + qmoe of the tiny Mixtral: 82 s with 2
    threads at load average 15, 5 s with 1). Restored for the tests after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the dictionary coder ----------------------------------------------------------------


def _iid_codes(n: int, zeros: float, seed: int) -> Tensor:
    """Ternary codes with P(0) = zeros and +-1 equally likely (the paper's model)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=generator)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1, 1)
    return torch.where(u < zeros, 0, sign).to(torch.int8)


@pytest.fixture(scope="module")
def dictionaries() -> list[Dictionary]:
    """Full-size dictionaries of very different shapes, and small ones (few long runs)."""
    return [
        build_dictionary(pair_costs_of(_iid_codes(20_000, 0.885, seed=0))),  # the paper's 88.5% zeros
        build_dictionary(pair_costs_of(torch.zeros(1_000, dtype=torch.int8))),  # zero runs are nearly free
        build_dictionary(torch.full((PAIR_SYMBOLS,), 7, dtype=torch.int32)),  # every run ties
        build_dictionary(pair_costs_of(_iid_codes(5_000, 0.6, seed=1)), size=100, max_pairs=3),
        build_dictionary(torch.arange(1, PAIR_SYMBOLS + 1, dtype=torch.int32), size=PAIR_SYMBOLS),
    ]


ternary_arrays = st.one_of(
    st.lists(st.sampled_from([-1, 0, 1]), max_size=300),
    # mostly zeros: long runs, the common case of QMoE's codes
    st.lists(st.sampled_from([0] * 12 + [-1, 1]), min_size=1, max_size=400),
)


@settings(max_examples=200, deadline=None)
@given(values=ternary_arrays, which=st.integers(min_value=0, max_value=4))
def test_decode_inverts_encode_for_any_ternary_array(
    dictionaries: list[Dictionary], values: list[int], which: int
) -> None:
    dictionary = dictionaries[which]
    codes = torch.tensor(values, dtype=torch.int8)
    stream = encode(codes, dictionary)
    assert stream.dtype == torch.int16
    assert bool(((stream.to(torch.int64) & 0xFFFF) < dictionary.size).all())
    assert torch.equal(decode(stream, codes.numel(), dictionary), codes)


@pytest.mark.parametrize("codes", [
    torch.zeros(0, dtype=torch.int8),  # empty
    torch.zeros(1, dtype=torch.int8),  # one weight: half a pair
    torch.zeros(10_001, dtype=torch.int8),  # all zeros, odd length: many maximal runs
    torch.ones(2 * MAX_PAIRS, dtype=torch.int8),  # exactly one longest run's worth
    -torch.ones(2 * MAX_PAIRS + 1, dtype=torch.int8),  # one weight past it
    torch.tensor([1, -1, 0], dtype=torch.int8),
], ids=["empty", "one", "zeros-odd", "run-length", "run-length-plus-one", "three"])
def test_edge_cases_round_trip(dictionaries: list[Dictionary], codes: Tensor) -> None:
    for dictionary in dictionaries:
        stream = encode(codes, dictionary)
        assert torch.equal(decode(stream, codes.numel(), dictionary), codes)
    if codes.numel() == 0:
        assert encode(codes, dictionaries[0]).numel() == 0  # nothing to code: no codeword


def test_all_zero_codes_use_longest_runs(dictionaries: list[Dictionary]) -> None:
    """28 zeros are one codeword in the paper's dictionary: 10,000 zeros take ceil(10000/28)."""
    stream = encode(torch.zeros(10_000, dtype=torch.int8), dictionaries[0])
    assert stream.numel() == math.ceil(10_000 / (2 * MAX_PAIRS))


def _runs(dictionary: Dictionary) -> set[tuple[int, ...]]:
    symbols = dictionary.digits[:, 0::2].to(torch.int64) + 3 * dictionary.digits[:, 1::2].to(torch.int64)
    return {tuple(row[:length]) for row, length in zip(symbols.tolist(), dictionary.lengths.tolist(), strict=True)}


def test_dictionary_is_the_cheapest_prefix_closed_set(dictionaries: list[Dictionary]) -> None:
    """Every single pair, every prefix of a run, and no left-out run cheaper than a kept one."""
    for dictionary in dictionaries:
        runs = _runs(dictionary)
        assert len(runs) == dictionary.size  # distinct runs, one per codeword
        assert {(s,) for s in range(PAIR_SYMBOLS)} <= runs
        assert all(run[:-1] in runs for run in runs if len(run) > 1)
        costs = dictionary.pair_costs.tolist()
        longer = [sum(costs[s] for s in run) for run in runs if len(run) > 1]
        if not longer:
            continue
        # the cheapest run left out: a kept run extended by one pair
        left_out = min(sum(costs[s] for s in run) + costs[s]
                       for run in runs if len(run) < dictionary.max_pairs
                       for s in range(PAIR_SYMBOLS) if (*run, s) not in runs)
        assert max(longer) <= left_out
    # a rebuild from the same costs is the same table (only the costs are stored)
    again = build_dictionary(dictionaries[0].pair_costs)
    assert torch.equal(again.digits, dictionaries[0].digits)
    assert torch.equal(again.lengths, dictionaries[0].lengths)


def test_coding_gets_near_the_entropy_at_the_papers_sparsity(dictionaries: list[Dictionary]) -> None:
    """At 88.5% zeros (the paper's figure) the codes take < 0.8 bits per weight, within 20%
    of the i.i.d. entropy; the paper's c2048 stream is ~0.8 bits per parameter."""
    codes = _iid_codes(200_000, 0.885, seed=3)
    bits = code_bits(encode(codes, dictionaries[0]).numel(), codes.numel())
    p = 0.885
    entropy = -(p * math.log2(p) + (1 - p) * math.log2((1 - p) / 2))  # 0.630 bits
    assert bits < 0.8 and bits < 1.2 * entropy


# --- the ternary grid and GPTQ on it --------------------------------------------------


def _layer(seed: int = 0) -> tuple[Tensor, Tensor]:
    """A weight (128, 64) and the Hessian of correlated inputs (what makes GPTQ matter)."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(128, 64, generator=generator) * 0.05
    mixing = torch.randn(64, 64, generator=generator) * 0.3 + torch.eye(64)
    X = torch.randn(2048, 64, generator=generator) @ mixing  # (tokens, in)
    return W, 2 * X.T @ X / X.shape[0]


def test_ternary_codes_sit_on_each_rows_min_zero_max() -> None:
    W, H = _layer()
    W[3] = W[3].abs()  # a row with no negative weight: its min level is 0
    result = gptq_ternary(W, H)
    assert set(result.codes.unique().tolist()) <= {-1, 0, 1}
    grid = result.levels.values()  # (out, 2)
    low, high = W.amin(dim=1).clamp(max=0), W.amax(dim=1)
    assert torch.allclose(grid[:, 0], low, rtol=0.03) and torch.allclose(grid[:, 1], high, rtol=0.03)
    assert float(grid[3, 0]) == 0.0
    values = result.dequantize()
    for row in range(W.shape[0]):
        assert set(values[row].unique().tolist()) <= {float(grid[row, 0]), 0.0, float(grid[row, 1])}
    # round to nearest on the same grid: a weight goes to the level nearest to it
    codes = round_ternary(W, grid)
    nearest = torch.stack([torch.zeros_like(W), grid[:, 1:2].expand_as(W), grid[:, 0:1].expand_as(W)])
    best = (nearest - W).abs().argmin(dim=0)  # 0: zero, 1: max, 2: min
    assert torch.equal(codes.to(torch.int64) % 3, best)


def test_gptq_ternary_beats_round_to_nearest_on_the_layer_output() -> None:
    """Same layer, same data: GPTQ's error compensation lowers ||XW^T - XQ^T|| a lot."""
    for seed in range(3):
        W, H = _layer(seed)
        grid = ternary_grid(W)
        rtn = output_error(W, ternary_values(round_ternary(W, grid), grid), H)
        gptq = output_error(W, gptq_ternary(W, H).dequantize(), H)
        assert gptq < 0.85 * rtn, (seed, gptq, rtn)


def test_no_calibration_tokens_means_round_to_nearest() -> None:
    """An expert no token reached: identity Hessian, i.e. exactly round to nearest (QMoE)."""
    W, _ = _layer()
    result = gptq_ternary(W, torch.zeros(64, 64))
    assert torch.equal(result.codes, round_ternary(W, result.levels.values()))


def test_row_levels_are_within_three_percent_and_exact_zero() -> None:
    W = torch.randn(4, 32, 64)
    W[0, 5] = W[0, 5].abs()
    levels = row_levels(W)
    assert levels.codes.dtype == torch.uint8 and int(levels.codes.max()) < 64  # 6 bits
    true = torch.stack([W.amin(dim=-1).clamp(max=0), W.amax(dim=-1)], dim=-1)
    stored = levels.values()
    assert float(stored[0, 5, 0]) == 0.0
    nonzero = true != 0
    assert bool(((stored[nonzero] / true[nonzero] - 1).abs() <= 2 ** (1 / 24) - 1 + 1e-3).all())


# --- the step on a tiny Mixtral, the format on disk -----------------------------------


@pytest.fixture(scope="module")
def trained_mixtral() -> tuple[Any, Any, list[dict[str, Tensor]]]:
    """The recipes' tiny Mixtral shape (hidden 64, 8 experts of 64, top-2), briefly trained."""
    model, tokenizer = tiny_mixtral(hidden=64, layers=2, heads=4, intermediate=64, experts=8, top_k=2)
    train_causal_lm(model, tokenizer, steps=100)
    calibration = list(tokenized_batches(sampledata.sentences(64, seed=1), tokenizer,
                                         batch_size=16, max_length=64))
    return model, tokenizer, calibration


@pytest.fixture(scope="module")
def qmoe_model(trained_mixtral: tuple[Any, Any, list[dict[str, Tensor]]]) -> tuple[Any, Any]:
    model, tokenizer, calibration = trained_mixtral
    quantized = copy.deepcopy(model)
    step = CATALOG.build(CATALOG.parse({"kind": "qmoe"}))
    report = run_stage_steps(quantized, [step], calibration)[0]
    return quantized, report


def _logits(model: nn.Module, tokenizer: Any) -> Tensor:
    batch = tokenizer(["The robot repaired the garden fence.", "A cat sat."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_qmoe_step_ternarizes_every_expert_and_only_the_experts(
    trained_mixtral: tuple[Any, Any, list[dict[str, Tensor]]], qmoe_model: tuple[Any, Any]
) -> None:
    model, _, _ = trained_mixtral
    quantized, report = qmoe_model
    experts = [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert sorted(report.per_module) == experts
    for name, parameter in quantized.named_parameters():
        original = model.get_parameter(name)
        if ".experts." in name:
            stored = getattr(quantized.get_submodule(name.rsplit(".", 1)[0]), TERNARY_ATTR)
            levels = stored.levels(name.rsplit(".", 1)[1]).values()  # (E, out, 2)
            on_grid = (parameter == 0) | (parameter == levels[..., 0:1]) | (parameter == levels[..., 1:2])
            assert bool(on_grid.all()), name
        else:
            assert torch.equal(parameter, original), name  # attention, router, norms untouched
    for name in experts:
        metrics = report.per_module[name]
        assert metrics["fewest_tokens"] > 0  # every expert got calibration tokens
        assert 0.5 < metrics["zero_fraction"] < 1.0
        assert metrics["output_rel_error"] < metrics["weight_rel_error"]  # GPTQ aims at outputs


def test_save_and_load_reproduce_the_qmoe_model(qmoe_model: tuple[Any, Any], tmp_path: Path,
                                                trained_mixtral: tuple[Any, Any, Any]) -> None:
    quantized, _ = qmoe_model
    tokenizer = trained_mixtral[1]
    folder = save_compressed(quantized, tokenizer, "causal-lm", tmp_path / "qmoe")
    description = json.loads((folder / FORMAT_FILE).read_text())
    assert sorted(description["qmoe"]) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as stored:
        keys = set(stored.keys())
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in keys)  # no dense experts

    expected = _logits(quantized, tokenizer)
    dense = load_compressed(folder).model
    torch.testing.assert_close(_logits(dense, tokenizer), expected, rtol=0, atol=0)
    for i in range(2):
        before = getattr(quantized.model.layers[i].mlp.experts, TERNARY_ATTR)
        after = FORMATS.get("qmoe").current(dense.model.layers[i].mlp.experts)
        assert after is not None
        for field in ("stream", "offsets", "level_codes", "level_scales", "pair_costs"):
            assert torch.equal(getattr(before, field), getattr(after, field)), field

    packed = load_compressed(folder, runtime="packed").model
    assert all(isinstance(layer.mlp.experts, TernaryExperts) for layer in packed.model.layers)
    output = _logits(packed, tokenizer)
    assert float((output - expected).norm() / expected.norm()) < FORMATS.get("qmoe").tolerance


def test_stored_experts_take_under_one_and_a_half_bits_per_parameter(
    qmoe_model: tuple[Any, Any], trained_mixtral: tuple[Any, Any, Any], tmp_path: Path
) -> None:
    """Bytes of the experts' tensors in model.safetensors * 8 / expert parameters."""
    quantized, report = qmoe_model
    folder = save_compressed(quantized, trained_mixtral[1], "causal-lm", tmp_path / "qmoe")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as stored:
        expert_bytes = sum(stored.get_tensor(k).numel() * stored.get_tensor(k).element_size()
                           for k in stored.keys() if ".experts." in k)
    parameters = sum(p.numel() for n, p in quantized.named_parameters() if ".experts." in n)
    bits = 8 * expert_bytes / parameters
    assert bits < 1.5
    assert bits == pytest.approx(report.metrics["bits_per_parameter"], rel=1e-6)  # the step's figure
    zeros = sum(int((p == 0).sum()) for n, p in quantized.named_parameters() if ".experts." in n)
    assert zeros / parameters == pytest.approx(report.metrics["zero_fraction"], abs=1e-3)


def test_qmoe_keeps_the_tiny_mixtrals_perplexity_close(
    trained_mixtral: tuple[Any, Any, list[dict[str, Tensor]]], qmoe_model: tuple[Any, Any]
) -> None:
    from squeezeflow.evaluation.perplexity import perplexity

    model, tokenizer, _ = trained_mixtral
    evaluation = list(tokenized_batches(sampledata.sentences(64, seed=2), tokenizer,
                                        batch_size=16, max_length=64))
    base, quantized = perplexity(model, evaluation), perplexity(qmoe_model[0], evaluation)
    # ternary experts at ~1.5 bits: +1.1% on the recipes' tiny Mixtral (benchmarks/README.md, QMoE)
    assert base < quantized < 1.1 * base


# --- the format on plain Linears (the weight-format contract) -------------------------


def _ternary_linear_weight(rows: int = 48, columns: int = 64, seed: int = 0) -> TernaryWeight:
    W = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    levels = row_levels(W)
    return TernaryWeight.from_codes({"weight": round_ternary(W, levels.values())}, {"weight": levels})


def test_format_round_trips_and_its_linear_runtime_meets_the_contract() -> None:
    weight_format = FORMATS.get("qmoe")
    stored = _ternary_linear_weight(rows=48, columns=63)  # odd width: pairs span rows
    spec = json.loads(json.dumps(weight_format.spec(stored)))
    tensors = weight_format.tensors("layer", stored)
    read = weight_format.read("layer", spec, lambda suffix: tensors.pop(f"layer.{suffix}", None))
    assert not tensors
    for field in ("stream", "offsets", "level_codes", "level_scales", "pair_costs"):
        assert torch.equal(getattr(read, field), getattr(stored, field)), field
    assert torch.equal(read.dequantize(), stored.dequantize())

    module = nn.Linear(63, 48)
    with torch.no_grad():
        module.weight.copy_(stored.dequantize())
    weight_format.attach(module, stored)
    assert weight_format.current(module) is stored
    runtime = weight_format.runtime(module, stored)
    assert isinstance(runtime, TernaryLinear)
    x = torch.randn(5, 63)
    expected = nn.functional.linear(x, weight_format.reference(stored), module.bias)
    with torch.no_grad():
        assert float((runtime(x) - expected).norm() / expected.norm()) < weight_format.tolerance
        module.weight[0, 0] += 1.0
    assert weight_format.current(module) is None


def test_qmoe_on_linear_layers_saves_and_runs_packed(tmp_path: Path) -> None:
    """`targets` may name plain Linears (experts stored as Linears): stored and run the same way."""
    model, tokenizer = tiny_llama(layers=1)
    calibration = list(tokenized_batches(sampledata.sentences(16, seed=1), tokenizer,
                                         batch_size=8, max_length=32))
    step = CATALOG.build(CATALOG.parse({"kind": "qmoe", "targets": ["*mlp*"]}))
    report = run_stage_steps(model, [step], calibration)[0]
    assert sorted(report.per_module) == [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    assert len([s for s in stored_linears(model) if s.format.name == "qmoe"]) == 3
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "linear")
    packed = load_compressed(folder, runtime="packed").model
    assert isinstance(packed.model.layers[0].mlp.up_proj, TernaryLinear)
    expected = _logits(model, tokenizer)
    assert float((_logits(packed, tokenizer) - expected).norm() / expected.norm()) < 1e-5


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="damp"):
        QMoEConfig(damp=1.5)
    with pytest.raises(ValidationError, match="unknown key 'bits'"):
        CATALOG.parse({"kind": "qmoe", "bits": 2})

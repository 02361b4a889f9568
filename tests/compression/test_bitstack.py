"""BitStack: the decomposition, its weight format, loading under a memory budget, and the
size/quality curve read from one artifact."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
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
from squeezeflow.compression.formats import FORMATS
from squeezeflow.compression.formats.bitstack import (
    MIB,
    BitStackFormat,
    BitStackLinear,
    block_tensor_names,
    safetensors_bytes,
)
from squeezeflow.compression.quantization.bitstack.budget import (
    bitstack_loaded,
    read_plan,
    write_budget,
)
from squeezeflow.compression.quantization.bitstack.math import (
    FULL_SVD_MAX_DIM,
    activation_scale,
    block_bytes,
    decompose,
    rank_for_factor_bits,
    reconstruct,
    top_singular,
)
from squeezeflow.compression.quantization.bitstack.step import (
    BitStackConfig,
    greedy_ranking,
    level_ranking,
)
from squeezeflow.compression.quantization.bitstack.stored import BITSTACK_ATTR, BitStackWeight
from squeezeflow.compression.quantization.qweight import attach
from squeezeflow.compression.runners import run_layerwise, run_stage_steps
from squeezeflow.evaluation.bitstack_curve import (
    curve_from_metrics,
    curve_metrics,
    curve_plot,
    pick_budget,
    size_quality_curve,
)
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.testing import tiny_llama

NITER = 5  # enough rounds to see the error fall, few enough to keep the tests fast


def _gaussian(rows: int, columns: int, seed: int) -> Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def _example(seed: int = 0, blocks: int = 3) -> BitStackWeight:
    W = _gaussian(48, 64, seed)
    s = activation_scale(torch.rand(64, generator=torch.Generator().manual_seed(seed + 1)) + 0.1)
    parts = decompose(W * s[None, :], blocks, rank=2)
    return BitStackWeight(signs=parts.signs, U=parts.U, V=parts.V, scale=s,
                          order=torch.tensor([3, 7, 20][:blocks]), niter=blocks)


def _calibration(tokenizer: Any) -> list[dict[str, Tensor]]:
    return list(tokenized_batches(sampledata.sentences(32, seed=11), tokenizer, batch_size=16, max_length=32))


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama decomposed once (Fisher importance: one backward pass per sequence)
    and saved, with its original weights."""
    model, tokenizer = tiny_llama()
    original = {name: m.weight.detach().clone() for name, m in model.named_modules()
                if isinstance(m, nn.Linear)}
    step = CATALOG.build(CATALOG.parse({"kind": "bitstack", "niter": NITER, "rank": 1, "importance": "fisher"}))
    report = run_stage_steps(model, [step], _calibration(tokenizer))[0]
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path_factory.mktemp("bitstack") / "m")
    return {"model": model, "tokenizer": tokenizer, "original": original, "report": report,
            "folder": folder}


# --- the decomposition --------------------------------------------------------------------


def test_residual_falls_with_every_round_and_matches_the_reconstruction() -> None:
    W = _gaussian(64, 128, seed=0)
    parts = decompose(W, niter=6, rank=1)
    norms = parts.residual_norms
    assert bool((norms[1:] < norms[:-1]).all()), norms
    for blocks in range(1, 7):
        W_hat = reconstruct(parts.signs, parts.U, parts.V, torch.ones(128), blocks)
        assert float((W - W_hat).norm()) == pytest.approx(float(norms[blocks]), rel=1e-4)
    # the first block is sign(W) times a non-negative magnitude: its signs are W's
    first = reconstruct(parts.signs, parts.U, parts.V, torch.ones(128), 1)
    nonzero = first != 0
    assert torch.equal(torch.sign(first[nonzero]), torch.sign(W[nonzero]))


def test_reconstruction_error_of_each_linear_falls_with_every_round(decomposed: dict[str, Any]) -> None:
    model = decomposed["model"]
    for name, W in decomposed["original"].items():
        module = model.get_submodule(name)
        stored: BitStackWeight = getattr(module, BITSTACK_ATTR, None)
        if "lm_head" in name:
            assert stored is None  # ignored by default
            continue
        assert stored.blocks == NITER
        weight_errors, scaled_errors = [], []
        for blocks in range(1, NITER + 1):
            E = W - reconstruct(stored.signs, stored.U, stored.V, stored.scale, blocks)  # (out, in)
            weight_errors.append(float(E.norm() / W.norm()))
            scaled_errors.append(float((E * stored.scale).norm() / (W * stored.scale).norm()))
        assert all(b < a for a, b in zip(scaled_errors, scaled_errors[1:], strict=False)), (name, scaled_errors)
        assert all(b < a for a, b in zip(weight_errors, weight_errors[1:], strict=False)), (name, weight_errors)
        assert weight_errors[-1] < 0.5 * weight_errors[0]
        assert decomposed["report"].per_module[name]["weight_rel_error"] == pytest.approx(weight_errors[-1], rel=1e-4)


def test_large_layers_use_a_randomized_svd_that_is_near_optimal() -> None:
    A = _gaussian(FULL_SVD_MAX_DIM + 40, FULL_SVD_MAX_DIM + 8, seed=3).abs()  # like |R|: one big direction
    U, S, Vh = top_singular(A, 2)
    exact = torch.linalg.svdvals(A)  # (min(m, n),)
    assert float(S[0]) == pytest.approx(float(exact[0]), rel=1e-4)
    best = float(exact[2:].pow(2).sum().sqrt())  # Eckart-Young: the least rank-2 error
    assert float((A - U @ torch.diag(S) @ Vh).norm()) < best * (1 + 1e-3)


def test_rank_follows_factor_bits_and_block_bytes_count_signs_and_factors() -> None:
    assert rank_for_factor_bits(4096, 4096, 0.125) == 16  # the paper's k on Llama's 4096 x 4096
    assert rank_for_factor_bits(128, 64, 0.125) == 1  # never below one
    assert block_bytes(64, 128, 2) == 64 * 128 // 8 + 2 * 2 * (64 + 128)
    stored = _example()
    assert stored.block_bytes == sum(t.numel() * t.element_size() for t in
                                     (stored.signs[0], stored.U[0], stored.V[0]))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="give rank .* or factor_bits"):
        BitStackConfig(rank=2, factor_bits=0.25)
    with pytest.raises(ValidationError, match="niter"):
        CATALOG.parse({"kind": "bitstack", "niter": 0})
    with pytest.raises(ValidationError, match="importance"):
        CATALOG.parse({"kind": "bitstack", "importance": "entropy"})


# --- the weight format -------------------------------------------------------------------


def _same(a: BitStackWeight, b: BitStackWeight) -> None:
    for field in dataclasses.fields(a):
        left, right = getattr(a, field.name), getattr(b, field.name)
        if isinstance(left, Tensor):
            assert left.dtype == right.dtype and torch.equal(left, right), field.name
        else:
            assert left == right, field.name


def test_format_round_trip_is_lossless_and_the_runtime_matches_the_reference() -> None:
    weight_format = FORMATS.get("bitstack")
    stored = _example()
    spec = json.loads(json.dumps(weight_format.spec(stored)))
    tensors = weight_format.tensors("layer", stored)
    assert set(tensors) == {"layer.scale"} | {n for i in range(3) for n in block_tensor_names("layer", i)}
    assert tensors["layer.signs.0"].dtype == torch.uint8
    assert tensors["layer.signs.0"].numel() == 48 * 64 // 8  # one bit per weight
    read = weight_format.read("layer", spec, lambda suffix: tensors.pop(f"layer.{suffix}", None))
    _same(read, stored)
    assert not tensors
    module = nn.Linear(64, 48)
    with torch.no_grad():
        attach(module, stored, weight_format.attr)
    assert weight_format.current(module) is not None
    x = _gaussian(5, 64, seed=4)
    expected = nn.functional.linear(x, weight_format.reference(stored), module.bias)
    runtime = weight_format.runtime(module, stored)
    assert isinstance(runtime, BitStackLinear)
    with torch.no_grad():
        assert float((runtime(x) - expected).norm() / expected.norm()) < weight_format.tolerance
        module.weight[0, 0] += 1.0
    assert weight_format.current(module) is None


def test_missing_block_tensors_are_a_clear_error() -> None:
    weight_format = FORMATS.get("bitstack")
    stored = _example()
    tensors = weight_format.tensors("layer", stored)
    del tensors["layer.u.1"]
    with pytest.raises(ValueError, match="packed tensors of layer are incomplete"):
        weight_format.read("layer", weight_format.spec(stored), lambda s: tensors.pop(f"layer.{s}", None))


# --- importance ranking ----------------------------------------------------------------------


def test_rankings_keep_each_stack_in_order_and_levels_balanced() -> None:
    gains = {"a": torch.tensor([9.0, 5.0, 1.0]), "b": torch.tensor([9.0, 4.0, 3.0]),
             "c": torch.tensor([9.0, 8.0, 0.5])}
    size = {"a": 10, "b": 10, "c": 40}  # c gains most per block, least per byte
    greedy = greedy_ranking(gains, size)
    assert greedy[:3] == [("a", 0), ("b", 0), ("c", 0)]  # every Linear's first block first
    assert greedy[3:] == [("a", 1), ("b", 1), ("b", 2), ("c", 1), ("a", 2), ("c", 2)]  # gain per byte
    levels = level_ranking({"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([3.0, 0.0])})
    assert levels == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    for ranking in (greedy, levels):
        for name in {n for n, _ in ranking}:
            assert [i for n, i in ranking if n == name] == sorted(i for n, i in ranking if n == name)


def test_perplexity_importance_ranks_level_by_level() -> None:
    model, tokenizer = tiny_llama(layers=1)
    step = CATALOG.build(CATALOG.parse(
        {"kind": "bitstack", "niter": 3, "rank": 1, "importance": "perplexity", "importance_samples": 4}
    ))
    report = run_stage_steps(model, [step], _calibration(tokenizer))[0]
    assert -1.0 <= report.metrics["importance_spearman_output_error"] <= 1.0
    stacks = {name: getattr(m, BITSTACK_ATTR) for name, m in model.named_modules()
              if hasattr(m, BITSTACK_ATTR)}
    count = len(stacks)
    for stored in stacks.values():  # block b of every Linear lies in level b's slice of the order
        for level, position in enumerate(stored.order.tolist()):
            assert level * count <= position < (level + 1) * count
    assert sorted(p for s in stacks.values() for p in s.order.tolist()) == list(range(3 * count))


def test_layerwise_stages_rank_by_output_error_and_refuse_model_level_scores() -> None:
    model, tokenizer = tiny_llama(layers=1)
    calibration = _calibration(tokenizer)
    for importance in ("perplexity", "fisher"):
        step = CATALOG.build(CATALOG.parse({"kind": "bitstack", "niter": 2, "rank": 1, "importance": importance}))
        with pytest.raises(ValueError, match=f"importance '{importance}' runs the whole model"), torch.no_grad():
            run_layerwise(model, [step], calibration)
    model, _ = tiny_llama(layers=1)
    step = CATALOG.build(CATALOG.parse({"kind": "bitstack", "niter": 2, "rank": 1, "importance": "output_error"}))
    with torch.no_grad():
        report = run_layerwise(model, [step], calibration)[0]
    positions = sorted(p for m in model.modules() if hasattr(m, BITSTACK_ATTR)
                       for p in getattr(m, BITSTACK_ATTR).order.tolist())
    assert positions == list(range(14)) and report.metrics["blocks"] == 14


# --- memory budgets --------------------------------------------------------------------------


def _ranked_blocks(folder: Path) -> list[tuple[int, str, int]]:
    layers = json.loads((folder / FORMAT_FILE).read_text())["bitstack"]
    return sorted((p, layer, i) for layer, spec in layers.items() for i, p in enumerate(spec["order"]))


def test_a_budget_loads_exactly_the_prefix_of_the_order_that_fits(decomposed: dict[str, Any]) -> None:
    folder = decomposed["folder"]
    sizes = safetensors_bytes(folder / WEIGHTS_FILE)
    full = read_plan(folder)
    ranked = _ranked_blocks(folder)
    assert len(ranked) == full.blocks_stored == 14 * NITER
    for fraction in (0.0, 0.3, 0.7):
        budget = full.minimum_bytes + fraction * (full.total_bytes - full.minimum_bytes)
        loaded = load_compressed(folder, memory_budget_mb=budget / MIB).model
        blocks = bitstack_loaded(loaded).blocks
        count = sum(n for n, _ in blocks.values())
        expected: dict[str, int] = {}
        for _, layer, index in ranked[:count]:  # the first `count` blocks of the order...
            expected[layer] = max(expected.get(layer, 0), index + 1)
        assert {layer: n for layer, (n, _) in blocks.items()} == expected
        assert all(total == NITER for _, total in blocks.values())
        used = full.fixed_bytes + sum(
            sizes[name] for _, layer, index in ranked[:count] for name in block_tensor_names(layer, index))
        assert used <= budget  # ...fit, and one more would not
        _, layer, index = ranked[count]
        assert used + sum(sizes[n] for n in block_tensor_names(layer, index)) > budget
        assert count > 14 or fraction == 0.0  # past every Linear's first block


def test_bytes_on_disk_for_a_budget_equal_the_loaded_blocks(decomposed: dict[str, Any], tmp_path: Path) -> None:
    folder = decomposed["folder"]
    full = read_plan(folder)
    budget_mb = (full.minimum_bytes + 0.4 * (full.total_bytes - full.minimum_bytes)) / MIB
    plan = write_budget(folder, tmp_path / "subset", budget_mb)
    written = safetensors_bytes(tmp_path / "subset" / WEIGHTS_FILE)
    layers = json.loads((tmp_path / "subset" / FORMAT_FILE).read_text())["bitstack"]
    block_bytes_on_disk = sum(written[name] for layer, spec in layers.items()
                              for i in range(spec["blocks"]) for name in block_tensor_names(layer, i))
    subset = load_compressed(tmp_path / "subset")
    loaded = bitstack_loaded(subset.model)
    assert block_bytes_on_disk == plan.block_bytes == loaded.block_bytes
    assert loaded.block_bytes == sum(
        n * getattr(subset.model.get_submodule(layer), BITSTACK_ATTR).block_bytes
        for layer, (n, _) in loaded.blocks.items())
    assert sum(written.values()) == plan.total_bytes <= budget_mb * MIB
    assert plan.blocks_loaded < plan.blocks_stored
    # the subset is the same model as the budget load of the whole artifact
    direct = load_compressed(folder, memory_budget_mb=budget_mb).model
    batch = decomposed["tokenizer"](["The robot repaired the garden fence."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(subset.model(**batch).logits, direct(**batch).logits, rtol=0, atol=0)


def test_more_budget_gives_lower_reconstruction_error(decomposed: dict[str, Any]) -> None:
    folder, original = decomposed["folder"], decomposed["original"]
    full = read_plan(folder)
    errors, counts = [], []
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        budget = full.minimum_bytes + fraction * (full.total_bytes - full.minimum_bytes)
        model = load_compressed(folder, memory_budget_mb=budget / MIB).model
        counts.append(bitstack_loaded(model).loaded)
        errors.append(sum(float((model.get_submodule(n).weight.detach() - W).pow(2).sum())
                          for n, W in original.items() if "lm_head" not in n))
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


def test_budget_below_the_minimum_or_without_bitstack_layers_is_an_error(
    decomposed: dict[str, Any], tmp_path: Path
) -> None:
    folder = decomposed["folder"]
    minimum = read_plan(folder).minimum_bytes / MIB
    with pytest.raises(ValueError, match=rf"below the smallest loadable size .*{minimum:.4g} MiB"):
        load_compressed(folder, memory_budget_mb=minimum * 0.99)
    model, tokenizer = tiny_llama()
    plain = save_compressed(model, tokenizer, "causal-lm", tmp_path / "plain")
    with pytest.raises(ValueError, match="has no bitstack layers"):
        load_compressed(plain, memory_budget_mb=10)


def test_packed_runtime_holds_only_the_loaded_blocks(decomposed: dict[str, Any]) -> None:
    folder, tokenizer = decomposed["folder"], decomposed["tokenizer"]
    full = read_plan(folder)
    budget_mb = (full.minimum_bytes + 0.5 * (full.total_bytes - full.minimum_bytes)) / MIB
    dense = load_compressed(folder, memory_budget_mb=budget_mb).model
    packed = load_compressed(folder, runtime="packed", memory_budget_mb=budget_mb).model
    runtimes = [m for m in packed.modules() if isinstance(m, BitStackLinear)]
    assert len(runtimes) == 14
    held = sum(m.signs.nbytes + m.U.nbytes + m.V.nbytes for m in runtimes)
    assert held == bitstack_loaded(dense).block_bytes == bitstack_loaded(packed).block_bytes
    batch = tokenizer(["The robot repaired the garden fence."], return_tensors="pt")
    with torch.no_grad():
        expected, output = dense(**batch).logits, packed(**batch).logits
    assert float((output - expected).norm() / expected.norm()) < BitStackFormat.tolerance


# --- the size/quality curve ------------------------------------------------------------------


def test_the_size_quality_curve_comes_from_one_artifact(decomposed: dict[str, Any], tmp_path: Path) -> None:
    folder = decomposed["folder"]
    texts = sampledata.sentences(16, seed=12)
    full = read_plan(folder)
    budgets = [(full.minimum_bytes + f * (full.total_bytes - full.minimum_bytes)) / MIB for f in (1.0, 0.0, 0.5)]
    points = size_quality_curve(folder, texts, budgets, batch_size=8, max_length=32)
    assert [p.budget_mb for p in points] == sorted(budgets)
    assert [p.blocks for p in points] == sorted({p.blocks for p in points})  # strictly more blocks
    bits = [p.bits_per_weight for p in points]
    assert bits == sorted(bits) and bits[0] < bits[-1]
    everything = load_compressed(folder)
    batches = list(tokenized_batches(texts, everything.tokenizer, batch_size=8, max_length=32))
    assert points[-1].quality == pytest.approx(perplexity(everything.model, batches), rel=1e-6)
    assert points[-1].weights_mb == pytest.approx(full.total_bytes / MIB)
    # logged as metrics and read back; a search picks a budget from them
    metrics = curve_metrics(points)
    assert metrics["bitstack_curve_0_perplexity"] == points[0].quality
    assert curve_from_metrics(metrics) == points
    assert pick_budget(points, max(p.quality for p in points)) == points[0]
    best = min(p.quality for p in points)
    picked = pick_budget(points, best)
    assert picked is not None and picked.quality == best
    assert pick_budget(points, best - 1.0) is None
    plot = curve_plot(points, tmp_path / "curve.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

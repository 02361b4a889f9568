"""Per-layer mixed precision (issue 13): the planned assignment against uniform and random ones."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from squeezeflow.compression.search.mixed_precision import (
    Candidate,
    LayerGroup,
    Plan,
    SensitivityTable,
    plan_mixed_precision,
    plan_to_recipe,
    random_plan,
    solve,
    uniform_plan,
    write_recipe,
)

BUDGET_BITS = 3.5  # the acceptance budget
GROUP_SIZE = 32  # one rtn family for every arm; 3-bit g32 stores 3.59 bits per weight
CANDIDATES = [Candidate("rtn", bits, GROUP_SIZE, True) for bits in (2, 3, 4, 8)]
RANDOM_SEEDS = (0, 1, 2)


def _stored_bytes(model: torch.nn.Module) -> int:
    """Bytes the integer format writes for the model's quantized Linears (codes, scales, zeros)."""
    from squeezeflow.compression.formats.base import stored_linears

    return sum(t.numel() * t.element_size()
               for linear in stored_linears(model)
               for t in linear.format.tensors(linear.owner, linear.stored).values())


def _apply(model: torch.nn.Module, recipe: dict[str, Any], calibration: list[Any]) -> torch.nn.Module:
    from squeezeflow.compression.catalog import CATALOG
    from squeezeflow.compression.runners import run_stage_steps

    quantized = copy.deepcopy(model)
    steps = [CATALOG.build(CATALOG.parse(step)) for step in recipe["stages"][-1]["steps"]]
    run_stage_steps(quantized, steps, calibration)
    return quantized


def test_planned_assignment_beats_uniform_and_random(
    trained_llama_dir: Path, text_files: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from squeezeflow.compression.data import load_texts, tokenized_batches
    from squeezeflow.evaluation.perplexity import perplexity
    from squeezeflow.recipe import parse_recipe

    model = AutoModelForCausalLM.from_pretrained(trained_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_llama_dir)
    calibration = list(tokenized_batches(load_texts(str(text_files["calibration"])), tokenizer,
                                         batch_size=16, max_length=64))
    evaluation = list(tokenized_batches(load_texts(str(text_files["evaluation"])), tokenizer,
                                        batch_size=32, max_length=64))

    plan = plan_mixed_precision(model, calibration, CANDIDATES, budget_bits=BUDGET_BITS)
    names = [group.name for group in plan.table.groups]
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in names  # fused groups decided together
    assert "model.layers.1.mlp.{gate_proj,up_proj}" in names
    assert len(plan.table.groups) == 8  # per block: qkv, o, gate/up, down
    assert plan.average_bits <= BUDGET_BITS
    assert len(set(plan.choice)) > 1  # a mixed assignment, not a uniform one

    base = {
        "name": "tiny-llama-mixed",
        "model": {"source": str(trained_llama_dir)},
        "evaluation": {"data": {"source": str(text_files["evaluation"])}},
        "stages": [],
        "registration": {"model_name": "tiny-llama-mixed"},
    }
    path = write_recipe(plan_to_recipe(plan, base), tmp_path / "mixed.yaml", plan)
    text = path.read_text()
    assert text.startswith("# Mixed precision") and f"Budget: {BUDGET_BITS:.3f} bits" in text
    written = yaml.safe_load(text)
    recipe = parse_recipe(written, base_dir=tmp_path)  # selects existing modules, valid steps
    targeted = [t for step in recipe.stages[-1].steps for t in step.targets]
    assert sorted(targeted) == sorted(plan.per_layer)  # disjoint, every planned layer once

    mixed = _apply(model, written, calibration)  # the written recipe is what runs
    assert _stored_bytes(mixed) == plan.stored_bytes  # the planner counts what is stored
    arms = {"uniform3": uniform_plan(plan.table, 1), "uniform4": uniform_plan(plan.table, 2)}
    quantized = {name: _apply(model, plan_to_recipe(arm, base), calibration) for name, arm in arms.items()}
    randoms = [random_plan(plan.table, BUDGET_BITS, seed) for seed in RANDOM_SEEDS]
    assert all(r.average_bits <= BUDGET_BITS for r in randoms)  # the same budget

    ppl_mixed = perplexity(mixed, evaluation)
    ppl_uniform3 = perplexity(quantized["uniform3"], evaluation)
    ppl_random = [perplexity(_apply(model, plan_to_recipe(r, base), calibration), evaluation)
                  for r in randoms]
    assert ppl_mixed < ppl_uniform3, (ppl_mixed, ppl_uniform3)
    assert _stored_bytes(mixed) < _stored_bytes(quantized["uniform4"])
    assert ppl_mixed < sum(ppl_random) / len(ppl_random), (ppl_mixed, ppl_random)


def _table(sensitivity: list[list[float]], shapes: list[tuple[int, int]]) -> SensitivityTable:
    groups = tuple(LayerGroup((f"layer{i}",), (shape,)) for i, shape in enumerate(shapes))
    return SensitivityTable(groups, tuple(CANDIDATES), torch.tensor(sensitivity, dtype=torch.float64), "kl")


def test_solver_finds_the_brute_force_optimum() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (128, 64), (64, 128), (96, 64), (64, 64)]
    # sensitivity falls with bits, at a random per-layer scale (layers differ a lot)
    scale = torch.rand(len(shapes), 1, generator=generator) * 10
    sensitivity = scale * torch.tensor([[8.0, 2.0, 0.5, 0.01]]) * (1 + torch.rand(len(shapes), 4, generator=generator))
    table = _table(sensitivity.tolist(), shapes)
    for budget in (2.8, 3.5, 4.2, 6.0):
        plan = solve(table, budget_bits=budget)
        limit = int(budget * table.weights / 8)
        feasible = [c for c in itertools.product(range(4), repeat=len(shapes)) if table.bytes_of(c) <= limit]
        best = min(feasible, key=lambda c: float(sum(table.sensitivity[g, f] for g, f in enumerate(c))))
        assert plan.stored_bytes <= limit
        assert plan.predicted_sensitivity == pytest.approx(Plan(table, best, budget, "").predicted_sensitivity)


def test_budget_below_the_smallest_format_is_an_error() -> None:
    table = _table([[1.0, 0.5, 0.2, 0.1]], [(64, 64)])
    with pytest.raises(ValueError, match="below the smallest assignment"):
        solve(table, budget_bits=2.0)  # 2-bit g32 alone stores 2.56 bits per weight

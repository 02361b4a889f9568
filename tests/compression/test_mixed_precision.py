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


# ---------------------------------------------------------------- recipes: `search.mixed_precision`


def _search_recipe(model: str, data: dict[str, Path], block: dict[str, Any] | None,
                   strategy: str = "mixed_precision") -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "tiny-llama-mixed",
        "model": {"source": model},
        "calibration": {"source": str(data["calibration"]), "num_samples": 32, "max_length": 64,
                        "batch_size": 16},
        "evaluation": {"data": {"source": str(data["evaluation"]), "max_length": 64}},
        "stages": [{"name": "quantize", "steps": [{"kind": "rtn", "bits": 4, "group_size": GROUP_SIZE,
                                                   "symmetric": False}]}],
        "registration": {"model_name": "tiny-llama-mixed"},
        "search": {"strategy": strategy, "objectives": [{"metric": "perplexity_ratio"}]},
    }
    if block is not None:
        raw["search"]["mixed_precision"] = block
    if strategy != "mixed_precision":
        raw["search"]["parameters"] = {"quantize.rtn.bits": {"choices": [3, 4]}}
    return raw


@pytest.mark.parametrize(
    ("block", "strategy", "message"),
    [
        (None, "mixed_precision", "search.mixed_precision: strategy 'mixed_precision' needs this section"),
        ({"at": "quantize.rtn", "formats": [2, 4], "budget_bits": 3}, "grid",
         "search.mixed_precision: only used by strategy 'mixed_precision'"),
        ({"at": "quantize.rtn", "formats": [2, 4], "budget_bits": 3, "budgets": [3.5]}, "mixed_precision",
         "search.mixed_precision: unknown key 'budgets'"),
        ({"at": "quantize.rtn", "formats": [2, 4]}, "mixed_precision",
         "search.mixed_precision: give exactly one of 'budget_bits'"),
        ({"at": "quantize.rtn", "formats": [2, 5], "budget_bits": 3}, "mixed_precision",
         "search.mixed_precision.formats.1.bits: bits must be one of 2, 3, 4, 8"),
        # 2-bit in groups of 32 stores at least 2 + 18/32 = 2.5625 bits per weight
        ({"at": "quantize.rtn", "formats": [2, 4], "budget_bits": [2.5, 3.5]}, "mixed_precision",
         "search.mixed_precision.budget_bits.0: 2.5 bits per weight is below the smallest format, "
         "which stores at least 2.562"),
        ({"at": "quantize.gptq", "formats": [2, 4], "budget_bits": 3}, "mixed_precision",
         "search.mixed_precision.at: stage 'quantize': no step 'gptq'; its steps: rtn"),
        ({"at": "quantize.rtn", "formats": [2, {"bits": 2, "group_size": 32}], "budget_bits": 3},
         "mixed_precision", "search.mixed_precision.formats.1: repeats formats.0"),
    ],
)
def test_search_recipe_errors_name_the_mixed_precision_field(
    block: dict[str, Any] | None, strategy: str, message: str, tmp_path: Path
) -> None:
    from squeezeflow.recipe import RecipeError, parse_recipe
    from squeezeflow.testing import write_texts

    data = {"calibration": write_texts(tmp_path / "c.txt", 4, seed=1),
            "evaluation": write_texts(tmp_path / "e.txt", 4, seed=2)}
    with pytest.raises(RecipeError) as error:
        parse_recipe(_search_recipe("default", data, block, strategy), base_dir=tmp_path)
    assert message in str(error.value), str(error.value)


def test_mixed_precision_search_varies_nothing_else() -> None:
    from pydantic import ValidationError

    from squeezeflow.compression.search.spec import SearchSpec

    with pytest.raises(ValidationError, match="plans its own trials; remove 'parameters'"):
        SearchSpec.model_validate({
            "strategy": "mixed_precision", "objectives": [{"metric": "weights_mb"}],
            "parameters": {"q.rtn.bits": {"choices": [3, 4]}},
            "mixed_precision": {"at": "q.rtn", "formats": [2, 4], "budget_bits": 3.5},
        })


def test_budget_at_the_smallest_format_is_accepted(tmp_path: Path) -> None:
    """The bound of the error above is the real one: 2.5625 bits per weight validates."""
    from squeezeflow.compression.catalog import CATALOG
    from squeezeflow.compression.search.spec import SearchSpec

    spec = SearchSpec.model_validate({"strategy": "mixed_precision", "objectives": [{"metric": "weights_mb"}],
                                      "mixed_precision": {"at": "q.0", "formats": [2, 8], "budget_bits": 2.5625}})
    step = CATALOG.parse({"kind": "rtn", "group_size": GROUP_SIZE})
    assert spec.check_against([("q", (step,))]) == []
    layer = Candidate("rtn", 2, GROUP_SIZE)
    assert 8 * layer.stored_bytes(64, 128) / (64 * 128) == 2.5625  # what the planner counts


def _planned_bits(trial: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> float:
    """Average stored bits per weight of a trial's steps, counted from the recipe alone."""
    stored = weights = 0
    for step in trial["stages"][0]["steps"]:
        candidate = Candidate(step["kind"], step["bits"], step["group_size"], step["symmetric"])
        for name in step["targets"]:
            stored += candidate.stored_bytes(*shapes[name])
            weights += shapes[name][0] * shapes[name][1]
    assert weights == sum(rows * columns for rows, columns in shapes.values())  # every layer planned
    return 8 * stored / weights


def test_plan_trial_recipes_writes_rerunnable_recipes_within_budget(
    trained_llama_dir: Path, text_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig

    from squeezeflow.compression.models import skeleton
    from squeezeflow.recipe import parse_recipe
    from squeezeflow.tasks.mixed_precision import plan_trial_recipes

    monkeypatch.setenv("SQUEEZEFLOW_HOME", str(tmp_path / "workspace"))
    budgets = [3.0, BUDGET_BITS]
    block = {"at": "quantize.rtn", "formats": [2, 3, 4, 8], "budget_bits": budgets}
    recipe = parse_recipe(_search_recipe(str(trained_llama_dir), text_files, block), base_dir=tmp_path)
    raw = recipe.model_dump(mode="json")
    trials = plan_trial_recipes(recipe, raw)

    model = skeleton(AutoConfig.from_pretrained(trained_llama_dir))
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    written = sorted((tmp_path / "workspace" / "plans" / "tiny-llama-mixed").glob("*.yaml"))
    assert len(trials) == len(budgets) == len(written)
    stored = []
    for budget, trial in zip(budgets, trials, strict=True):
        parsed = parse_recipe(trial, base_dir=tmp_path)  # an ordinary recipe: valid, searching nothing
        assert parsed.search is None and "search" not in trial
        steps = parsed.stages[0].steps
        assert len({step.bits for step in steps}) > 1  # mixed, one step per format used
        assert all(step.symmetric is False and step.group_size == GROUP_SIZE for step in steps)  # from the step
        bits = {name: step.bits for step in steps for name in step.targets}
        for block_index in range(2):
            attention = f"model.layers.{block_index}.self_attn"
            assert bits[f"{attention}.q_proj"] == bits[f"{attention}.k_proj"] == bits[f"{attention}.v_proj"]
        average = _planned_bits(trial, shapes)
        assert average <= budget
        assert f"budget {budget:g} bits per weight: achieved {average:.3f}" in trial["description"]
        stored.append(average)
        [path] = [p for p in written if p.name.startswith(f"{budget:g}-bits-")]
        assert path.read_text().startswith("# Mixed precision")
        reread = yaml.safe_load(path.read_text())
        assert reread == trial  # the file is the trial, byte for byte in meaning
        assert parse_recipe(reread, base_dir=tmp_path).sha256() == parsed.sha256()
    assert stored[0] < stored[1]  # a looser budget buys more bits

    import squeezeflow.tasks.mixed_precision as planner

    def measured(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("sensitivity measured again")

    monkeypatch.setattr(planner, "measure_sensitivity", measured)
    assert plan_trial_recipes(recipe, raw) == trials  # a resumed search reuses the measured table
    other = parse_recipe(_search_recipe(str(trained_llama_dir), text_files, {**block, "formats": [2, 4]}),
                         base_dir=tmp_path)
    with pytest.raises(AssertionError, match="measured again"):  # other formats: another table
        plan_trial_recipes(other, other.model_dump(mode="json"))

"""Recipe checks for training stages: they need a `training` section, stand alone in
their stage, and their block indices fit the model as the earlier stages leave it."""

from __future__ import annotations

from pathlib import Path

import pytest

from squeezeflow.recipe import RecipeError, parse_recipe


def recipe(model: Path, stages: list[dict[str, object]], training: bool = True) -> dict[str, object]:
    raw: dict[str, object] = {
        "name": "t",
        "model": {"source": str(model)},
        "calibration": {"source": "calibration.txt"},
        "evaluation": {"data": {"source": "evaluation.txt"}},
        "stages": stages,
        "registration": {"model_name": "m"},
    }
    if training:
        raw["training"] = {"source": "training.txt", "num_samples": 512}
    return raw


def test_a_training_stage_needs_a_training_section(tiny_bert_dir: Path) -> None:
    stages = [{"name": "kd", "steps": [{"kind": "distill"}]}]
    with pytest.raises(RecipeError, match=r"stages.0 \(kd\) has a step that trains \(distill\); "
                                          "add a 'training' section"):
        parse_recipe(recipe(tiny_bert_dir, stages, training=False))
    parsed = parse_recipe(recipe(tiny_bert_dir, stages))
    assert parsed.needs_training() and not parsed.needs_calibration()


def test_distill_is_alone_in_its_stage(tiny_bert_dir: Path) -> None:
    stages = [{"name": "kd", "steps": [{"kind": "rtn"}, {"kind": "distill"}]}]
    with pytest.raises(RecipeError, match="distill trains the model and must be the only step"):
        parse_recipe(recipe(tiny_bert_dir, stages))


def test_block_indices_are_checked_against_the_model_before_weights_load(
    trained_llama_dir: Path, tiny_bert_dir: Path
) -> None:
    # the tiny Llama has 2 blocks; after depth pruning 1 is left
    stages = [{"name": "prune", "steps": [{"kind": "depth", "remove": 1}]},
              {"name": "kd", "steps": [{"kind": "distill", "layer_map": {1: 1}}]}]
    with pytest.raises(RecipeError, match=r"stages.1.steps.0.layer_map: student block 1 does not "
                                          "exist; the student has 1 blocks"):
        parse_recipe(recipe(trained_llama_dir, stages))
    stages = [{"name": "s", "steps": [{"kind": "student", "keep": [0, 2]}]}]
    with pytest.raises(RecipeError, match=r"stages.0.steps.0.keep: block 2 does not exist; "
                                          "the model has 2 blocks"):
        parse_recipe(recipe(trained_llama_dir, stages))
    stages = [{"name": "kd", "steps": [{"kind": "distill", "losses": {"logits": 1.0}}]}]
    with pytest.raises(RecipeError, match="stages.0.steps.0.losses: an encoder has no logits"):
        parse_recipe(recipe(tiny_bert_dir, stages))

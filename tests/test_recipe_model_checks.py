"""Steps the model cannot meet are recipe errors that name the field, found from the
model's config.json alone (before any weights load), and the CLI exits 2 logging nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from squeezeflow.cli import app
from squeezeflow.recipe import RecipeError, load_recipe
from squeezeflow.testing import tiny_llama, write_texts


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block Llama folder holding config.json and no weights: checks must not need them."""
    folder = tmp_path_factory.mktemp("config-only")
    model, _ = tiny_llama(hidden=64, layers=2, heads=4, intermediate=128)
    model.config.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    return folder


def _recipe(model: Path, *stages: list[dict[str, object]]) -> dict[str, object]:
    return {
        "name": "t",
        "model": {"source": str(model)},
        "calibration": {"source": "calibration.txt"},
        "evaluation": {"data": {"source": "evaluation.txt"}},
        "stages": [{"name": f"s{i}", "steps": steps} for i, steps in enumerate(stages)],
        "registration": {"model_name": "m"},
    }


def _write(folder: Path, raw: dict[str, object]) -> Path:
    """The recipe and the data files it names (a missing one is an error of its own)."""
    for name in ("calibration.txt", "evaluation.txt"):
        if not (folder / name).exists():
            write_texts(folder / name, 8, seed=0)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"kind": "depth", "remove": 2}],
         "stages.0.steps.0.remove: 2 blocks removed but the model has 2 (num_hidden_layers)"),
        ([{"kind": "depth", "fraction": 0.9}],
         "stages.0.steps.0.fraction: 2 blocks removed but the model has 2"),
        ([{"kind": "lowrank", "rank": 64}],
         "stages.0.steps.0.rank: 64 is not below the smallest Linear dimension of the model, 64"),
        ([{"kind": "magnitude", "pattern": "2:5"}],
         "stages.0.steps.0.pattern: 2:5 needs input widths divisible by 5; the model's hidden_size is 64"),
        ([{"kind": "wanda", "pattern": "4:6"}], "stages.0.steps.0.pattern: 4:6 needs input widths"),
        ([{"kind": "sparsegpt", "pattern": "1:3"}], "stages.0.steps.0.pattern: 1:3 needs input widths"),
        ([{"kind": "structured", "remove_heads": 4}],
         "stages.0.steps.0.remove_heads: 4 heads removed but the model has 4 per layer"),
        ([{"kind": "structured", "remove_heads": 1}],
         ("stages.0.steps.0.remove_heads: transformers rejects the pruned config: The hidden size "
          "(64) is not a multiple of the number of attention heads (3)")),
        ([{"kind": "share", "group_size": 3}],
         "stages.0.steps.0.group_size: 3 blocks per group but the model has 2"),
        ([{"kind": "moe_merge", "experts": 2}],
         "stages.0.steps.0.experts: model type 'llama' has no experts"),
        ([{"kind": "depth", "remove": 1}, {"kind": "rtn", "bits": 8}],
         "stages.0.steps: depth changes the model's structure and must be the only step of its stage"),
        ([{"kind": "gptq", "sequential": True, "targets": ["*q_proj"]}, {"kind": "rtn", "targets": ["*o_proj"]}],
         "stages.0.steps: gptq with sequential: true must be the only step of its stage"),
    ],
)
def test_steps_the_model_cannot_meet_name_the_field(
    tmp_path: Path, config_only_model: Path, steps: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(RecipeError) as error:
        load_recipe(_write(tmp_path, _recipe(config_only_model, steps)))
    assert message in str(error.value)


def test_later_stages_are_checked_against_the_model_earlier_stages_leave(
    tmp_path: Path, config_only_model: Path
) -> None:
    raw = _recipe(config_only_model, [{"kind": "depth", "remove": 1}], [{"kind": "share", "group_size": 2}])
    with pytest.raises(RecipeError, match=r"stages.1.steps.0.group_size: 2 blocks per group but the model has 1"):
        load_recipe(_write(tmp_path, raw))
    fits = _recipe(config_only_model, [{"kind": "structured", "remove_heads": 2}],
                   [{"kind": "lowrank", "rank": 16}], [{"kind": "magnitude", "pattern": "2:4"}])
    assert len(load_recipe(_write(tmp_path, fits)).stages) == 3


def test_cli_rejects_an_unmeetable_step_with_exit_2_and_logs_nothing(
    tmp_path: Path, config_only_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = _write(work, _recipe(config_only_model, [{"kind": "depth", "remove": 7}]))
    for command in ("validate", "run"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert "stages.0.steps.0.remove: 7 blocks removed" in result.output
    # no store, no workspace: only what the test wrote
    assert sorted(p.name for p in work.iterdir()) == ["calibration.txt", "evaluation.txt", "recipe.yaml"]

"""Recipe validation: errors name the field and the valid options; the CLI exits 2
and touches neither weights nor the registry."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from squeezeflow.cli import app
from squeezeflow.recipe import RecipeError, load_recipe
from squeezeflow.testing import write_texts

REPO = Path(__file__).resolve().parents[1]


def recipe(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "name": "t",
        "evaluation": {"data": {"source": "data/evaluation.txt"}},
        "stages": [{"name": "q", "steps": [{"kind": "rtn", "bits": 8}]}],
        "registration": {"model_name": "m"},
    }
    raw.update(overrides)
    return raw


def write(tmp_path: Path, raw: dict[str, object]) -> Path:
    """The recipe, and the evaluation text it reads (a missing file is an error of its own)."""
    if not (tmp_path / "data" / "evaluation.txt").exists():
        write_texts(tmp_path / "data" / "evaluation.txt", 8, seed=0)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def bundled_recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of recipes/ with the tiny models its `tiny-*` recipes read, made by
    recipes/tiny_models.py (untrained: validation reads config.json only), so that
    their model checks run here instead of being skipped on a fresh clone."""
    folder = tmp_path_factory.mktemp("recipes")
    for path in (REPO / "recipes").glob("*.yaml"):
        shutil.copy(path, folder)
    shutil.copytree(REPO / "recipes" / "data", folder / "data")
    spec = importlib.util.spec_from_file_location("tiny_models", REPO / "recipes" / "tiny_models.py")
    assert spec is not None and spec.loader is not None
    tiny_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_models)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_models, "train_causal_lm", lambda *args, **kwargs: None)
        tiny_models.main(folder / "models")
    return folder


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"stages": [{"name": "q", "steps": [{"kind": "gtpq"}]}]},
         "stages.0.steps.0.kind: unknown step kind 'gtpq'; known kinds: "),
        ({"stages": [{"name": "q", "steps": [{"kind": "rtn", "bitz": 4}]}]},
         "stages.0.steps.0: unknown key 'bitz'; valid keys: bits, group_size, ignore, kind"),
        ({"stages": [{"name": "q", "steps": [{"kind": "rtn", "bits": 5}]}]},
         "stages.0.steps.0.bits: bits must be one of 2, 3, 4, 8 (got 5)"),
        ({"stages": [{"name": "q", "steps": [{"kind": "magnitude", "sparsity": 1.5}]}]},
         "stages.0.steps.0.sparsity: Input should be less than 1 (got 1.5)"),
        ({"modle": {"source": "default"}}, "unknown key 'modle'; valid keys: calibration"),
        ({"gates": [{"metric": "cosine", "min": 0.9}]},
         "gates.0.metric: unknown metric 'cosine'; known metrics: "),
        ({"stages": []}, "stages: Tuple should have at least 1 item"),
        ({"stages": [{"name": "a", "steps": [{"kind": "rtn"}]}, {"name": "a", "steps": [{"kind": "rtn"}]}]},
         "stage names must be unique; repeated: a"),
        ({"registration": {"model_name": "m", "alias": "latest"}}, "alias 'latest' is reserved"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, recipe(**overrides)))
    assert message in str(error.value)


def test_relative_data_paths_resolve_against_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "evaluation.txt").write_text("a sentence\n")
    loaded = load_recipe(write(tmp_path, recipe()))
    assert loaded.evaluation.data.source == str(tmp_path / "data" / "evaluation.txt")


def test_bundled_recipes_are_valid(bundled_recipes: Path) -> None:
    paths = sorted(bundled_recipes.glob("*.yaml"))
    assert {p.name for p in paths} == {p.name for p in (REPO / "recipes").glob("*.yaml")}
    for path in paths:
        # strict: every check ran, including the model checks of the tiny-* recipes
        assert load_recipe(path, strict=True).stages, path


@pytest.mark.parametrize("bad", [{"stages": [{"name": "q", "steps": [{"kind": "gtpq"}]}]},
                                 {"stages": [{"name": "q", "steps": [{"kind": "rtn", "bitz": 4}]}]},
                                 {"stages": [{"name": "q", "steps": [{"kind": "rtn", "bits": 5}]}]}])
def test_cli_rejects_bad_recipe_with_exit_2_and_logs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: dict[str, object]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write(tmp_path, recipe(**bad))
    for command in ("validate", "run"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert "stages.0.steps.0" in result.output
    # no registry store, no MLflow run, no workspace was created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "recipe.yaml"]


def test_cli_validate_accepts_the_default_recipe() -> None:
    result = CliRunner().invoke(app, ["validate", str(REPO / "recipes" / "default.yaml")])
    assert result.exit_code == 0, result.output
    assert "minilm-int8" in result.output


def test_recipe_hash_and_dump_include_every_step_field(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "evaluation.txt").write_text("a sentence\n")
    eight = load_recipe(write(tmp_path, recipe()))
    four = load_recipe(write(tmp_path, recipe(
        stages=[{"name": "q", "steps": [{"kind": "rtn", "bits": 4}]}])))
    assert eight.model_dump()["stages"][0]["steps"][0]["bits"] == 8
    assert eight.sha256() != four.sha256()

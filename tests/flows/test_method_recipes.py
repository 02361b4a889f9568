"""Each paper-method recipe in recipes/ runs through `squeeze run` on a tiny model made by
the tests (the recipe's model and data replaced by fixtures, everything else as shipped)
and registers a version whose stage metrics the method reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from squeezeflow.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# recipe file -> the step kind its run must report on
METHOD_RECIPES = {
    "tiny-llama-bitstack.yaml": "bitstack",
    "tiny-llama-pvtuning.yaml": "pv_tune",
    "tiny-mixtral-qmoe.yaml": "qmoe",
    "tiny-llama-rps-distill.yaml": "rps",
}


@pytest.fixture(scope="session")
def trained_mixtral_dir(session_dir: Path) -> Path:
    """A 2-block Mixtral with 8 experts (top-2) trained for a few seconds."""
    from squeezeflow.testing import save_model, tiny_mixtral, train_causal_lm

    model, tokenizer = tiny_mixtral(hidden=64, layers=2, heads=4, intermediate=64, experts=8, top_k=2)
    train_causal_lm(model, tokenizer, steps=60)
    return save_model(model, tokenizer, session_dir / "tiny-mixtral")


def _with_fixtures(raw: dict, model: Path, texts: dict[str, Path]) -> dict:
    """The shipped recipe, on the test's model and data, with fewer samples (2 cores)."""
    raw["model"]["source"] = str(model)
    for section in ("calibration", "training"):
        if section in raw:
            raw[section]["source"] = str(texts["calibration"])
            raw[section]["num_samples"] = min(raw[section].get("num_samples", 64), 32)
    raw["evaluation"]["data"]["source"] = str(texts["evaluation"])
    raw["evaluation"]["data"]["num_samples"] = 16
    raw["evaluation"]["suites"] = ["quality", "size"]
    raw.pop("gates", None)  # the shipped gates are tuned for the recipe's own, larger model
    for stage in raw["stages"]:
        for step in stage["steps"]:  # a short run: the method's quality is the benchmarks' job
            for field, cap in (("max_steps", 20), ("eval_every", 10), ("checkpoint_every", 10),
                               ("importance_samples", 8)):
                if field in step:
                    step[field] = min(step[field], cap)
    return raw


@pytest.mark.parametrize("recipe_file", sorted(METHOD_RECIPES))
def test_method_recipe_runs_through_squeeze_run(
    recipe_file: str, workdir: Path, trained_llama_dir: Path, trained_mixtral_dir: Path,
    text_files: dict[str, Path],
) -> None:
    raw = yaml.safe_load((RECIPES / recipe_file).read_text())
    model = trained_mixtral_dir if "mixtral" in recipe_file else trained_llama_dir
    path = workdir / recipe_file
    path.write_text(yaml.safe_dump(_with_fixtures(raw, model, text_files)))

    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output

    client = MlflowClient()
    name = raw["registration"]["model_name"]
    [version] = client.search_model_versions(f"name = '{name}'")
    run = client.get_run(version.run_id)
    assert "perplexity" in run.data.metrics and "weights_mb" in run.data.metrics
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    kind = METHOD_RECIPES[recipe_file]
    reported = {key for child in children for key in child.data.metrics}
    assert any(f".{kind}." in key for key in reported), sorted(reported)

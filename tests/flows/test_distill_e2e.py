"""Distillation through the compress flow: depth pruning + distill and block sharing +
distill register versions with stage metrics and training curves by step; a run killed
inside the distill stage resumes its training from the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from squeezeflow.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

DISTILL = {"kind": "distill", "max_steps": 30, "lr": 1e-3, "warmup_steps": 3, "log_every": 10,
           "eval_every": 10, "checkpoint_every": 10}


def write_recipe(folder: Path, model_dir: Path, text_files: dict[str, Path], first: dict,
                 name: str) -> Path:
    raw = {
        "name": name,
        "model": {"source": str(model_dir)},
        "calibration": {"source": str(text_files["calibration"]), "num_samples": 16},
        "training": {"source": str(text_files["calibration"]), "num_samples": 64,
                     "max_length": 32, "batch_size": 8},
        "evaluation": {"data": {"source": str(text_files["evaluation"]), "num_samples": 32},
                       "max_length": 32, "suites": ["quality", "size"]},
        "stages": [
            {"name": "shrink", "steps": [first]},
            {"name": "heal", "steps": [DISTILL]},
        ],
        "registration": {"model_name": name},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stage_run(client: MlflowClient, run_id: str, name: str):  # type: ignore[no-untyped-def]
    run = client.get_run(run_id)
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
    )
    return next(c for c in children if c.data.tags["mlflow.runName"].endswith(name))


def test_depth_pruning_then_distillation_through_squeeze_run(
    workdir: Path, trained_llama_dir: Path, text_files: dict[str, Path]
) -> None:
    path = write_recipe(workdir, trained_llama_dir, text_files, {"kind": "depth", "remove": 1},
                        "tiny-llama-depth-kd")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output

    client = MlflowClient()
    [version] = client.search_model_versions("name = 'tiny-llama-depth-kd'")
    run = client.get_run(version.run_id)
    assert len(run.data.tags["squeezeflow.training_sha256"]) == 64
    heal = stage_run(client, version.run_id, "heal")
    assert heal.data.metrics["0.distill.steps"] == 30
    # curves are metric histories logged at their training steps
    loss = client.get_metric_history(heal.info.run_id, "0.distill.loss")
    assert [m.step for m in loss] == [10, 20, 30]
    assert loss[-1].value < loss[0].value
    validation = client.get_metric_history(heal.info.run_id, "0.distill.validation_perplexity")
    assert [m.step for m in validation] == [10, 20, 30]
    assert run.data.metrics["perplexity"] < validation[0].value * 1.5  # evaluated after healing
    # the resumable checkpoint is gone once the stage is complete
    assert not any((workdir / ".squeezeflow" / "training").glob("*/checkpoint.pt"))


def test_sharing_then_distillation_resumes_after_a_crash_in_training(
    workdir: Path, trained_llama_dir: Path, text_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from squeezeflow.compression.distillation.kd import trainer
    from squeezeflow.flows.compress import compress

    path = write_recipe(workdir, trained_llama_dir, text_files, {"kind": "share", "group_size": 2},
                        "tiny-llama-share-kd")
    original = trainer.Distiller._save

    def save_then_die(self: trainer.Distiller) -> None:
        original(self)
        if self.state.step == 20:
            raise RuntimeError("killed after the checkpoint of step 20")

    monkeypatch.setattr(trainer.Distiller, "_save", save_then_die)
    with pytest.raises(RuntimeError, match="killed after the checkpoint"):
        compress(str(path))
    client = MlflowClient()
    assert client.search_model_versions("name = 'tiny-llama-share-kd'") == []
    [checkpoint] = (workdir / ".squeezeflow" / "training").glob("*/checkpoint.pt")
    assert torch.load(checkpoint, weights_only=True)["state"]["step"] == 20

    monkeypatch.setattr(trainer.Distiller, "_save", original)
    result = compress(str(path))
    assert [s.reused for s in result.stages] == [True, False]
    heal = result.stages[1]
    assert heal.metrics["0.distill.resumed_from_step"] == 20
    assert heal.metrics["0.distill.steps"] == 30
    assert [step for step, _ in heal.curves["0.distill.loss"]] == [10, 20, 30]

    version = client.get_model_version("tiny-llama-share-kd", result.registered.version)
    history = client.get_metric_history(stage_run(client, version.run_id, "heal").info.run_id,
                                        "0.distill.loss")
    assert [m.step for m in history] == [10, 20, 30]
    # the shared block is still stored once after training
    from squeezeflow.compression.artifact import load_compressed

    model = load_compressed(result.model_dir).model
    layers = model.model.layers
    assert layers[0].mlp.up_proj.weight is layers[1].mlp.up_proj.weight


def test_teacher_from_the_registry(
    workdir: Path, trained_llama_dir: Path, text_files: dict[str, Path]
) -> None:
    from squeezeflow.flows.compress import compress
    from squeezeflow.registry.lineage import register_folder

    version = register_folder(trained_llama_dir, "tiny-teacher", None)
    path = write_recipe(workdir, trained_llama_dir, text_files, {"kind": "depth", "remove": 1},
                        "tiny-llama-registry-teacher")
    raw = yaml.safe_load(path.read_text())
    raw["stages"][1]["steps"][0] |= {"teacher": f"models:/tiny-teacher/{version}", "max_steps": 10}
    path.write_text(yaml.safe_dump(raw))
    result = compress(str(path))
    heal = result.stages[1]
    assert heal.metrics["0.distill.steps"] == 10
    # the registered version was downloaded into the workspace and used as the teacher
    downloaded = list((workdir / ".squeezeflow" / "bases").rglob("config.json"))
    assert len(downloaded) == 1

"""Six `squeeze run`s at once against one team stack (real MLflow and Prefect servers),
sharing one workspace: all register, the stage two identical runs share is computed
once, and no MLflow run is left RUNNING."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from squeezeflow.infra.stack import StackConfig, down, up
from tests.conftest import free_port

pytestmark = pytest.mark.slow

# (recipe name, its stage's step): five different recipes and one identical to the first
RUNS = [
    ("int8", {"kind": "rtn", "bits": 8}),
    ("int8", {"kind": "rtn", "bits": 8}),
    ("int4", {"kind": "rtn", "bits": 4, "group_size": 32}),
    ("sparse", {"kind": "magnitude", "sparsity": 0.5}),
    ("int3", {"kind": "rtn", "bits": 3, "group_size": 32}),
    ("int4g64", {"kind": "rtn", "bits": 4, "group_size": 64}),
]


def _recipe(folder: Path, name: str, step: dict[str, object], model: Path, evaluation: Path) -> Path:
    raw = {
        "name": f"concurrent-{name}",
        "model": {"source": str(model)},
        "evaluation": {"data": {"source": str(evaluation), "num_samples": 8}, "max_length": 32,
                       "suites": ["quality", "size"]},
        "stages": [{"name": f"stage-{name}", "steps": [step]}],
        "registration": {"model_name": f"concurrent-{name}"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_six_runs_at_once_share_a_workspace_and_all_register(
    tmp_path: Path, tiny_bert_dir: Path, text_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = StackConfig(root=tmp_path / "stack", mlflow_port=free_port(), prefect_port=free_port())
    monkeypatch.setenv("PREFECT_UI_ENABLED", "false")
    squeeze = shutil.which("squeeze", path=str(Path(sys.executable).parent))
    assert squeeze is not None
    try:
        environment = up(config, timeout_s=240)
        env = {**os.environ, **environment, "SQUEEZEFLOW_HOME": str(tmp_path / "shared-workspace"),
               "SQUEEZEFLOW_REGISTRY_RETRY_DELAYS": "2,5,10"}
        processes = []
        for index, (name, step) in enumerate(RUNS):
            path = _recipe(tmp_path, name, step, tiny_bert_dir, text_files["evaluation"])
            log = (tmp_path / f"run-{index}.log").open("wb")
            processes.append((subprocess.Popen([squeeze, "run", str(path)], cwd=tmp_path, env=env,
                                               stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + 600
        for index, (process, log) in enumerate(processes):
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
            log.close()
            output = (tmp_path / f"run-{index}.log").read_text()
            assert process.returncode == 0, f"run {index} failed:\n{output[-4000:]}"
        outputs = [(tmp_path / f"run-{i}.log").read_text() for i in range(len(RUNS))]

        # the identical pair: one computed its stage, the other waited and reused it
        pair = outputs[:2]
        assert sum("cached stages reused: stage-int8" in out for out in pair) == 1, pair
        assert not any("cached stages reused" in out for out in outputs[2:])
        checkpoints = [p for p in (tmp_path / "shared-workspace" / "checkpoints").iterdir()
                       if not p.name.startswith(".")]
        assert len(checkpoints) == len({name for name, _ in RUNS})

        client = MlflowClient(tracking_uri=config.mlflow_url, registry_uri=config.mlflow_url)
        for name, _ in RUNS:
            expected = sum(1 for other, _ in RUNS if other == name)
            versions = client.search_model_versions(f"name = 'concurrent-{name}'")
            assert len(versions) == expected, (name, versions)
        experiments = [e.experiment_id for e in client.search_experiments()]
        running = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")
        assert running == []
    finally:
        down(config)

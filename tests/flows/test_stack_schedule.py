"""The team stack (real MLflow and Prefect servers + worker) and a scheduled deployment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from squeezeflow.infra.stack import StackConfig, down, status, up
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def completed_runs(api_url: str, deployment_name: str) -> int:
    body = json.dumps({
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "deployments": {"name": {"any_": [deployment_name]}},
    }).encode()
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return len(json.loads(response.read()))


def test_stack_serves_a_scheduled_deployment(tmp_path: Path, tiny_bert_dir: Path,
                                             text_files: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = StackConfig(root=tmp_path / "stack", mlflow_port=free_port(),
                         prefect_port=free_port())
    monkeypatch.setenv("PREFECT_UI_ENABLED", "false")  # no UI build on start-up
    # schedule runs within seconds, not on the scheduler's default 60 s loop
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "2")
    try:
        environment = up(config, timeout_s=240)
        assert all(state.startswith("running") and state.endswith("healthy")
                   for state in status(config).values()), status(config)

        recipe = {
            "name": "scheduled-bert",
            "model": {"source": str(tiny_bert_dir)},
            "evaluation": {"data": {"source": str(text_files["evaluation"]), "num_samples": 16},
                           "max_length": 32, "suites": ["quality", "size"]},
            "stages": [{"name": "q", "steps": [{"kind": "rtn", "bits": 8}]}],
            "registration": {"model_name": "scheduled-bert"},
        }
        path = tmp_path / "scheduled.yaml"
        path.write_text(yaml.safe_dump(recipe))
        squeeze = shutil.which("squeeze", path=str(Path(sys.executable).parent))
        assert squeeze is not None
        env = {**os.environ, **environment, "SQUEEZEFLOW_HOME": str(tmp_path / "work"),
               "PREFECT_HOME": str(tmp_path / "serve-prefect"), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        log = (tmp_path / "serve.log").open("wb")
        server = subprocess.Popen(
            [squeeze, "serve", str(path), "--interval", "5", "--name", "every-5s"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while completed_runs(config.prefect_api_url, "every-5s") < 2:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(2)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a run in progress keeps the runner alive
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
            log.close()
        client = MlflowClient(tracking_uri=config.mlflow_url, registry_uri=config.mlflow_url)
        assert len(client.search_model_versions("name = 'scheduled-bert'")) >= 2
    finally:
        stopped = down(config)
    assert sorted(stopped) == ["mlflow", "prefect", "worker"]
    assert set(status(config).values()) == {"stopped"}

"""A registry that is down during a run (attempts and delays counted at a fake server),
and runs triggered by new base versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import free_port, start_mlflow_server, stop_server
from tests.registry.test_retries import CountingServer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

SLACK_S = 4.0  # below 5 s, the first default delay


def bert_recipe(folder: Path, source: str, evaluation: Path, name: str) -> Path:
    raw = {
        "name": name,
        "model": {"source": source},
        "evaluation": {"data": {"source": str(evaluation), "num_samples": 16}, "max_length": 32,
                       "suites": ["quality", "size"]},
        "stages": [{"name": "q", "steps": [{"kind": "rtn", "bits": 8}]}],
        "registration": {"model_name": name},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_registry_down_fails_without_a_version_then_resumes_from_cache(
    workdir: Path, tiny_bert_dir: Path, text_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import squeezeflow.tasks.stages as stages
    from squeezeflow.flows.compress import compress

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("SQUEEZEFLOW_REGISTRY_RETRY_DELAYS", "0.5,1.5")
    # one HTTP request per attempt (MLflow's own retries off), so the server counts attempts
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    executed: list[int] = []
    original = stages.compress_stage
    monkeypatch.setattr(stages, "compress_stage",
                        lambda *a, **k: executed.append(1) or original(*a, **k))
    path = bert_recipe(workdir, str(tiny_bert_dir), text_files["evaluation"], "flaky-registry")

    with CountingServer(503, "registry restarting", port=port) as down:
        with pytest.raises(Exception, match="503"):
            compress(str(path))  # every registry request fails: retried, then failed
    assert executed == [1]  # the stage ran once and its checkpoint is kept
    # 3 attempts (the first and one after each delay), each after its delay; at most
    # SLACK_S later (the attempt's own work on a busy 2-core machine), so well before
    # the default delays (5, 30, 120 s) or a second layer of retries would send them
    assert down.requests == ["GET /api/2.0/mlflow/experiments/get-by-name"] * 3
    gaps = [later - earlier for earlier, later in zip(down.times, down.times[1:], strict=False)]
    for gap, delay in zip(gaps, (0.5, 1.5), strict=True):
        assert delay <= gap < delay + SLACK_S, gaps

    server = start_mlflow_server(workdir / "server", port)
    try:
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        assert client.search_registered_models() == []  # no half-registered version
        result = compress(str(path))
        assert executed == [1]  # the rerun reused the cached stage
        assert [s.reused for s in result.stages] == [True]
        versions = client.search_model_versions("name = 'flaky-registry'")
        assert [int(v.version) for v in versions] == [1]
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    finally:
        stop_server(server)


def test_new_base_version_triggers_the_recipe(
    workdir: Path, tiny_bert_dir: Path, text_files: dict[str, Path]
) -> None:
    from squeezeflow.flows.watch import watch_base
    from squeezeflow.registry.lineage import register_folder

    assert register_folder(tiny_bert_dir, "bert-base") == "1"
    path = bert_recipe(workdir, "default", text_files["evaluation"], "bert-from-base")
    first = watch_base(str(path), "bert-base")
    assert first is not None and first.registered.version == "1"
    client = MlflowClient()
    version = client.get_model_version("bert-from-base", "1")
    assert version.tags["squeezeflow.base_model"] == "models:/bert-base/1"
    assert version.tags["squeezeflow.base_registered_model"] == "bert-base"
    assert version.tags["squeezeflow.base_version"] == "1"
    run = client.get_run(version.run_id)
    assert run.data.tags["squeezeflow.base_version"] == "1"

    assert watch_base(str(path), "bert-base") is None  # nothing new: nothing runs

    assert register_folder(tiny_bert_dir, "bert-base") == "2"
    second = watch_base(str(path), "bert-base")
    assert second is not None and second.registered.version == "2"
    assert client.get_registered_model("bert-from-base").tags[
        "squeezeflow.built_from.bert-base"] == "2"

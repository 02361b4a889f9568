"""Registration against a failing registry: how often it tries, how long it waits, and
what a failed attempt leaves behind (one parent run, nothing RUNNING, one version)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    TEMPORARILY_UNAVAILABLE,
)

from squeezeflow.evaluation.gates import GateResult
from squeezeflow.registry.records import RunRecord, StageRecord
from squeezeflow.registry.runs import (
    RETRY_DELAYS_VARIABLE,
    RetryPolicy,
    is_transient,
    log_and_register,
)


def make_record(model_dir: Path, name: str, flow_run_id: str | None = "flow-run-1") -> RunRecord:
    return RunRecord(
        recipe_name=name, recipe={"name": name, "stages": [{"name": "q"}, {"name": "p"}]},
        recipe_sha256="a" * 64, model_name=name, experiment="retries", tracking_uri=None,
        alias="candidate", base_model="base", base_sha256="b" * 64, kind="encoder",
        data_sha256={"evaluation": "c" * 64},
        stages=[StageRecord(name="q", checkpoint_sha256="d" * 64, seconds=1.0,
                            metrics={"error": 0.1}),
                StageRecord(name="p", checkpoint_sha256="e" * 64, seconds=2.0)],
        metrics={"fidelity_cosine": 0.99, "weights_mb": 1.5, "base_weights_mb": 6.0},
        gate_results=[GateResult(gate="compression_ratio >= 1", value=4.0, passed=True)],
        model_dir=str(model_dir), candidate_sha256="f" * 64, code_version="0",
        flow_run_id=flow_run_id,
    )


class Sleeps:
    """The sleep function handed to the retry loop: records, never waits."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


# --- a registry that answers every request with the same error, counting them ----------


class CountingServer:
    """An HTTP server on loopback that answers every request with `status`, counting the
    requests and noting when each arrived (time.monotonic)."""

    def __init__(self, status: int, body: str, port: int = 0) -> None:
        self.requests: list[str] = []
        self.times: list[float] = []
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                counter.times.append(time.monotonic())
                counter.requests.append(f"{self.command} {self.path.split('?')[0]}")
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet test output

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's own HTTP layer retries each request (2 retries by default in registry/
    # store.py); no backoff and no jitter here so the test never waits for real
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


@pytest.mark.usefixtures("http_registry_env")
def test_a_registry_answering_503_gets_every_attempt_after_its_delay(tiny_bert_dir: Path) -> None:
    sleeps = Sleeps()
    with CountingServer(503, "unavailable") as server:
        record = make_record(tiny_bert_dir, "down").model_copy(update={"tracking_uri": server.url})
        with pytest.raises(MlflowException, match="503"):
            log_and_register(record, RetryPolicy(delays_s=(0.5, 2.0)), sleep=sleeps)
    # 3 attempts (2 delays + 1), each the experiment lookup sent 1 + 2 times by MLflow
    assert sleeps.calls == [0.5, 2.0]
    assert server.requests == ["GET /api/2.0/mlflow/experiments/get-by-name"] * 9


@pytest.mark.usefixtures("http_registry_env")
def test_a_refused_request_is_not_retried(tiny_bert_dir: Path) -> None:
    sleeps = Sleeps()
    body = '{"error_code": "PERMISSION_DENIED", "message": "no write access"}'
    with CountingServer(403, body) as server:
        record = make_record(tiny_bert_dir, "denied").model_copy(update={"tracking_uri": server.url})
        with pytest.raises(MlflowException, match="no write access"):
            log_and_register(record, RetryPolicy(delays_s=(0.5, 2.0)), sleep=sleeps)
    assert sleeps.calls == [] and len(server.requests) == 1


def test_retry_policy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RETRY_DELAYS_VARIABLE, raising=False)
    assert RetryPolicy.from_environment().delays_s == (5.0, 30.0, 120.0)
    monkeypatch.setenv(RETRY_DELAYS_VARIABLE, "0.5, 1")
    assert RetryPolicy.from_environment().attempts == 3
    monkeypatch.setenv(RETRY_DELAYS_VARIABLE, "")
    assert RetryPolicy.from_environment().attempts == 1
    monkeypatch.setenv(RETRY_DELAYS_VARIABLE, "5,-1")
    with pytest.raises(ValueError, match=RETRY_DELAYS_VARIABLE):
        RetryPolicy.from_environment()


def test_which_errors_are_worth_another_attempt() -> None:
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(MlflowException("API request failed: Max retries exceeded"))  # 500
    assert is_transient(requests.ConnectionError("connection refused"))
    assert is_transient(sqlalchemy.exc.OperationalError("INSERT", {}, Exception("locked")))
    # a concurrent writer won a race (e.g. two runs set the same alias at once)
    assert is_transient(MlflowException(
        "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.alias",
        error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(MlflowException("exists", error_code=RESOURCE_ALREADY_EXISTS))
    assert not is_transient(FileNotFoundError("model folder gone"))
    assert not is_transient(ValueError("a bug of ours"))


# --- faults injected at the MlflowClient boundary, on a local SQLite registry ------------


def fail_on(monkeypatch: pytest.MonkeyPatch, method: str, calls: set[int]) -> None:
    """Make `MlflowClient.<method>` raise a transient error on the given call numbers
    (1-based), before doing anything."""
    original: Callable[..., Any] = getattr(MlflowClient, method)
    seen: list[int] = []

    def flaky(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(seen) + 1)
        if len(seen) in calls:
            raise MlflowException(f"injected: {method} #{len(seen)}",
                                  error_code=TEMPORARILY_UNAVAILABLE)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, flaky)


@pytest.fixture
def registry(workdir: Path) -> Iterator[MlflowClient]:
    yield MlflowClient()


def test_failed_attempts_reuse_one_parent_run_and_leave_nothing_behind(
    registry: MlflowClient, workdir: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = make_record(tiny_bert_dir, "flaky")
    # attempt 1: the first stage run's metrics (3rd log_batch: params, metrics, stage 0)
    fail_on(monkeypatch, "log_batch", {3})
    # attempt 2: the model upload (the logged model is left unfinished)
    fail_on(monkeypatch, "log_model_artifacts", {1})
    # attempt 3: creating the version (attempt 3's upload is READY and kept);
    # attempt 4: the version is created but its answer is lost
    monkeypatch.setattr(MlflowClient, "_create_model_version",
                        _lose_second_answer(MlflowClient._create_model_version))
    sleeps = Sleeps()

    result = log_and_register(record, RetryPolicy(delays_s=(1.0, 2.0, 3.0, 4.0)), sleep=sleeps)

    assert sleeps.calls == [1.0, 2.0, 3.0, 4.0]  # 5 attempts, the 5th succeeded
    versions = registry.search_model_versions("name = 'flaky'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", result.run_id)]
    assert result.version == "1" and result.aliases == ["candidate"]

    experiment = registry.get_experiment_by_name("retries").experiment_id
    every_run = registry.search_runs([experiment], run_view_type=ViewType.ALL)
    assert [r.info.status for r in every_run if r.info.status == "RUNNING"] == []
    parents = [r for r in every_run if "mlflow.parentRunId" not in r.data.tags]
    assert [(p.info.run_id, p.info.status) for p in parents] == [(result.run_id, "FINISHED")]
    live_stages = [r for r in every_run if r.info.lifecycle_stage == "active"
                   and r.data.tags.get("mlflow.parentRunId") == result.run_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in live_stages) == [
        "stage 0: q", "stage 1: p"]
    assert all(r.info.status == "FINISHED" for r in live_stages)
    deleted_stages = [r for r in every_run if r.info.lifecycle_stage == "deleted"]
    # attempts 1-3 logged stage runs (attempt 1 failed inside its first one); attempt 4's
    # are the live ones; attempt 5 found the version and logged nothing again
    assert sorted(r.info.status for r in deleted_stages) == ["FAILED"] + ["FINISHED"] * 4

    # one model upload survives: attempt 2's unfinished one is deleted with its files,
    # attempt 3's is reused by attempts 4 and 5 instead of being uploaded again
    models = registry.search_logged_models([experiment])
    assert [m.status for m in models] == [LoggedModelStatus.READY]
    assert versions[0].source == models[0].model_uri
    uploads = sorted(p.name for p in (workdir / "mlartifacts" / "models").iterdir())
    assert uploads == [models[0].model_id]

    # metrics re-logged by later attempts would show as extra points in the history
    assert len(registry.get_metric_history(result.run_id, "fidelity_cosine")) == 1


def _lose_second_answer(create: Callable[..., Any]) -> Callable[..., Any]:
    """`_create_model_version` that fails before creating on call 1 and after creating
    on call 2 (the registry did it; the answer never arrived)."""
    seen: list[int] = []

    def flaky(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(seen) + 1)
        if len(seen) == 1:
            raise MlflowException("injected: no version created", error_code=TEMPORARILY_UNAVAILABLE)
        version = create(self, *args, **kwargs)
        if len(seen) == 2:
            raise MlflowException("injected: answer lost", error_code=TEMPORARILY_UNAVAILABLE)
        return version

    return flaky


def test_a_retried_task_of_the_same_flow_run_continues_its_parent_run(
    registry: MlflowClient, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole call that failed (e.g. a Prefect task retry) is continued by the next call
    with the same flow run; without a flow run id, every call is its own registration."""
    record = make_record(tiny_bert_dir, "task-retry")
    fail_on(monkeypatch, "log_model_artifacts", {1})
    with pytest.raises(MlflowException, match="injected"):
        log_and_register(record, RetryPolicy(delays_s=()), sleep=Sleeps())
    experiment = registry.get_experiment_by_name("retries").experiment_id
    failed = registry.search_runs([experiment], "tags.mlflow.runName = 'task-retry'")
    assert [r.info.status for r in failed] == ["FAILED"]  # marked at once, not left RUNNING

    again = log_and_register(record, RetryPolicy(delays_s=()), sleep=Sleeps())
    assert again.run_id == failed[0].info.run_id and again.version == "1"
    assert log_and_register(record, RetryPolicy(delays_s=()), sleep=Sleeps()).version == "1"
    other = log_and_register(record.model_copy(update={"flow_run_id": None}),
                             RetryPolicy(delays_s=()), sleep=Sleeps())
    assert other.version == "2" and other.run_id != again.run_id


# --- many runs registering at once against one server ------------------------------------

WRITERS = 6  # the scenario: six `squeeze run`s started at once

REGISTERING_CHILD = """
import pathlib, sys, time
from squeezeflow.registry.records import RunRecord
from squeezeflow.registry.runs import RetryPolicy, log_and_register
record = RunRecord.model_validate_json(sys.argv[1])
go = pathlib.Path(sys.argv[2])
while not go.exists():  # imports done: wait so that every writer starts together
    time.sleep(0.05)
# short delays: the test should not wait minutes; the count is the default's
print(log_and_register(record, RetryPolicy(delays_s=(1.0, 2.0, 4.0))).model_dump_json())
"""


@pytest.mark.slow
def test_concurrent_registrations_all_get_a_version_and_leave_nothing_running(
    mlflow_server: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    import json
    import os
    import subprocess
    import sys

    name = "concurrent"  # one registered model, created by whichever writer comes first
    go = tmp_path / "go"
    environment = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTERING_CHILD,
             make_record(tiny_bert_dir, name, flow_run_id=f"flow-{index}").model_dump_json(),
             str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        )
        for index in range(WRITERS)
    ]
    time.sleep(15)  # enough for every writer to import mlflow on 2 busy cores
    go.touch()
    outputs = [writer.communicate(timeout=600) for writer in writers]
    for writer, (_, stderr) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, stderr[-3000:]
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, WRITERS + 1))
    assert {v.run_id for v in versions} == {r["run_id"] for r in results}
    assert sorted(int(r["version"]) for r in results) == list(range(1, WRITERS + 1))
    experiment = client.get_experiment_by_name("retries").experiment_id
    every_run = client.search_runs([experiment], run_view_type=ViewType.ALL)
    assert [r.info.run_id for r in every_run if r.info.status == "RUNNING"] == []
    parents = [r for r in every_run if "mlflow.parentRunId" not in r.data.tags
               and r.data.tags.get("mlflow.runName") == name]
    assert sorted(r.info.status for r in parents) == ["FINISHED"] * WRITERS


def test_an_experiment_created_by_a_concurrent_run_is_used_without_a_retry(
    registry: MlflowClient, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = registry.create_experiment("retries")  # another run created it just now...
    original = MlflowClient.get_experiment_by_name
    looked: list[str] = []

    def stale_first(self: MlflowClient, name: str) -> Any:
        looked.append(name)
        return None if len(looked) == 1 else original(self, name)  # ...after our lookup

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first)
    sleeps = Sleeps()
    result = log_and_register(make_record(tiny_bert_dir, "racing"), RetryPolicy(), sleep=sleeps)
    assert sleeps.calls == [] and len(looked) == 2
    assert registry.get_run(result.run_id).info.experiment_id == existing

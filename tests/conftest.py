"""Shared fixtures: quiet environment, one Prefect test server per session, a
migrated MLflow store template copied per test, tiny models made on the spot."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# kernel choices are measured afresh per test session, never read from the user's cache
os.environ.setdefault(
    "SQUEEZEFLOW_KERNEL_CACHE", str(Path(tempfile.mkdtemp(prefix="squeezeflow-kernels-")) / "k.json")
)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def prefect_server(session_dir: Path) -> Iterator[None]:
    """One temporary Prefect API server for the whole session (15-25 s to start)."""
    os.environ["PREFECT_HOME"] = str(session_dir / "prefect")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_template(session_dir: Path) -> Path:
    """A migrated, empty MLflow SQLite store; copying it beats migrating (~5 s) per test."""
    from mlflow import MlflowClient

    path = session_dir / "template-mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory with its own MLflow store and squeezeflow workspace."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SQUEEZEFLOW_HOME", str(tmp_path / ".squeezeflow"))
    import mlflow

    mlflow.set_tracking_uri(uri)  # a URI set by an earlier test would win over the env var
    mlflow.set_registry_uri(uri)
    return tmp_path


@pytest.fixture(scope="session")
def trained_llama_dir(session_dir: Path) -> Path:
    """A tiny Llama trained for a few seconds on generated sentences."""
    from squeezeflow.testing import save_model, tiny_llama, train_causal_lm

    model, tokenizer = tiny_llama(hidden=64, layers=2, intermediate=128)
    train_causal_lm(model, tokenizer, steps=150)
    return save_model(model, tokenizer, session_dir / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert_dir(session_dir: Path) -> Path:
    from squeezeflow.testing import save_model, tiny_bert

    model, tokenizer = tiny_bert(hidden=64, layers=2, intermediate=128)
    return save_model(model, tokenizer, session_dir / "tiny-bert")


@pytest.fixture(scope="session")
def text_files(session_dir: Path) -> dict[str, Path]:
    from squeezeflow.testing import write_texts

    return {
        "calibration": write_texts(session_dir / "data" / "calibration.txt", 64, seed=11),
        "evaluation": write_texts(session_dir / "data" / "evaluation.txt", 64, seed=12),
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    """A real `mlflow server` on loopback (SQLite + artifact folder under `root`), answering."""
    import sys

    root.mkdir(parents=True, exist_ok=True)
    with (root / "server.log").open("ab") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    wait_for_http(f"http://127.0.0.1:{port}/health", process, timeout=180)
    return process


def stop_server(process: subprocess.Popen[bytes]) -> None:
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)


@pytest.fixture(scope="session")
def mlflow_server(session_dir: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port for the whole session."""
    port = free_port()
    process = start_mlflow_server(session_dir / "mlflow-server", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)

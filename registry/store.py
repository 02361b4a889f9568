"""Where the registry lives: MLflow tracking URI and experiment set-up.

Default: a SQLite file `mlflow.db` and an artifact folder `mlartifacts/` in the
working directory; `MLFLOW_TRACKING_URI` (or the recipe) points at a server instead.
This package is the only one in squeezeflow that imports mlflow.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow import MlflowClient

QUIET_ENVIRONMENT = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Fail a request to a down server within seconds (MLflow's default retries for
    # minutes); the register task retries the whole registration with its own backoff.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an absolute SQLite path in the working directory."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    # Absolute: MLflow resolves a relative sqlite path against the current directory.
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def connect(tracking_uri: str | None = None) -> MlflowClient:
    """A client for `tracking_uri` (or the default), with MLflow's chatter off."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created with a local artifact folder if new."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return str(existing.experiment_id)
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:"):
        # A local store keeps artifacts beside the database, not in ./mlruns.
        database = Path(client.tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / "mlartifacts").resolve().as_uri()
    return str(client.create_experiment(name, artifact_location=artifact_location))

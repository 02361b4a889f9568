"""Where the registry lives: MLflow tracking URI and experiment set-up.

Default: a SQLite file `mlflow.db` and an artifact folder `mlartifacts/` in the
working directory; `MLFLOW_TRACKING_URI` (or the recipe) points at a server instead.
This package is the only one in squeezeflow that imports mlflow.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from squeezeflow.settings import user_cache

log = logging.getLogger(__name__)
SQLITE_PREFIX = "sqlite:///"

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
    database = _sqlite_file(uri)
    if database is not None:
        _create_from_template(database)
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


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (query options dropped), None for any
    other store and for an in-memory SQLite database."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri.removeprefix(SQLITE_PREFIX).split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _create_from_template(database: Path) -> None:
    """A new SQLite registry starts as a copy of an empty, migrated one.

    MLflow creates a store by running every schema migration (about 1 s on 2 cores, in
    each new project, test and benchmark workspace); the result is the same for one MLflow
    version, so it is made once per user and version and copied. The template holds no
    experiment: MLflow adds its `Default` experiment on first connect, with this store's
    artifact root. Anything that goes wrong leaves the database to MLflow, as before.
    """
    if database.exists():
        return
    try:
        template = _schema_template()
        database.parent.mkdir(parents=True, exist_ok=True)
        staged = database.with_name(f".{database.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, staged)
        try:
            os.link(staged, database)  # fails if another process created it meanwhile
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    except (OSError, sqlite3.Error) as error:
        log.debug("registry %s not created from a template: %s", database, error)


def _schema_template() -> Path:
    """The migrated empty store for the installed MLflow, made on first use."""
    template = user_cache("mlflow") / f"empty-{mlflow.__version__}.db"
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    staged = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    staged.unlink(missing_ok=True)
    MlflowClient(tracking_uri=f"{SQLITE_PREFIX}{staged}").search_experiments()  # migrates
    with sqlite3.connect(staged) as db:  # without the Default experiment (see above)
        db.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
        db.execute("DELETE FROM experiments WHERE experiment_id = 0")
    staged.replace(template)
    return template

"""Where registry time goes before any model: creating a store, logging a model."""

from __future__ import annotations

import sqlite3
from importlib.metadata import version
from pathlib import Path

import mlflow.utils.environment
import pytest
from mlflow import MlflowClient

from squeezeflow.registry.pyfunc import installed, log_pyfunc_model
from squeezeflow.registry.store import _sqlite_file, connect


def _experiments(database: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(database) as db:
        return list(db.execute("SELECT experiment_id, name, artifact_location FROM experiments"))


def test_a_new_sqlite_registry_is_a_copy_of_one_migrated_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for project in ("one", "two"):
        (tmp_path / project).mkdir()
        monkeypatch.chdir(tmp_path / project)
        client = connect(f"sqlite:///{tmp_path / project / 'mlflow.db'}")
        client.create_registered_model(f"model-{project}")
    templates = list((tmp_path / "cache" / "squeezeflow" / "mlflow").glob("*.db"))
    assert [t.name for t in templates] == [f"empty-{version('mlflow')}.db"]
    assert _experiments(templates[0]) == []  # the Default experiment is the store's own
    for project in ("one", "two"):
        (default,) = _experiments(tmp_path / project / "mlflow.db")
        assert default[:2] == (0, "Default")
        assert default[2] == str(tmp_path / project / "mlruns" / "0")  # not the template's folder
        uri = f"sqlite:///{tmp_path / project / 'mlflow.db'}"
        names = [m.name for m in MlflowClient(uri, registry_uri=uri).search_registered_models()]
        assert names == [f"model-{project}"]  # a working store, not a shared file


def test_an_existing_registry_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    connect(uri).create_experiment("kept")
    assert "kept" in [e.name for e in connect(uri).search_experiments()]


def test_only_sqlite_files_are_created_from_the_template(tmp_path: Path) -> None:
    assert _sqlite_file(f"sqlite:///{tmp_path}/mlflow.db?timeout=30") == tmp_path / "mlflow.db"
    assert _sqlite_file("sqlite:///:memory:") is None
    assert _sqlite_file("http://registry:5000") is None
    assert _sqlite_file("postgresql://u@db/mlflow") is None


def test_only_requirements_pinned_to_what_is_installed_count_as_installed() -> None:
    torch = f"torch=={version('torch')}"
    assert installed([torch, f"mlflow=={version('mlflow')}"])
    assert not installed([torch, "torch==0.0.1"])
    assert not installed([f"torch>={version('torch')}"])  # a range: MLflow checks it
    assert not installed(["no-such-package-here==1.0"])
    assert not installed([f"{torch}; python_version < '3'"])


def test_mlflows_requirement_check_runs_only_for_requirements_not_installed(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[list[str]] = []
    monkeypatch.setattr(mlflow.utils.environment, "warn_dependency_requirement_mismatches",
                        lambda requirements: checked.append(list(requirements)))
    client = connect()
    folder = workdir / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    run = client.create_run(client.create_experiment("logging"))
    uri = log_pyfunc_model(run.info.run_id, str(folder), [f"torch=={version('torch')}"])
    assert uri.startswith("models:/") and checked == []
    # the check is back afterwards, and runs for a pin that is not installed
    log_pyfunc_model(run.info.run_id, str(folder), ["torch==0.0.1"])
    assert len(checked) == 1 and "torch==0.0.1" in checked[0]

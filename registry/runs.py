"""Log a finished compression run to MLflow and register its model version.

Order matters: the parent run, its child run per stage, params, metrics, tags and
artifacts are all written first; the model version is created only after every
one of them succeeded, so a failure never leaves a half-registered version.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from squeezeflow.evaluation.report import (
    TradeoffPoint,
    comparison_markdown,
    comparison_rows,
    quality_axis,
    tradeoff_plots,
)
from squeezeflow.registry.card import model_card
from squeezeflow.registry.pyfunc import ARTIFACT_KEY, CompressedModel
from squeezeflow.registry.records import RegisteredVersion, RunRecord
from squeezeflow.registry.store import connect, experiment_id

log = logging.getLogger(__name__)

TAG_PREFIX = "squeezeflow."
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow accepts at most 100 params (1000 metrics) per log_batch


def lineage_tags(record: RunRecord) -> dict[str, str]:
    """Tags of the run and its model version: where the model came from and what its
    speeds were measured on, each `squeezeflow.<key>`."""
    tags = dict(record.evaluation_tags) | {
        "base_model": record.base_model,
        "base_sha256": record.base_sha256,
        "recipe": record.recipe_name,
        "recipe_sha256": record.recipe_sha256,
        "model_sha256": record.candidate_sha256,
        "code_version": record.code_version,
        "kind": record.kind,
        "flow_run_id": record.flow_run_id or "",
    }
    tags |= {f"{name}_sha256": digest for name, digest in record.data_sha256.items()}
    if record.base_model.startswith("models:/"):  # the base is itself a registered version
        name, _, version = record.base_model.removeprefix("models:/").rpartition("/")
        tags |= {"base_registered_model": name, "base_version": version}
    return {TAG_PREFIX + key: value for key, value in tags.items()}


def log_and_register(record: RunRecord) -> RegisteredVersion:
    client = connect(record.tracking_uri)
    existing = _already_registered(client, record)
    if existing is not None:  # a retry after the version was created: do not register twice
        return existing
    experiment = experiment_id(client, record.experiment)
    tags = lineage_tags(record) | {"mlflow.runName": record.recipe_name}
    run = client.create_run(experiment, tags=tags)
    run_id = run.info.run_id
    try:
        _log_params(client, run_id, flatten(record.recipe))
        _log_metrics(client, run_id, record.metrics)
        for index, stage in enumerate(record.stages):
            child = client.create_run(
                experiment,
                tags={
                    "mlflow.parentRunId": run_id,
                    "mlflow.runName": f"stage {index}: {stage.name}",
                    TAG_PREFIX + "checkpoint_sha256": stage.checkpoint_sha256,
                },
            )
            _log_metrics(client, child.info.run_id, stage.metrics | {"seconds": stage.seconds})
            _log_curves(client, child.info.run_id, stage.curves)
            client.set_terminated(child.info.run_id)
        _log_report(client, run_id, record)
        gates = [result.model_dump() for result in record.gate_results]
        _log_texts(client, run_id, {
            "recipe.yaml": yaml.safe_dump(record.recipe, sort_keys=False),
            "report.json": json.dumps(
                {"metrics": record.metrics, "gates": gates,
                 "stages": [s.model_dump() for s in record.stages],
                 "measured_on": record.evaluation_tags}, indent=2),
            "model_card.md": model_card(record),
        })
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # the fluent run is thread-local and closed right after; the wrapper class
            # is importable, so pickling it by reference is safe
            warnings.filterwarnings("ignore", message="Passing a Python object")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=CompressedModel(),
                artifacts={ARTIFACT_KEY: record.model_dir},
                pip_requirements=requirements(),
            )
        version = mlflow.register_model(
            info.model_uri, record.model_name, tags=_version_tags(record, run_id)
        )
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    aliases = []
    if record.gates_passed:
        client.set_registered_model_alias(record.model_name, record.alias, version.version)
        aliases.append(record.alias)
    client.update_model_version(
        record.model_name, version.version, description=f"{record.recipe_name}: see model_card.md"
    )
    return RegisteredVersion(
        model_name=record.model_name,
        version=str(version.version),
        run_id=run_id,
        aliases=aliases,
        gates_passed=record.gates_passed,
        tracking_uri=client.tracking_uri,
    )


def _already_registered(client: MlflowClient, record: RunRecord) -> RegisteredVersion | None:
    if not record.flow_run_id:
        return None
    try:
        versions = client.search_model_versions(f"name = '{record.model_name}'")
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    for version in versions:
        tags = version.tags
        if (tags.get(TAG_PREFIX + "flow_run_id") == record.flow_run_id
                and tags.get(TAG_PREFIX + "model_sha256") == record.candidate_sha256):
            full = client.get_model_version(record.model_name, version.version)
            if record.gates_passed and record.alias not in full.aliases:
                client.set_registered_model_alias(record.model_name, record.alias, full.version)
            return RegisteredVersion(
                model_name=record.model_name, version=str(full.version),
                run_id=full.run_id or "", aliases=[record.alias] if record.gates_passed else [],
                gates_passed=record.gates_passed, tracking_uri=client.tracking_uri,
            )
    return None


def list_versions(model_name: str | None, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Registered versions (newest first) with their aliases, tags and run metrics."""
    client = connect(tracking_uri)
    query = f"name = '{model_name}'" if model_name else ""
    rows = []
    for found in client.search_model_versions(query):
        # search results carry no aliases: read each version itself
        version = client.get_model_version(found.name, found.version)
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
        rows.append({
            "name": version.name,
            "version": int(version.version),
            "aliases": list(version.aliases),
            "tags": dict(version.tags),
            "metrics": dict(metrics),
            "run_id": version.run_id,
        })
    return sorted(rows, key=lambda row: (row["name"], -row["version"]))


def download_model(uri: str, tracking_uri: str | None = None,
                   destination: Path | None = None) -> Path:
    """The compressed model folder of `models:/NAME@alias` (or /VERSION), downloaded."""
    connect(tracking_uri)
    if destination is not None:
        destination.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(destination) if destination is not None else None
    ))
    description = yaml.safe_load((local / "MLmodel").read_text())
    artifacts = description.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if ARTIFACT_KEY not in artifacts:
        raise FileNotFoundError(f"{uri} holds no squeezeflow model folder")
    return local / artifacts[ARTIFACT_KEY]["path"]


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested recipe -> {"stages.0.steps.0.bits": "4", ...} for MLflow params."""
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return {prefix: str(value)[:MAX_PARAM_LENGTH]}
    flat: dict[str, str] = {}
    for key, item in items:
        flat |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _version_tags(record: RunRecord, run_id: str) -> dict[str, str]:
    gate = "passed" if record.gates_passed else "failed"
    tags = lineage_tags(record) | {"gate": gate, TAG_PREFIX + "run_id": run_id}
    for index, result in enumerate(record.gate_results):
        tags[f"gate.{index}"] = f"{'pass' if result.passed else 'fail'}: {result.gate} "
        tags[f"gate.{index}"] += "(missing)" if result.value is None else f"({result.value:.6g})"
    return tags


def _log_report(client: MlflowClient, run_id: str, record: RunRecord) -> None:
    """comparison.md and trade-off plots: base, earlier versions of the model, this run."""
    axis = quality_axis(record.metrics)
    files = {"comparison.md": comparison_markdown(comparison_rows(record.metrics))}
    with tempfile.TemporaryDirectory() as folder:
        if axis is not None:
            label, quality, base_quality = axis
            points = [
                TradeoffPoint(label="base", quality=base_quality,
                              size_mb=record.metrics.get("base_weights_mb"),
                              latency_ms=record.metrics.get("base_latency_p50_ms")),
                *_earlier_points(client, record.model_name),
                TradeoffPoint(label="new", quality=quality,
                              size_mb=record.metrics.get("weights_mb"),
                              latency_ms=record.metrics.get("latency_p50_ms")),
            ]
            tradeoff_plots(points, label, Path(folder) / "plots")
        for name, text in files.items():
            (Path(folder) / name).write_text(text)
        client.log_artifacts(run_id, folder)


def artifact_uris(run_id: str, folder: str, tracking_uri: str | None = None) -> dict[str, str]:
    """Artifact name -> URI of each file in a run's artifact `folder` (e.g. the plots)."""
    client = connect(tracking_uri)
    root = client.get_run(run_id).info.artifact_uri.rstrip("/")
    return {
        Path(item.path).name: f"{root}/{item.path}"
        for item in client.list_artifacts(run_id, folder)
        if not item.is_dir
    }


def _earlier_points(client: MlflowClient, model_name: str) -> list[TradeoffPoint]:
    points = []
    for row in list_versions(model_name, client.tracking_uri):
        axis = quality_axis(row["metrics"])
        if axis is not None:
            points.append(TradeoffPoint(
                label=f"v{row['version']}", quality=axis[1],
                size_mb=row["metrics"].get("weights_mb"),
                latency_ms=row["metrics"].get("latency_p50_ms"),
            ))
    return points


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    entries = [Param(key, value) for key, value in params.items()]
    for chunk in _chunks(entries, BATCH):
        client.log_batch(run_id, params=chunk)


def _log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    import time

    now = int(time.time() * 1000)
    entries = [Metric(_metric_key(key), float(value), now, 0) for key, value in metrics.items()]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


def _log_curves(client: MlflowClient, run_id: str,
                curves: dict[str, list[tuple[int, float]]]) -> None:
    """Training curves as metric histories: each point logged at its training step."""
    import time

    now = int(time.time() * 1000)
    entries = [
        Metric(_metric_key(name), float(value), now, step)
        for name, points in curves.items() for step, value in points
    ]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _log_texts(client: MlflowClient, run_id: str, files: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text)
        client.log_artifacts(run_id, folder)


def requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "transformers", "safetensors")] + [
        f"squeezeflow=={version('squeezeflow')}"
    ]

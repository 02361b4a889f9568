"""Log a finished compression run to MLflow and register its model version.

Order matters: the parent run, its child run per stage, params, metrics, tags and
artifacts are all written first; the model version is created only after every
one of them succeeded, so a failure never leaves a half-registered version.

A registry that fails for a moment (restart, overload, a lost connection, many runs
writing at once) is retried with the pauses of a `RetryPolicy`; every attempt works
on the same parent run, and what a failed attempt left behind is cleaned up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import requests
import sqlalchemy.exc
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelStatus, Metric, Param, Run, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from pydantic import BaseModel, ConfigDict, field_validator

from squeezeflow.evaluation.bitstack_curve import curve_from_metrics, curve_plot
from squeezeflow.evaluation.report import (
    TradeoffPoint,
    comparison_markdown,
    comparison_rows,
    quality_axis,
    tradeoff_plots,
)
from squeezeflow.registry.card import model_card
from squeezeflow.registry.exports import export_tags, log_exports
from squeezeflow.registry.fetch import download_model  # noqa: F401  (re-exported: callers import it here)
from squeezeflow.registry.lineage import hub_commit_tags
from squeezeflow.registry.pyfunc import log_pyfunc_model
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
    tags |= hub_commit_tags(record.base_model, record.base_revision)
    if record.base_model.startswith("models:/"):  # the base is itself a registered version
        name, _, version = record.base_model.removeprefix("models:/").rpartition("/")
        tags |= {"base_registered_model": name, "base_version": version}
    return {TAG_PREFIX + key: value for key, value in tags.items()}


# On the parent run: the same for every attempt of one registration, so each finds it
REGISTRATION_KEY_TAG = TAG_PREFIX + "registration_key"
RETRY_DELAYS_VARIABLE = "SQUEEZEFLOW_REGISTRY_RETRY_DELAYS"  # e.g. "5,30,120" (seconds)
# HTTP statuses worth another attempt: timeout, rate limit, server-side failures
TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# How a unique-key clash between concurrent writers reads once MLflow has turned it into
# a 400 (its SQL store maps IntegrityError to BAD_REQUEST): SQLite, PostgreSQL, MySQL
CONCURRENT_WRITE_MARKERS = ("IntegrityError", "UniqueViolation", "Duplicate entry")


class RetryPolicy(BaseModel):
    """How often a registration is attempted, and the pause before each retry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 5 s rides out a dropped connection, 30 s a server restart, 120 s a database
    # fail-over: 4 attempts over ~2.5 min, then the run fails (its stages stay cached)
    delays_s: tuple[float, ...] = (5.0, 30.0, 120.0)

    @field_validator("delays_s")
    @classmethod
    def _not_negative(cls, delays: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in delays):
            raise ValueError(f"retry delays must be >= 0 s, got {list(delays)}")
        return delays

    @property
    def attempts(self) -> int:
        return len(self.delays_s) + 1

    @classmethod
    def from_environment(cls) -> RetryPolicy:
        """The delays in $SQUEEZEFLOW_REGISTRY_RETRY_DELAYS (comma-separated seconds; an
        empty value means a single attempt), else the defaults."""
        raw = os.environ.get(RETRY_DELAYS_VARIABLE)
        if raw is None:
            return cls()
        try:
            return cls(delays_s=tuple(float(value) for value in raw.split(",") if value.strip()))
        except ValueError as error:
            raise ValueError(f"{RETRY_DELAYS_VARIABLE}={raw!r}: {error}") from None


def is_transient(error: BaseException) -> bool:
    """Worth another attempt: the registry was unreachable, overloaded or failed inside.
    A request it refused (bad value, no permission) or a bug of ours is not."""
    if isinstance(error, MlflowException):
        if any(marker in error.message for marker in CONCURRENT_WRITE_MARKERS):
            return True  # another writer won a race; the retry re-reads and goes on
        return error.get_http_status_code() in TRANSIENT_HTTP_STATUS
    if isinstance(error, requests.HTTPError):  # artifact uploads report HTTP errors directly
        status = error.response.status_code if error.response is not None else None
        return status is None or status in TRANSIENT_HTTP_STATUS
    if isinstance(error, requests.RequestException):  # connection refused, reset, timed out
        return True
    return isinstance(error, ConnectionError | TimeoutError | sqlalchemy.exc.OperationalError)


def registration_key(record: RunRecord) -> str:
    """The same for every attempt to register this record within one flow run (so a
    retried Prefect task finds the parent run of its earlier try); unique otherwise."""
    if not record.flow_run_id:
        return uuid.uuid4().hex
    identity = f"{record.flow_run_id}/{record.model_name}/{record.candidate_sha256}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def log_and_register(record: RunRecord, policy: RetryPolicy | None = None,
                     sleep: Callable[[float], None] = time.sleep) -> RegisteredVersion:
    """Log the run and register its version, retrying transient registry errors.

    Every attempt works on the same parent run (found by its registration key), so a
    retry never opens a second one. What a failed attempt left is cleaned up: its runs
    are marked FAILED at once (when the registry still answers), and the next attempt
    deletes its stage runs and unfinished model uploads before logging again; a model
    upload that completed is reused, and a version the registry created although the
    answer was lost is found instead of created twice.
    """
    policy = policy or RetryPolicy.from_environment()
    client = connect(record.tracking_uri)
    key = registration_key(record)
    for attempt, delay in enumerate(policy.delays_s, start=1):
        try:
            return _register_once(client, record, key)
        except Exception as error:
            if not is_transient(error):
                raise
            log.warning("registering %s: attempt %d of %d failed (%s: %s); retrying in %g s",
                        record.model_name, attempt, policy.attempts, type(error).__name__,
                        _first_line(error), delay)
            sleep(delay)
    return _register_once(client, record, key)  # the last attempt: its error is the run's


def _register_once(client: MlflowClient, record: RunRecord, key: str) -> RegisteredVersion:
    experiment = _experiment(client, record.experiment)
    run = _parent_run(client, experiment, record, key)
    run_id = run.info.run_id
    try:
        version = _version_of_run(client, record.model_name, run_id)
        if version is None:  # not registered by an earlier attempt (or its lost answer)
            model = _discard_earlier_attempt(client, experiment, run_id)
            version = _log_and_create_version(client, experiment, run, record, model)
        client.set_terminated(run_id)
    except Exception:
        _end_failed_attempt(client, run_id)
        raise
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


def _experiment(client: MlflowClient, name: str) -> str:
    try:
        return experiment_id(client, name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return experiment_id(client, name)  # a concurrent run created it first: use theirs


def _parent_run(client: MlflowClient, experiment: str, record: RunRecord, key: str) -> Run:
    """The parent run of this registration: the one an earlier attempt opened, else new."""
    found = client.search_runs(
        [experiment], f"tags.`{REGISTRATION_KEY_TAG}` = '{key}'", ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time ASC"],
    )
    if not found:
        tags = lineage_tags(record) | {"mlflow.runName": record.recipe_name,
                                       REGISTRATION_KEY_TAG: key}
        return client.create_run(experiment, tags=tags)
    run, duplicates = found[0], found[1:]
    for duplicate in duplicates:  # created by a request whose answer was lost
        _delete_run(client, duplicate)
    if run.info.status != "RUNNING":  # marked FAILED when its attempt failed
        client.update_run(run.info.run_id, status="RUNNING")
    log.info("registration of %s continues in run %s", record.model_name, run.info.run_id)
    return run


def _version_of_run(client: MlflowClient, model_name: str, run_id: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return min(found, key=lambda version: int(version.version)) if found else None


def _discard_earlier_attempt(client: MlflowClient, experiment: str,
                             run_id: str) -> LoggedModel | None:
    """Delete what earlier attempts left under `run_id` (stage runs, unfinished model
    uploads); returns a completed model upload to reuse, if there is one."""
    for child in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'",
                                    ViewType.ACTIVE_ONLY):
        _delete_run(client, child)
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    keep = max(ready, key=lambda m: m.creation_timestamp) if ready else None
    for model in models:
        if keep is None or model.model_id != keep.model_id:
            _delete_logged_model(client, model)
    return keep


def _log_and_create_version(client: MlflowClient, experiment: str, run: Run, record: RunRecord,
                            model: LoggedModel | None) -> ModelVersion:
    run_id = run.info.run_id
    logged_params, logged_metrics = run.data.params, run.data.metrics  # by an earlier attempt
    _log_params(client, run_id, {key: value for key, value in flatten(record.recipe).items()
                                 if logged_params.get(key) != value})
    _log_metrics(client, run_id, {key: value for key, value in record.metrics.items()
                                  if logged_metrics.get(_metric_key(key)) != float(value)})
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
    _log_report(client, run_id, record)  # same file names on every attempt: replaced
    gates = [result.model_dump() for result in record.gate_results]
    _log_texts(client, run_id, {
        "recipe.yaml": yaml.safe_dump(record.recipe, sort_keys=False),
        "report.json": json.dumps(
            {"metrics": record.metrics, "gates": gates,
             "stages": [s.model_dump() for s in record.stages],
             "measured_on": record.evaluation_tags}, indent=2),
        "model_card.md": model_card(record),
    })
    log_exports(client, run_id, record.exports)  # same paths on every attempt: replaced
    if model is not None:
        model_uri = model.model_uri
        log.info("reusing model upload %s of an earlier attempt", model.model_id)
    else:
        model_uri = log_pyfunc_model(run_id, record.model_dir, requirements())
    version: ModelVersion = mlflow.register_model(
        model_uri, record.model_name, tags=_version_tags(record, run_id)
    )
    return version


def _end_failed_attempt(client: MlflowClient, run_id: str) -> None:
    """Mark the parent and its unfinished stage runs FAILED; best effort, since the
    registry that just failed may not answer (the next attempt cleans up then)."""
    try:
        experiment = client.get_run(run_id).info.experiment_id
        for child in client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'",
            ViewType.ACTIVE_ONLY,
        ):
            client.set_terminated(child.info.run_id, status="FAILED")
        client.set_terminated(run_id, status="FAILED")
    except Exception as error:  # the original error is the one to raise
        log.warning("could not mark run %s FAILED: %s", run_id, _first_line(error))


def _delete_run(client: MlflowClient, run: Run) -> None:
    if run.info.status == "RUNNING":  # a deleted run never stays RUNNING either
        client.set_terminated(run.info.run_id, status="FAILED")
    client.delete_run(run.info.run_id)


def _delete_logged_model(client: MlflowClient, model: LoggedModel) -> None:
    """Delete an unfinished (or superseded) model upload: the record and its files."""
    client.delete_logged_model(model.model_id)
    try:
        get_artifact_repository(model.artifact_location).delete_artifacts()
    except Exception as error:  # the record is gone; `mlflow gc` removes stray files too
        log.warning("could not delete the files of model upload %s: %s", model.model_id,
                    _first_line(error))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


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
    tags |= export_tags(record.exports)  # squeezeflow.export.<format>.sha256
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
        curve = curve_from_metrics(record.metrics)  # a BitStack version: quality at every budget
        if curve:
            curve_plot(curve, Path(folder) / "plots" / "bitstack_curve.png",
                       base_quality=record.metrics.get("base_perplexity"))
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
    now = int(time.time() * 1000)
    entries = [Metric(_metric_key(key), float(value), now, 0) for key, value in metrics.items()]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


def _log_curves(client: MlflowClient, run_id: str,
                curves: dict[str, list[tuple[int, float]]]) -> None:
    """Training curves as metric histories: each point logged at its training step."""
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

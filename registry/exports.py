"""Exports of a registered version: logged beside its model, their digests on the version.

An export (`compression/exports/`) of version N of model M is recorded twice:
- the tag `squeezeflow.export.<format>.sha256` on the version: the digest of the
  export folder's manifest, as `squeezeflow.model_sha256` is for the model folder;
- the folder itself, manifest included, as artifacts `exports/<format>/` of the
  version's run, and its figures as metrics `export.<format>.<figure>` of that run.

`download_export` fetches such a folder back and accepts it only if every file matches
its manifest and the manifest matches the version's tag.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from squeezeflow.compression.exports.base import ExportRecord
from squeezeflow.compression.integrity import verify_folder
from squeezeflow.registry.fetch import registered_version
from squeezeflow.registry.store import connect

log = logging.getLogger(__name__)

EXPORTS_ARTIFACT_DIR = "exports"  # artifacts `exports/<format>/` of the version's run


def export_tag(format: str) -> str:  # noqa: A002 - the word the CLI and recipes use
    """The version tag holding the digest of the version's `format` export."""
    return f"squeezeflow.export.{format}.sha256"


def export_tags(exports: Sequence[ExportRecord]) -> dict[str, str]:
    """{tag: digest} of each export, for the version that was exported."""
    return {export_tag(record.format): record.sha256 for record in exports}


def log_exports(client: MlflowClient, run_id: str, exports: Sequence[ExportRecord]) -> None:
    """Each export folder as artifacts `exports/<format>/` of `run_id`, its figures as metrics."""
    for record in exports:
        client.log_artifacts(run_id, str(record.folder), f"{EXPORTS_ARTIFACT_DIR}/{record.format}")
        if record.figures:
            metrics = [Metric(f"export.{record.format}.{name}", value, 0, 0)
                       for name, value in sorted(record.figures.items())]
            client.log_batch(run_id, metrics=metrics)


def find_version(uri: str, tracking_uri: str | None = None) -> ModelVersion:
    """The version `models:/NAME/VERSION` or `models:/NAME@alias` names; LookupError if none."""
    client = connect(tracking_uri)
    try:
        version = registered_version(client, uri)
    except MlflowException as error:  # no such model, version or alias
        raise LookupError(f"{uri}: {str(error).splitlines()[0]}") from None
    if version is None:
        raise LookupError(f"{uri} is not a registered version: use models:/NAME/VERSION "
                          "or models:/NAME@alias")
    return version


def record_export(uri: str, record: ExportRecord, tracking_uri: str | None = None) -> ModelVersion:
    """Log `record`'s folder to the run of the version `uri` names and tag the version."""
    version = find_version(uri, tracking_uri)
    client = connect(tracking_uri)
    if version.run_id:
        log_exports(client, version.run_id, [record])
    else:  # a version registered from a bare model URI has no run to hold the files
        log.warning("%s has no run: the %s export's digest is tagged, its files not logged",
                    uri, record.format)
    client.set_model_version_tag(version.name, version.version, export_tag(record.format),
                                 record.sha256)
    log.info("recorded the %s export of %s (sha256 %s)", record.format, uri, record.sha256[:12])
    return version


def download_export(uri: str, format: str, destination: Path | None = None,  # noqa: A002
                    tracking_uri: str | None = None) -> Path:
    """The `format` export of version `uri`, downloaded and checked against the version's tag."""
    version = find_version(uri, tracking_uri)
    expected = version.tags.get(export_tag(format))
    if expected is None:
        raise LookupError(f"{uri} has no {format} export (no {export_tag(format)} tag)")
    connect(tracking_uri)
    target = destination or Path(tempfile.mkdtemp(prefix="squeezeflow-export-"))
    target.mkdir(parents=True, exist_ok=True)
    folder = Path(mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path=f"{EXPORTS_ARTIFACT_DIR}/{format}", dst_path=str(target),
    ))
    verify_folder(folder, expected)  # IntegrityError naming the file that differs
    return folder

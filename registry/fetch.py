"""Download a registered version's model folder and check it against the version.

Every version squeezeflow registers carries `squeezeflow.model_sha256`: the digest of
its model folder's manifest (`compression/integrity.py`). A download is accepted only
if every file matches the manifest and the manifest matches that tag, so a version
whose artifacts were changed after registration is refused (IntegrityError) instead of
being served.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from squeezeflow.compression.integrity import (
    IntegrityError,
    has_manifest,
    manifest_digest,
    manifest_of,
    verify_folder,
)
from squeezeflow.registry.pyfunc import ARTIFACT_KEY
from squeezeflow.registry.store import connect

log = logging.getLogger(__name__)

MODEL_SHA256_TAG = "squeezeflow.model_sha256"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


def registered_version(client: MlflowClient, uri: str) -> ModelVersion | None:
    """The version a `models:/NAME@alias` or `models:/NAME/VERSION` URI names (None for
    other URIs, e.g. `runs:/`, or MLflow 3 model ids)."""
    match = _MODELS_URI.match(uri)
    if match is None:
        return None
    name, alias, version = match["name"], match["alias"], match["version"]
    if alias is not None:
        return client.get_model_version_by_alias(name, alias)
    if version is not None and version.isdigit():
        return client.get_model_version(name, version)
    if version == "latest":
        found = client.search_model_versions(f"name = '{name}'")
        return max(found, key=lambda v: int(v.version)) if found else None
    return None


def download_model(uri: str, tracking_uri: str | None = None,
                   destination: Path | None = None) -> Path:
    """The model folder of `models:/NAME@alias` (or /VERSION), downloaded and verified."""
    client = connect(tracking_uri)
    version = registered_version(client, uri)
    if destination is not None:
        destination.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(destination) if destination is not None else None
    ))
    description = yaml.safe_load((local / "MLmodel").read_text())
    artifacts = description.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if ARTIFACT_KEY not in artifacts:
        raise FileNotFoundError(f"{uri} holds no squeezeflow model folder")
    folder = local / artifacts[ARTIFACT_KEY]["path"]
    expected = version.tags.get(MODEL_SHA256_TAG) if version is not None else None
    verify_download(folder, expected, uri)
    return folder


def verify_download(folder: Path, expected: str | None, uri: str) -> str:
    """Check `folder` against its manifest and the version's digest tag; the digest."""
    if has_manifest(folder):
        return verify_folder(folder, expected)
    digest = manifest_digest(manifest_of(folder))  # a plain folder: its computed manifest
    if expected is not None and digest != expected:
        raise IntegrityError(folder, "*", f"{uri}: content digest {digest[:12]} differs from the "
                                          f"version's {MODEL_SHA256_TAG} {expected[:12]}")
    if expected is None:
        log.warning("%s carries no %s tag: its content could not be checked", uri, MODEL_SHA256_TAG)
    return digest

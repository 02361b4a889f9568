"""Registered base models: register a plain model folder, find new versions, remember
which base version a target model was last built from."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from squeezeflow.compression.integrity import (
    has_manifest,
    manifest_digest,
    manifest_of,
    verify_folder,
)
from squeezeflow.registry.fetch import MODEL_SHA256_TAG
from squeezeflow.registry.pyfunc import log_pyfunc_model
from squeezeflow.registry.store import connect


def register_folder(folder: Path, model_name: str, tracking_uri: str | None = None,
                    pip_requirements: list[str] | None = None) -> str:
    """Register a model folder (HF or squeezeflow) as a new version; returns the version."""
    from squeezeflow.registry.runs import requirements

    client = connect(tracking_uri)
    from squeezeflow.registry.store import experiment_id

    run = client.create_run(experiment_id(client, "squeezeflow-bases"),
                            tags={"mlflow.runName": f"base {model_name}"})
    model_uri = log_pyfunc_model(run.info.run_id, str(folder), pip_requirements or requirements())
    # the content digest a download is checked against (the folder's manifest digest)
    digest = verify_folder(folder) if has_manifest(folder) else manifest_digest(manifest_of(folder))
    version = mlflow.register_model(model_uri, model_name, tags={MODEL_SHA256_TAG: digest})
    return str(version.version)


def latest_version(model_name: str, tracking_uri: str | None = None) -> str | None:
    client = connect(tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    return max((str(v.version) for v in versions), key=int, default=None)


def _tag(base_model_name: str) -> str:
    return f"squeezeflow.built_from.{base_model_name}"


def last_built_base_version(target_model_name: str, base_model_name: str,
                            tracking_uri: str | None = None) -> str | None:
    client = connect(tracking_uri)
    try:
        model = client.get_registered_model(target_model_name)
    except MlflowException:
        return None
    value = model.tags.get(_tag(base_model_name))
    return str(value) if value is not None else None


def remember_built_base_version(target_model_name: str, base_model_name: str, version: str,
                                tracking_uri: str | None = None) -> None:
    connect(tracking_uri).set_registered_model_tag(target_model_name, _tag(base_model_name),
                                                   version)


def hub_commit_tags(source: str, revision: str | None) -> dict[str, str]:
    """Lineage of a base model read from the hub: the commit the run downloaded.

    `revision` is the one `ModelSpec.pinned()` resolved when the run started, so the
    tag names exactly the weights that were hashed and compressed. Keys are unprefixed,
    like the other lineage keys (`lineage_tags` adds `squeezeflow.`); no tag for
    sources that are not hub ids (folders, the bundled default, registered versions).
    """
    from squeezeflow.compression.models import source_kind

    if revision is None or source_kind(source) != "hub":
        return {}
    return {"base_hub_id": source, "base_hub_commit": revision}

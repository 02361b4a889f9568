"""The export task: the candidate written in another runtime's layout (a reference out)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from squeezeflow.compression.exports import ExportRecord, export_model
from squeezeflow.compression.integrity import folder_lock
from squeezeflow.tasks.refs import CheckpointRef, workspace


@task(name="export", cache_policy=NONE)
def export_candidate(candidate: CheckpointRef, format: str) -> ExportRecord:  # noqa: A002
    """Export `candidate` to `format` under the workspace, named by its content hash.

    Two runs exporting the same candidate to the same format write one folder, one after
    the other (a lock), the second replacing the first with the same content.
    """
    out = workspace() / "exports" / f"{candidate.sha256[:16]}-{format}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(workspace() / "locks" / f"export-{out.name}.lock", what=f"the {format} export"):
        return export_model(Path(candidate.path), format, out)

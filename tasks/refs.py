"""References that tasks pass instead of models: paths plus content hashes."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from pydantic import BaseModel

import squeezeflow


class CheckpointRef(BaseModel):
    path: str
    sha256: str
    kind: str  # "encoder" or "causal-lm"


class DataRef(BaseModel):
    path: str  # a JSON list of the selected texts, inside the workspace
    sha256: str
    count: int


def workspace() -> Path:
    """Where checkpoints and materialized data live: $SQUEEZEFLOW_HOME or ./.squeezeflow."""
    root = Path(os.environ.get("SQUEEZEFLOW_HOME", Path.cwd() / ".squeezeflow")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def folder_sha256(folder: Path) -> str:
    """Hash of every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here, capture_output=True, text=True, check=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return squeezeflow.__version__
    return f"{squeezeflow.__version__}+g{commit}"

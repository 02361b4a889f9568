"""References that tasks pass instead of models: paths plus content hashes."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

from pydantic import BaseModel

import squeezeflow


class CheckpointRef(BaseModel):
    path: str
    sha256: str
    kind: str  # the model family: "encoder", "causal-lm", ... (compression/families.py)


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


# The subpackages of the one import root (setup.py maps each to a repository folder;
# a test keeps the two lists equal). Their .py files are the code a stage runs.
SOURCE_PACKAGES = ("compression", "kernels", "evaluation", "registry", "tasks", "flows", "infra")


def package_roots() -> list[tuple[str, Path]]:
    """(import name, folder) of `squeezeflow` and each subpackage, as installed (an
    editable install maps them to the repository's folders, a wheel nests them)."""
    roots = [("squeezeflow", Path(squeezeflow.__file__).resolve().parent)]
    for name in SOURCE_PACKAGES:
        spec = importlib.util.find_spec(f"squeezeflow.{name}")  # locates; runs nothing
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"squeezeflow.{name} is not installed with squeezeflow")
        roots.append((f"squeezeflow.{name}", Path(next(iter(spec.submodule_search_locations)))))
    return roots


def source_sha256(roots: list[tuple[str, Path]]) -> str:
    """Hash of every .py file under `roots`: its package-relative name and its bytes, in
    sorted order (a wheel's nested subpackage is hashed once, under its own name)."""
    digest = hashlib.sha256()
    nested = {folder for _, folder in roots[1:]}
    for package, folder in roots:
        for path in sorted(folder.rglob("*.py")):
            if any(parent in nested and parent != folder for parent in path.parents):
                continue  # a subpackage inside this folder: hashed under its own root
            digest.update(f"{package}:{path.relative_to(folder).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


@functools.cache  # once per process: the source does not change under a running flow
def code_version() -> str:
    """What the cache key and the lineage tags call the code: the package version, a
    hash of the package's source files, and the torch and transformers versions.

    Uncommitted edits change it (a git commit would not), and so does an upgrade of
    the libraries whose numerics the stages depend on.
    """
    import torch  # the build's own version string: it names CPU/CUDA builds apart
    import transformers

    source = source_sha256(package_roots())[:16]  # 64 bits: enough to tell builds apart
    return (f"{squeezeflow.__version__}+src.{source} torch-{torch.__version__} "
            f"transformers-{transformers.__version__}")

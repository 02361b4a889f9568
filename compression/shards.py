"""A model folder's weights as one or several safetensors files (Hugging Face layout).

A folder holds either `model.safetensors` or shards `model-00001-of-000NN.safetensors`
and `model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map":
{tensor name: shard file}}), as `save_pretrained` writes big checkpoints. `Shards`
reads either layout tensor by tensor; `ShardWriter` writes the sharded one, one shard
at a time (the streaming executor writes one shard per block, so a block's tensors
are released as soon as they are on disk).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from squeezeflow.compression.tensorfile import DTYPES, TensorFile

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def shard_name(index: int, count: int) -> str:
    """The Hugging Face name of shard `index` (0-based) of `count`."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def weight_map(folder: Path) -> dict[str, str]:
    """{tensor name: file name} of the weights in `folder` (single file or sharded)."""
    folder = Path(folder)
    if (folder / INDEX_FILE).exists():
        mapping: dict[str, str] = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return dict(mapping)
    if (folder / SINGLE_FILE).exists():
        with TensorFile(folder / SINGLE_FILE) as stored:
            return dict.fromkeys(stored.keys(), SINGLE_FILE)
    raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}")


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / INDEX_FILE).exists()


def stored_header(path: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {dtype, shape, data_offsets}} of one safetensors file, without its data."""
    with TensorFile(path) as stored:
        return {name: stored.entry(name) for name in stored.keys()}


class Shards:
    """`with Shards(folder) as weights: weights.keys(); weights.read(name); weights.mapped(name)`.

    `read` copies a tensor into its own buffer (what a model keeps); `mapped` returns
    it memory-mapped (pages become resident only where touched: embedding rows).
    Files are opened when first needed and closed on exit.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._map = weight_map(self.folder)
        self._files: dict[str, TensorFile] = {}
        self._mapped: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, name: object) -> bool:
        return name in self._map

    def read(self, name: str) -> torch.Tensor:
        file = self._map[name]
        if file not in self._files:
            self._files[file] = TensorFile(self.folder / file)
        return self._files[file].get_tensor(name)

    def mapped(self, name: str) -> torch.Tensor:
        file = self._map[name]
        if file not in self._mapped:
            self._mapped[file] = safe_open(str(self.folder / file), framework="pt").__enter__()
        tensor: torch.Tensor = self._mapped[file].get_tensor(name)
        return tensor

    def close(self) -> None:
        for opened in self._files.values():
            opened.close()
        for handle in self._mapped.values():
            handle.__exit__(None, None, None)
        self._files.clear()
        self._mapped.clear()

    def __enter__(self) -> Shards:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class ShardWriter:
    """Writes `count` shards into `folder`, each whole or not at all (temp name + rename).

    A shard already in the folder (written before a crash) is kept and counted: the
    index lists every tensor of every shard when `finish` writes it.
    """

    def __init__(self, folder: Path, count: int) -> None:
        self.folder = Path(folder)
        self.count = count
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / shard_name(index, self.count)

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        return write_tensors(self.path(index), tensors)

    def shards(self) -> Iterator[Path]:
        return (self.path(index) for index in range(self.count))

    def finish(self) -> dict[str, str]:
        """Write the index of every shard; every shard must have been written."""
        mapping: dict[str, str] = {}
        total = 0
        for path in self.shards():
            if not path.exists():
                raise FileNotFoundError(f"{path.name} was never written")
            for name, entry in stored_header(path).items():
                if name in mapping:
                    raise ValueError(f"tensor {name} is in {mapping[name]} and {path.name}")
                mapping[name] = path.name
                begin, end = entry["data_offsets"]
                total += int(end) - int(begin)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return mapping


_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_tensors(target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` as one safetensors file, whole or not at all (temp name + rename).

    Each tensor's bytes go straight from its memory to the file: unlike
    `safetensors.torch.save_file`, which first copies every tensor into `bytes`, this
    needs no second copy of what it writes (the calibration activations a streamed
    stage keeps for resuming are hundreds of MB)."""
    ordered = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in ordered:
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be written")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    partial = target.with_name(f".{target.name}.partial")
    with open(partial, "wb") as out:
        _write_header(out, header)
        for _, tensor in ordered:
            data = tensor.detach().cpu().contiguous()
            if data.numel():
                out.write(data.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(partial, target)
    return target


def _write_header(out: Any, header: dict[str, Any]) -> None:
    """The 8-byte length and the JSON header, padded to 8 bytes as safetensors writes it."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    out.write(len(encoded).to_bytes(8, "little"))
    out.write(encoded)


MERGE_LIMIT_BYTES = 5 * 1000**3  # outputs up to this size become one file (HF's former shard size)
_ITEM_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}


def merge_shards(shards: list[Path], target: Path) -> Path:
    """Write the tensors of `shards` as one safetensors file `target`, copying their bytes
    file to file (memory: a copy buffer, whatever the size). Tensors are ordered by item
    size, largest first, so each one starts aligned to its dtype, as safetensors writes."""
    entries: list[tuple[str, Path, dict[str, Any], int]] = []  # name, shard, entry, data start
    for shard in shards:
        with TensorFile(shard) as stored:
            start = stored.data_start
            entries.extend((name, shard, stored.entry(name), start) for name in stored.keys())
    names = [entry[0] for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError("a tensor name appears in two shards")
    entries.sort(key=lambda e: (-_ITEM_BYTES.get(str(e[2]["dtype"]), 1), e[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, _, entry, _ in entries:
        begin, end = (int(x) for x in entry["data_offsets"])
        header[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                        "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    partial = target.with_name(f".{target.name}.partial")
    with open(partial, "wb") as out:
        _write_header(out, header)
        opened: dict[Path, Any] = {}
        try:
            for _, shard, entry, start in entries:
                source = opened.get(shard) or opened.setdefault(shard, open(shard, "rb"))  # noqa: SIM115
                begin, end = (int(x) for x in entry["data_offsets"])
                source.seek(start + begin)
                remaining = end - begin
                while remaining:
                    chunk = source.read(min(remaining, 64 * 2**20))
                    if not chunk:
                        raise ValueError(f"{shard}: truncated")
                    out.write(chunk)
                    remaining -= len(chunk)
        finally:
            for handle in opened.values():
                handle.close()
    os.replace(partial, target)
    return target

"""Read tensors from a safetensors file with plain reads, one tensor at a time.

`safetensors.safe_open` memory-maps the file: every tensor read leaves its pages in
the process's resident set (file-backed) for as long as any tensor of the file is
alive, so loading a packed model costs its stored bytes twice at peak (the mapped
pages and the unpacked runtime copy). Reading each tensor into its own fresh
buffer instead keeps only what the model holds. The format is simple: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import struct
import sys
from io import BufferedReader
from pathlib import Path
from types import TracebackType

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class TensorFile:
    """`with TensorFile(path) as stored: stored.keys(); stored.get_tensor(name)`."""

    def __init__(self, path: str | Path) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this reader needs a little-endian host")
        self.path = Path(path)
        self._file: BufferedReader = open(self.path, "rb")  # noqa: SIM115 (closed by close/__exit__)
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(length))
        except (struct.error, ValueError) as error:
            self._file.close()
            raise ValueError(f"{self.path}: not a safetensors file ({error})") from error
        header.pop("__metadata__", None)
        self._entries: dict[str, dict[str, object]] = header
        self._data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self._entries)

    @property
    def data_start(self) -> int:
        """Where the tensors' bytes start in the file (after the header)."""
        return self._data_start

    def entry(self, name: str) -> dict[str, object]:
        """The header entry of `name`: its dtype, shape and data offsets."""
        return dict(self._entries[name])

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_name not in DTYPES:
            raise ValueError(f"{self.path}: {name} has dtype {dtype_name}, which this reader lacks")
        assert isinstance(shape, list) and isinstance(offsets, list)
        begin, end = int(offsets[0]), int(offsets[1])
        tensor = torch.empty([int(size) for size in shape], dtype=DTYPES[str(dtype_name)])
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != end - begin:
            raise ValueError(f"{self.path}: {name} holds {end - begin} bytes for {nbytes} expected")
        if nbytes:
            buffer = tensor.reshape(-1).view(torch.uint8).numpy().data  # writable, shares memory
            self._file.seek(self._data_start + begin)
            if self._file.readinto(buffer) != nbytes:
                raise ValueError(f"{self.path}: {name} is truncated")
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

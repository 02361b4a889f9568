"""Our plain-read safetensors reader returns exactly what safetensors wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from squeezeflow.compression.tensorfile import DTYPES, TensorFile


def test_every_dtype_and_shape_reads_back_exactly(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for index, dtype in enumerate(DTYPES.values()):
        values = torch.randn(3, 5, 7, generator=generator) * 100
        tensors[f"t{index}"] = values.to(dtype) if dtype != torch.bool else values > 0
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["row"] = torch.arange(11, dtype=torch.int64)
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    with TensorFile(tmp_path / "w.safetensors") as stored:
        assert sorted(stored.keys()) == sorted(tensors)
        for name, expected in tensors.items():
            got = stored.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got, expected), name
            got.add_(1) if got.dtype != torch.bool else got.logical_not_()  # writable, own memory
        assert torch.equal(stored.get_tensor("row"), tensors["row"])


def test_a_file_that_is_not_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="not a safetensors file"):
        TensorFile(tmp_path / "bad.safetensors")

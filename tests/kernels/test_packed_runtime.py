"""The packed runtime end to end: quantize, save packed, reload onto packed kernels."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import squeezeflow
from squeezeflow.compression.artifact import WEIGHTS_FILE, load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.packed import to_packed_runtime
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.kernels import QuantLinear
from squeezeflow.testing import tiny_bert, tiny_llama

SENTENCES = ["The robot repaired the garden fence.", "Yesterday the engineer cooked dinner."]


def _quantize(model: nn.Module, steps: list[dict[str, object]], batch: dict[str, torch.Tensor]) -> None:
    run_stage_steps(model, [CATALOG.build(CATALOG.parse(raw)) for raw in steps], [batch])


def _batch(tokenizer: object) -> dict[str, torch.Tensor]:
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # type: ignore[operator]
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _formats(model: nn.Module) -> set[str]:
    return {m.format for m in model.modules() if isinstance(m, QuantLinear)}


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


def test_int4_g128_is_small_on_disk_and_reloads_onto_packed_kernels(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=128, intermediate=256, layers=2)
    batch = _batch(tokenizer)
    linear_fp32 = {n: m.weight.numel() * 4 for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and "lm_head" not in n}
    _quantize(model, [{"kind": "rtn", "bits": 4, "group_size": 128}], batch)
    with torch.no_grad():
        dense_logits = model(**batch).logits
        in_memory = copy.deepcopy(model)
        assert _formats(in_memory) == set() and set(to_packed_runtime(in_memory).values()) == {"int4"}
        packed_logits = in_memory(**batch).logits
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "int4")

    # 4-bit codes + fp16 scales + 4-bit zeros per 128 columns: 1/8 + 3/512 = 0.131 of fp32
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as stored:
        stored_bytes = sum(
            stored.get_tensor(f"{name}.{suffix}").nbytes
            for name in linear_fp32 for suffix in ("qweight", "scales", "qzeros")
        )
    assert stored_bytes <= 0.15 * sum(linear_fp32.values())

    with torch.no_grad():
        dense = load_compressed(folder)  # what further compression stages get
        torch.testing.assert_close(dense.model(**batch).logits, dense_logits, rtol=0, atol=0)
        packed = squeezeflow.load_compressed(folder)  # what users get: packed by default
        assert _formats(packed.model) == {"int4"}
        assert not any(isinstance(m, nn.Linear) for n, m in packed.model.named_modules()
                       if n in linear_fp32)
        torch.testing.assert_close(packed.model(**batch).logits, packed_logits, rtol=0, atol=0)
        # bf16 activations on the int4 kernel vs fp32 dequantized weights
        assert _relative_error(packed.model(**batch).logits, dense_logits) < 0.02


def test_int8_per_channel_reloads_onto_int8_kernel(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=64, intermediate=128)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    _quantize(model, [{"kind": "rtn", "bits": 8}], batch)
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "int8")
    with torch.no_grad():
        packed = squeezeflow.load_compressed(folder)
        assert _formats(packed.model) == {"int8"}
        assert _relative_error(packed.model(**batch).logits, expected) < 0.02


def test_rejected_shapes_run_the_dequantize_fallback(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=64, intermediate=128)
    batch = _batch(tokenizer)
    _quantize(model, [{"kind": "rtn", "bits": 3, "group_size": 16}], batch)  # no int4 op group
    with torch.no_grad():
        expected = model(**batch).logits
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "g16")
    with torch.no_grad():
        packed = squeezeflow.load_compressed(folder)
        assert _formats(packed.model) == {"dequant"}
        # the measured choice: dequantized fp32 or bf16 GEMM, within the contract
        assert _relative_error(packed.model(**batch).logits, expected) < 0.02
        for layer in packed.model.modules():
            if isinstance(layer, QuantLinear):
                layer.force_kernel("dequant_fp32")
        torch.testing.assert_close(packed.model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_smoothquant_w8a8_encoder_round_trip(tmp_path: Path) -> None:
    from transformers import BertModel

    small, tokenizer = tiny_bert(hidden=64, intermediate=128)
    # with its pooler, as AutoModel builds BERT from a config when loading
    model = BertModel(small.config).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    _quantize(model, [{"kind": "smoothquant"}, {"kind": "w8a8"}], batch)
    with torch.no_grad():
        in_memory = copy.deepcopy(model)
        to_packed_runtime(in_memory)
        packed_in_memory = in_memory(**batch).last_hidden_state
    folder = save_compressed(model, tokenizer, "encoder", tmp_path / "w8a8")
    with torch.no_grad():
        packed = squeezeflow.load_compressed(folder)
        assert _formats(packed.model) == {"w8a8"}
        assert all(m.inv_input_scale is not None
                   for m in packed.model.modules() if isinstance(m, QuantLinear))
        hidden = packed.model(**batch).last_hidden_state
    torch.testing.assert_close(hidden, packed_in_memory, rtol=0, atol=0)
    assert 0 < _relative_error(hidden, expected) < 0.01


@pytest.mark.slow
def test_load_compressed_from_the_registry(workdir: Path) -> None:
    import mlflow

    from squeezeflow.registry.pyfunc import ARTIFACT_KEY, CompressedModel

    model, tokenizer = tiny_llama(hidden=64, intermediate=128)
    batch = _batch(tokenizer)
    _quantize(model, [{"kind": "rtn", "bits": 4, "group_size": 32}], batch)
    folder = save_compressed(model, tokenizer, "causal-lm", workdir / "q")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=CompressedModel(),
            artifacts={ARTIFACT_KEY: str(folder)}, pip_requirements=["torch"],
        )
    version = mlflow.register_model(info.model_uri, "tiny-int4")
    mlflow.MlflowClient().set_registered_model_alias("tiny-int4", "champion", version.version)
    with torch.no_grad():
        loaded = squeezeflow.load_compressed("models:/tiny-int4@champion")
        local = squeezeflow.load_compressed(folder)
        assert _formats(loaded.model) == {"int4"}
        torch.testing.assert_close(loaded.model(**batch).logits, local.model(**batch).logits,
                                   rtol=0, atol=0)


def test_squeeze_kernels_prints_each_decision(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from squeezeflow.cli import app

    model, tokenizer = tiny_llama(hidden=64, intermediate=128)
    _quantize(model, [{"kind": "rtn", "bits": 4, "group_size": 32}], _batch(tokenizer))
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "int4")
    result = CliRunner().invoke(app, ["kernels", str(folder), "--batch", "1", "--batch", "4",
                                      "--tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = report["kernels"]
    # 8 tokens x batch 1 and x batch 4: rows buckets 16 and 64, for both block shapes
    assert {(row["rows"], row["shape"]) for row in rows} >= {
        (16, "64x64"), (64, "64x64"), (16, "128x64"), (16, "64x128")}
    assert all(row["format"] == "int4" for row in rows)
    # 2 blocks x (q, k, v, o) = 8 layers of 64x64 per bucket decided as one
    assert sum(row["layers"] for row in rows if row["shape"] == "64x64" and row["rows"] == 16) == 8
    assert all(row["kernel"] in row["ms"] or not row["ms"] for row in rows)
    table = CliRunner().invoke(app, ["kernels", str(folder), "--tokens", "8"])
    assert table.exit_code == 0 and "int4" in table.output


def test_nf4_reloads_onto_the_packed_codebook_runtime(tmp_path: Path) -> None:
    from squeezeflow.kernels import CodebookLinear

    model, tokenizer = tiny_llama(hidden=128, intermediate=256, layers=2)
    batch = _batch(tokenizer)
    _quantize(model, [{"kind": "float4", "format": "nf4"}], batch)
    with torch.no_grad():
        dense_logits = model(**batch).logits
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "nf4")
    with torch.no_grad():
        packed = squeezeflow.load_compressed(folder)
        layers = [m for m in packed.model.modules() if isinstance(m, CodebookLinear)]
        assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block
        assert _relative_error(packed.model(**batch).logits, dense_logits) < 0.02
    # codes two per byte + fp16 scales per 64 inputs + the codebook: ~0.13 of fp32
    for layer in layers:
        assert layer.resident_bytes() <= 0.2 * 4 * layer.in_features * layer.out_features

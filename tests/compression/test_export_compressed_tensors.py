"""compressed-tensors export: the checkpoint transformers (+ compressed-tensors) loads on
CPU gives our logits; the packed codes are ours bit for bit, laid out as compressed-
tensors' own compressor lays them out; 2:4 sparse + int4 models reload 2:4 sparse; what
the format cannot hold is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.exports import export_model
from squeezeflow.compression.exports.compressed_tensors import NotExportableError, export
from squeezeflow.compression.pruning.sparsity import is_valid_nm
from squeezeflow.compression.quantization.qweight import QUANTIZED_ATTR
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.kernels import QuantLinear
from squeezeflow.testing import tiny_llama, train_causal_lm

pytest.importorskip("compressed_tensors")

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_STEPS = 20  # enough for peaked, non-uniform logits (argmax agreement means something)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (2 blocks: 14 block Linears + lm_head) trained for a few seconds."""
    from squeezeflow.testing import save_model

    model, tokenizer = tiny_llama(hidden=64, layers=2, intermediate=128)
    train_causal_lm(model, tokenizer, steps=TRAIN_STEPS)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("ct") / "base")


def _calibration(tokenizer) -> list[dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    return list(tokenized_batches(sampledata.sentences(32, seed=11), tokenizer,
                                  batch_size=16, max_length=64))


def _compressed(base: Path, folder: Path, *stages: dict[str, object]) -> tuple[Path, dict]:
    """`base` compressed by `stages` (one step each), saved with save_compressed."""
    loaded = load_compressed(base)
    calibration = _calibration(loaded.tokenizer)
    for stage in stages:
        run_stage_steps(loaded.model, [CATALOG.build(CATALOG.parse(stage))], calibration)
    return save_compressed(loaded.model, loaded.tokenizer, "causal-lm", folder), calibration[0]


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits  # (batch, tokens, vocab)


def _real(batch: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    return logits[batch["attention_mask"].bool()]  # (real tokens, vocab): padding left out


def test_gptq_int4_g32_export_loads_in_transformers_with_our_logits(trained: Path, tmp_path: Path) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoModelForCausalLM

    source, batch = _compressed(trained, tmp_path / "gptq",
                                {"kind": "gptq", "bits": 4, "group_size": 32, "symmetric": True})
    record = export_model(source, "compressed-tensors", tmp_path / "ct")
    out = record.folder
    assert record.figures["quantized_layers"] == 2 * len(BLOCK_LINEARS)
    assert record.figures["dense_linears"] == 1  # lm_head
    # compressed-tensors' own decompression gives our weights exactly (fp32 scales)
    assert record.figures["max_abs_diff"] == 0.0

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "group_size", "strategy", "symmetric", "type")} \
        == {"num_bits": 4, "group_size": 32, "strategy": "group", "symmetric": True, "type": "int"}
    assert (out / "tokenizer.json").is_file()

    # the stored codes are ours, signed: code - 8, packed 8 per int32 word
    ours = load_compressed(source)
    with safe_open(str(out / "model.safetensors"), framework="pt") as stored:
        keys = set(stored.keys())
        for name, module in ours.model.named_modules():
            if not name.endswith(BLOCK_LINEARS):
                continue
            q = getattr(module, QUANTIZED_ATTR)
            rows, columns = q.shape
            packed = stored.get_tensor(f"{name}.weight_packed")
            assert packed.dtype == torch.int32 and packed.shape == (rows, columns * 4 // 32)
            codes = unpack_from_int32(packed, 4, torch.Size([rows, columns]))
            assert torch.equal(codes.to(torch.int16) + 8, q.codes.to(torch.int16)), name
            assert torch.equal(stored.get_tensor(f"{name}.weight_scale"), q.scale), name
            assert stored.get_tensor(f"{name}.weight_shape").tolist() == [rows, columns]
            assert f"{name}.weight" not in keys and f"{name}.weight_zero_point" not in keys

    # transformers + compressed-tensors, default load (compressed, decompressed on first use)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = _real(batch, _logits(reloaded, batch))
    dense = _real(batch, _logits(ours.model, batch))
    # Same fp32 weights, same modules: only summation order could differ.
    assert float((theirs - dense).abs().max()) <= 1e-4
    assert torch.equal(theirs.argmax(-1), dense.argmax(-1))
    # Our packed runtime, with each kernel it can choose on this CPU forced in turn (no
    # timing): each kernel is within QuantLinear.tolerance (relative) of the dequantized
    # product, so the logits are held to that, scaled to their size; near-ties may flip
    # an argmax within it, never more than 2% of the tokens.
    packed = load_compressed(source, runtime="packed").model
    quantized = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * len(BLOCK_LINEARS)
    for kernel in quantized[0].all_kernels():
        for module in quantized:
            module.force_kernel(kernel.name)
        packed_logits = _real(batch, _logits(packed, batch))
        error = float((theirs - packed_logits).abs().max())
        assert error <= QuantLinear.tolerance * float(dense.abs().max()), kernel.name
        agreement = float((theirs.argmax(-1) == packed_logits.argmax(-1)).float().mean())
        assert agreement >= 0.98, kernel.name

# transformers warns that the checkpoint's own quantization_config wins; only its
# loading attribute (dequantize) is taken from ours, which is what is meant here.
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_asymmetric_grids_pack_as_compressed_tensors_compresses_them(
    trained: Path, tmp_path: Path, bits: int, group_size: int | None,
) -> None:
    """Asymmetric int8 per channel / int4 g32: our tensors equal those compressed-tensors'
    own compressor writes from the same scale and zero point, and they reload with our logits.

    transformers 5.24 + compressed-tensors 0.20.1 load asymmetric pack-quantized
    checkpoints only with `dequantize=True`: the default path builds the empty model on
    the meta device, where `PackedQuantizationCompressor.compress` leaves the zero point
    unpacked, (out, groups), while every checkpoint holds it packed (ceil(out*bits/32),
    groups), so loading stops at a size mismatch (llm-compressor issue #1618)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    source, batch = _compressed(trained, tmp_path / "rtn",
                                {"kind": "rtn", "bits": bits, "group_size": group_size,
                                 "symmetric": False})
    figures = export(source, tmp_path / "ct")
    assert figures["max_abs_diff"] == 0.0 and figures["bits"] == bits
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["symmetric"] is False
    assert group["weights"]["strategy"] == ("channel" if group_size is None else "group")

    ours = load_compressed(source)
    name = "model.layers.1.mlp.down_proj"
    q = getattr(ours.model.get_submodule(name), QUANTIZED_ATTR)
    assert bool((q.zero != 2 ** (bits - 1)).any())  # really asymmetric zero points
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, symmetric=False, strategy=group["weights"]["strategy"], group_size=group_size))
    theirs = PackedQuantizationCompressor.compress({
        "weight": q.dequantize(torch.float32),
        "weight_scale": q.scale,
        "weight_zero_point": (q.zero.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8),
    }, scheme)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as stored:
        for suffix in ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape"):
            assert torch.equal(stored.get_tensor(f"{name}.{suffix}"), theirs[suffix]), suffix

    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    expected = _logits(ours.model, batch)
    assert float((_logits(reloaded, batch) - expected).abs().max()) <= 1e-4


@pytest.mark.parametrize("stages", [
    ({"kind": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 32},),
    ({"kind": "wanda", "pattern": "2:4"}, {"kind": "rtn", "bits": 4, "group_size": 32}),
], ids=["sparsegpt-joint", "wanda-then-rtn"])
def test_2_4_sparse_int4_model_reloads_2_4_sparse(
    trained: Path, tmp_path: Path, stages: tuple[dict[str, object], ...],
) -> None:
    from transformers import AutoModelForCausalLM

    source, batch = _compressed(trained, tmp_path / "sparse", *stages)
    figures = export(source, tmp_path / "ct")
    assert figures["sparse_24_layers"] == 2 * len(BLOCK_LINEARS)
    assert figures["sparsity_24"] >= 0.5
    sparsity = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"][
        "sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["format"] == "dense"
    assert len(sparsity["targets"]) == 2 * len(BLOCK_LINEARS)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    expected = _logits(load_compressed(source).model, batch)
    assert float((_logits(reloaded, batch) - expected).abs().max()) <= 1e-4  # decompresses on use
    checked = 0
    for name, module in reloaded.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(BLOCK_LINEARS):
            W = module.weight.detach()
            assert is_valid_nm(W, 2, 4), name
            assert float((W == 0).float().mean()) >= 0.5, name
            checked += 1
    assert checked == 2 * len(BLOCK_LINEARS)


def test_what_the_format_cannot_hold_is_refused_with_the_reason(trained: Path, tmp_path: Path) -> None:
    act_order, _ = _compressed(trained, tmp_path / "act-order",
                               {"kind": "gptq", "bits": 4, "group_size": 32, "act_order": True})
    with pytest.raises(NotExportableError, match="act_order"):
        export(act_order, tmp_path / "ct-act-order")
    assert not (tmp_path / "ct-act-order").exists()  # nothing half-written
    pruned_only, _ = _compressed(trained, tmp_path / "pruned", {"kind": "magnitude", "sparsity": 0.5})
    with pytest.raises(NotExportableError, match="no integer-quantized"):
        export(pruned_only, tmp_path / "ct-pruned")

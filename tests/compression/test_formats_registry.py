"""The weight-format registry, one contract test over every registered format, and
save/load through the formats (round trips, unknown formats, shared quantized weights)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import BertModel

from squeezeflow.compression.artifact import (
    FORMAT_FILE,
    WEIGHTS_FILE,
    load_compressed,
    save_compressed,
)
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.formats import (
    FORMATS,
    FormatRegistry,
    IntegerFormat,
    Take,
    UnknownFormatError,
    WeightFormat,
    register_format,
    stored_linears,
)
from squeezeflow.compression.moe.qmoe.math import round_ternary
from squeezeflow.compression.moe.qmoe.weight import TernaryWeight, row_levels
from squeezeflow.compression.quantization.bitstack.math import decompose
from squeezeflow.compression.quantization.bitstack.stored import BitStackWeight
from squeezeflow.compression.quantization.codebook import quantize_to_codebook
from squeezeflow.compression.quantization.float4.math import nf4_codebook
from squeezeflow.compression.quantization.qweight import (
    QuantizedWeight,
    attach,
    group_index,
)
from squeezeflow.compression.quantization.rtn.math import quantize_rtn
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.sharing.blocks.math import linear_names, tie_linears
from squeezeflow.compression.sharing.rps.linear import RPSWeight
from squeezeflow.kernels import QuantLinear
from squeezeflow.testing import tiny_bert, tiny_llama

ROWS, COLUMNS = 48, 64  # small, and a multiple of every kernel's packing unit


def _gaussian(rows: int = ROWS, columns: int = COLUMNS, seed: int = 0) -> Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def _act_order_int3() -> QuantizedWeight:
    """3-bit codes (they straddle bytes) with columns reordered: g_idx is stored too."""
    generator = torch.Generator().manual_seed(1)
    groups = COLUMNS // 16
    g_idx = group_index(COLUMNS, 16)[torch.randperm(COLUMNS, generator=generator)]  # (in,)
    return QuantizedWeight(
        codes=torch.randint(0, 8, (ROWS, COLUMNS), generator=generator, dtype=torch.uint8),
        scale=(torch.rand(ROWS, groups, generator=generator) / 10 + 0.01).half().float(),
        zero=torch.randint(0, 8, (ROWS, groups), generator=generator, dtype=torch.uint8),
        g_idx=g_idx, bits=3, group_size=16, symmetric=False,
    )


def _smoothed_w8a8() -> QuantizedWeight:
    quantized = quantize_rtn(_gaussian(seed=2), 8, None, symmetric=True)
    input_scale = torch.rand(COLUMNS, generator=torch.Generator().manual_seed(3)) + 0.5
    return dataclasses.replace(quantized, activation_bits=8, input_scale=input_scale)


def _bitstack() -> BitStackWeight:
    """Three residual blocks of rank 2, placed at positions 0, 4, 9 of a model-wide order."""
    parts = decompose(_gaussian(seed=5), niter=3, rank=2)
    return BitStackWeight(signs=parts.signs, U=parts.U, V=parts.V, scale=torch.ones(COLUMNS),
                          order=torch.tensor([0, 4, 9]), niter=3)


def _ternary() -> TernaryWeight:
    """Ternary codes on each row's {min, 0, max}, dictionary-coded."""
    W = _gaussian(seed=6)
    levels = row_levels(W)
    return TernaryWeight.from_codes({"weight": round_ternary(W, levels.values())}, {"weight": levels})


# Stored values each registered format must round-trip; a new format adds its own here.
EXAMPLES: dict[str, list[Callable[[], Any]]] = {
    "quantized": [
        lambda: quantize_rtn(_gaussian(), 4, 32, symmetric=False),
        _act_order_int3,
        _smoothed_w8a8,
    ],
    "codebook": [lambda: quantize_to_codebook(_gaussian(), nf4_codebook(), 32, "nf4")],
    "bitstack": [_bitstack],
    "qmoe": [_ternary],
    # one layer's view of a shared array z: its slots and signs regenerated from the seed
    "rps": [lambda: RPSWeight(z=torch.randn(1024, generator=torch.Generator().manual_seed(5)),
                              scale=torch.tensor([0.5]), shape=(ROWS, COLUMNS), offset=700, seed=4,
                              chunk_size=32)],
}

# The step that makes each format on a tiny model, for the save/load round trip.
STEPS: dict[str, dict[str, object]] = {
    "quantized": {"kind": "rtn", "bits": 4, "group_size": 32},
    "codebook": {"kind": "float4", "format": "nf4", "block_size": 32},
    "bitstack": {"kind": "bitstack", "niter": 3, "rank": 1, "importance": "output_error"},
    "qmoe": {"kind": "qmoe", "targets": ["*"]},
    "rps": {"kind": "rps", "ratio": 0.5},
}


def _same_stored(a: Any, b: Any) -> None:
    """Field by field: tensors bit-identical (value and dtype), everything else equal."""
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        left, right = getattr(a, field.name), getattr(b, field.name)
        if isinstance(left, Tensor):
            assert isinstance(right, Tensor), field.name
            assert left.dtype == right.dtype and torch.equal(left, right), field.name
        else:
            assert left == right, field.name


def _taker(tensors: dict[str, Tensor], name: str) -> Take:
    def take(suffix: str) -> Tensor | None:
        return tensors.pop(f"{name}.{suffix}", None)
    return take


def _relative_error(y: Tensor, reference: Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


# --- registry ----------------------------------------------------------------------------


def test_unknown_format_names_the_known_formats() -> None:
    with pytest.raises(UnknownFormatError,
                       match=rf"unknown weight format 'nf5'; known formats: {', '.join(FORMATS.names())}$"):
        FORMATS.get("nf5")


def test_duplicate_format_name_or_attribute_is_an_error() -> None:
    registry = FormatRegistry()
    registry.add(IntegerFormat())
    with pytest.raises(ValueError, match=r"'quantized' is already registered by IntegerFormat; known formats: quantized"):
        registry.add(IntegerFormat())

    class Renamed(IntegerFormat):
        name = "renamed"

    with pytest.raises(ValueError, match="attribute 'squeezeflow_qweight' is already used by 'quantized'"):
        registry.add(Renamed())


def test_every_registered_format_has_contract_examples() -> None:
    assert sorted(EXAMPLES) == FORMATS.names(), "add examples for each new format to EXAMPLES"
    assert sorted(STEPS) == FORMATS.names(), "add the step making each new format to STEPS"


# --- contract, over every registered format -------------------------------------------


@pytest.mark.parametrize("name", FORMATS.names())
def test_format_contract(name: str) -> None:
    weight_format = FORMATS.get(name)
    module_doc = __import__(type(weight_format).__module__, fromlist=["_"]).__doc__ or ""
    assert "Accuracy contract" in module_doc, f"{name}: its module docstring states its accuracy contract"
    assert weight_format.tolerance > 0
    for make in EXAMPLES[name]:
        stored = make()
        assert isinstance(stored, weight_format.stored_type)
        # spec is JSON; tensors() then read() gives the stored value back bit for bit
        spec = json.loads(json.dumps(weight_format.spec(stored)))
        tensors = weight_format.tensors("layer", stored)
        assert all(key.startswith("layer.") for key in tensors)
        read = weight_format.read("layer", spec, _taker(tensors, "layer"))
        _same_stored(read, stored)
        assert not tensors, f"{name}: read() left tensors untaken: {sorted(tensors)}"
        # the module carrying it: current() while the weight matches, None once it changes
        module = nn.Linear(COLUMNS, ROWS)
        with torch.no_grad():
            W_hat = attach(module, stored, weight_format.attr)
        assert torch.equal(W_hat, weight_format.reference(stored))
        current = weight_format.current(module)
        assert current is not None
        _same_stored(current, stored)
        # the runtime module meets the accuracy contract against the reference product
        x = torch.randn(5, COLUMNS, generator=torch.Generator().manual_seed(4))
        expected = nn.functional.linear(x, weight_format.reference(stored), module.bias)
        with torch.no_grad():
            runtime = weight_format.runtime(module, stored)
            output = runtime(x)
        assert _relative_error(output, expected) < weight_format.tolerance
        with torch.no_grad():
            module.weight[0, 0] += 1.0
        assert weight_format.current(module) is None


def test_missing_tensors_are_a_clear_error() -> None:
    weight_format = FORMATS.get("quantized")
    stored = EXAMPLES["quantized"][0]()
    tensors = weight_format.tensors("layer", stored)
    del tensors["layer.qzeros"]
    with pytest.raises(ValueError, match="packed tensors of layer are incomplete"):
        weight_format.read("layer", weight_format.spec(stored), _taker(tensors, "layer"))


# --- save / load through the formats ----------------------------------------------------


def _quantize(model: nn.Module, step: dict[str, object]) -> None:
    """Apply one step, with a little calibration data for the steps that observe inputs."""
    generator = torch.Generator().manual_seed(11)
    vocab = int(model.config.vocab_size)
    batches = [{"input_ids": torch.randint(0, vocab, (4, 16), generator=generator),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(2)]
    run_stage_steps(model, [CATALOG.build(CATALOG.parse(step))], batches)


def _logits(model: nn.Module, tokenizer: Any) -> Tensor:
    batch = tokenizer(["The robot repaired the garden fence."], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", FORMATS.names())
def test_save_and_load_preserve_the_stored_codes_exactly(name: str, tmp_path: Path) -> None:
    weight_format = FORMATS.get(name)
    model, tokenizer = tiny_llama()
    _quantize(model, STEPS[name])
    before = {s.owner: s.stored for s in stored_linears(model) if s.format is weight_format}
    assert len(before) == 14  # every block Linear of 2 Llama blocks
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / name)
    assert sorted(json.loads((folder / FORMAT_FILE).read_text())[name]) == sorted(before)
    loaded = load_compressed(folder).model
    modules = dict(loaded.named_modules())
    for layer, stored in before.items():
        current = weight_format.current(modules[layer])
        assert current is not None, layer
        _same_stored(current, stored)
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)
    # the packed runtime is built straight from the file for every format
    packed = load_compressed(folder, runtime="packed").model
    reference = _logits(model, tokenizer)
    assert _relative_error(_logits(packed, tokenizer), reference) < weight_format.tolerance


def test_unknown_format_key_in_the_description_is_a_clear_error(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama()
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "m")
    description = json.loads((folder / FORMAT_FILE).read_text())
    description["ternary"] = {"model.layers.0.mlp.up_proj": {"bits": 2}}
    (folder / FORMAT_FILE).write_text(json.dumps(description))
    with pytest.raises(UnknownFormatError,
                       match=rf"unknown weight format 'ternary' .*known formats: {', '.join(FORMATS.names())}"):
        load_compressed(folder, verify=False)  # edited after saving: the manifest would refuse it first


@dataclass(frozen=True)
class HalfWeight:
    """A toy stored format: the weight rounded to fp16."""

    values: Tensor  # (out, in) fp16

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.values.to(dtype)


class HalfLinear(nn.Module):
    def __init__(self, values: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.values.to(x.dtype), self.bias)


class HalfFormat(WeightFormat[HalfWeight]):
    """Accuracy contract: exact (the runtime multiplies by the fp16 values in fp32)."""

    name: ClassVar[str] = "half"
    attr: ClassVar[str] = "test_half"
    stored_type = HalfWeight
    tolerance: ClassVar[float] = 1e-6

    def spec(self, stored: HalfWeight) -> dict[str, Any]:
        return {"shape": list(stored.values.shape)}

    def tensors(self, name: str, stored: HalfWeight) -> dict[str, Tensor]:
        return {f"{name}.half": stored.values.contiguous()}

    def read(self, name: str, spec: dict[str, Any], take: Take) -> HalfWeight:
        values = take("half")
        if values is None:
            raise ValueError(f"packed tensors of {name} are incomplete")
        return HalfWeight(values.reshape(spec["shape"]))

    def runtime(self, module: nn.Module, stored: HalfWeight, *, fuse: bool = True) -> nn.Module:
        bias = getattr(module, "bias", None)
        return HalfLinear(stored.values, None if bias is None else bias.detach().clone())


def test_a_new_format_is_one_class_and_one_registration(tmp_path: Path) -> None:
    """Save, load and the packed runtime pick up a registered format with no other edit."""
    register_format(HalfFormat)
    try:
        model, tokenizer = tiny_llama()
        down = model.model.layers[0].mlp.down_proj
        with torch.no_grad():
            attach(down, HalfWeight(down.weight.detach().half()), HalfFormat.attr)
        folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "half")
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as stored:
            keys = set(stored.keys())
        assert "model.layers.0.mlp.down_proj.half" in keys
        assert "model.layers.0.mlp.down_proj.weight" not in keys
        loaded = load_compressed(folder).model
        torch.testing.assert_close(_logits(loaded, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)
        packed = load_compressed(folder, runtime="packed").model
        assert isinstance(packed.model.layers[0].mlp.down_proj, HalfLinear)
        torch.testing.assert_close(_logits(packed, tokenizer), _logits(model, tokenizer))
    finally:
        FORMATS.remove(HalfFormat.name)


# --- a quantized weight shared by several Linears is stored, and run, once ---------------


def _share_block(model: nn.Module, source: int, target: int) -> list[str]:
    """Tie block `target`'s Linear weights to block `source`'s (weights only)."""
    blocks = model.model.layers if hasattr(model, "model") else model.encoder.layer
    names = linear_names(blocks[source])
    for name in names:
        blocks[target].get_submodule(name).weight = blocks[source].get_submodule(name).weight
    return names


def test_shared_quantized_block_is_stored_once_and_runs_one_packed_module(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = tiny_llama(layers=2, intermediate=128)
    _quantize(model, {"kind": "rtn", "bits": 4, "group_size": 32})
    tie_linears(model.model.layers[0], model.model.layers[1])  # block 1 runs block 0's weights
    names = linear_names(model.model.layers[0])
    with caplog.at_level(logging.WARNING):
        folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "shared")
    assert not [r for r in caplog.records if "changed after quantization" in r.getMessage()]

    # the file holds one packed copy of each shared weight and no dense copy
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as stored:
        keys = set(stored.keys())
    for name in names:
        assert f"model.layers.0.{name}.qweight" in keys
        assert not {f"model.layers.1.{name}.qweight", f"model.layers.0.{name}.weight",
                    f"model.layers.1.{name}.weight"} & keys
    description = json.loads((folder / FORMAT_FILE).read_text())
    assert not any(layer.startswith("model.layers.1.") for layer in description["quantized"])
    for name in names:
        assert description["tied"][f"model.layers.1.{name}.weight"] == f"model.layers.0.{name}.weight"

    # dense reload: one Parameter again, the codes on both modules, identical logits
    dense = load_compressed(folder).model
    for name in names:
        a, b = (dense.model.layers[i].get_submodule(name) for i in (0, 1))
        assert a.weight is b.weight
        assert FORMATS.get("quantized").current(b) is not None
    torch.testing.assert_close(_logits(dense, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)

    # packed reload: both blocks run the very same packed module (one storage)
    packed = load_compressed(folder, runtime="packed").model
    for name in names:
        a, b = (packed.model.layers[i].get_submodule(name) for i in (0, 1))
        assert isinstance(a, QuantLinear) and a is b
    assert _relative_error(_logits(packed, tokenizer), _logits(dense, tokenizer)) < 0.02


def test_shared_quantized_weight_with_own_biases_shares_the_packed_buffers(tmp_path: Path) -> None:
    """BERT Linears have biases: tie only the weights, so each layer keeps its own bias."""
    _, tokenizer = tiny_bert(layers=2)
    torch.manual_seed(0)
    model = BertModel(tiny_bert(layers=2)[0].config).eval()  # with the pooler the loader builds
    _quantize(model, {"kind": "rtn", "bits": 4, "group_size": 32})
    names = _share_block(model, 0, 1)
    with torch.no_grad():  # BERT initializes biases to 0: make block 1's its own
        for name in names:
            model.encoder.layer[1].get_submodule(name).bias.normal_(0.0, 0.02)
    folder = save_compressed(model, tokenizer, "encoder", tmp_path / "shared")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as stored:
        keys = set(stored.keys())
    for name in names:
        assert f"encoder.layer.1.{name}.bias" in keys  # biases differ: stored per layer
        assert not {f"encoder.layer.1.{name}.qweight", f"encoder.layer.1.{name}.weight"} & keys

    batch = tokenizer(["The robot repaired the garden fence."], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        dense = load_compressed(folder).model
        torch.testing.assert_close(dense(**batch).last_hidden_state, expected, rtol=0, atol=0)
        packed = load_compressed(folder, runtime="packed").model
        for name in names:
            a, b = (packed.encoder.layer[i].get_submodule(name) for i in (0, 1))
            assert isinstance(a, QuantLinear) and isinstance(b, QuantLinear) and a is not b
            assert a.bias is not None and b.bias is not None and not torch.equal(a.bias, b.bias)
            shared = {n: t for n, t in a.named_buffers() if n != "bias"}
            assert shared  # the packed weight's buffers: one storage for both layers
            for buffer_name, tensor in b.named_buffers():
                if buffer_name != "bias" and tensor is not None:
                    assert tensor.data_ptr() == shared[buffer_name].data_ptr(), (name, buffer_name)
        output = packed(**batch).last_hidden_state
    assert _relative_error(output, expected) < 0.02


def test_sharing_after_quantization_in_memory_packs_one_module() -> None:
    """to_packed_runtime (no file) shares the runtime module the same way."""
    from squeezeflow.compression.packed import to_packed_runtime

    model, tokenizer = tiny_llama(layers=2)
    _quantize(model, {"kind": "rtn", "bits": 4, "group_size": 32})
    tie_linears(model.model.layers[0], model.model.layers[1])
    expected = _logits(model, tokenizer)
    formats = to_packed_runtime(model)
    assert len(formats) == 14  # 7 Linears per block; block 1 names block 0's modules
    a, b = model.model.layers[0].mlp.up_proj, model.model.layers[1].mlp.up_proj
    assert isinstance(a, QuantLinear) and a is b
    assert _relative_error(_logits(model, tokenizer), expected) < 0.02

"""Stable-RPS (`rps` step, `rps` format): exact at ratio 1, the RANDOMFOLD map's load
factor and reproducibility, stored size = ratio, save/load, gradients into the shared
z, and distillation healing z (the healed z is what is saved)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch import Tensor, nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import (
    FORMAT_FILE,
    WEIGHTS_FILE,
    load_compressed,
    save_compressed,
)
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.formats import FORMATS, stored_linears
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.sharing.rps.linear import RPSLinear, RPSWeight
from squeezeflow.compression.sharing.rps.math import Hashing, layer_map, load_factor, memory_slots
from squeezeflow.compression.step import TrainingContext
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.testing import tiny_llama

SENTENCE = ["The robot repaired the garden fence."]


def _rps(model: nn.Module, **config: object) -> dict[str, float]:
    [report] = run_stage_steps(model, [CATALOG.build(CATALOG.parse({"kind": "rps", **config}))])
    return report.metrics


def _logits(model: nn.Module, tokenizer) -> Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(**tokenizer(SENTENCE, return_tensors="pt")).logits


def _rps_layers(model: nn.Module) -> dict[str, RPSLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RPSLinear)}


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


@pytest.mark.parametrize("mapping", ["identity", "randomfold"])
def test_ratio_one_reproduces_the_model_exactly(mapping: str) -> None:
    model, tokenizer = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in _block_linears(model).items()}
    expected = _logits(model, tokenizer)
    metrics = _rps(model, ratio=1.0, mapping=mapping)
    layers = _rps_layers(model)
    assert sorted(layers) == sorted(weights)  # every block Linear; embeddings and head ignored
    assert metrics["max_weight_rel_error"] == 0.0 and metrics["max_load"] == 1.0
    for name, layer in layers.items():
        assert torch.equal(layer.weight.detach(), weights[name]), name
    assert torch.equal(_logits(model, tokenizer), expected)


def test_randomfold_loads_every_slot_evenly_keeps_chunks_and_balances_signs() -> None:
    shapes = [(48, 64), (64, 48), (96, 64), (64, 96), (30, 50)]  # 19,860 weights, one ragged
    shared = sum(o * i for o, i in shapes)
    for ratio, chunk in ((1.0, 20), (0.5, 64), (0.3, 32)):  # ratio 1: each slot read once
        slots = memory_slots(shared, ratio, chunk)
        hashing = Hashing(seed=3, slots=slots, chunk_size=chunk)
        offsets = [sum(o * i for o, i in shapes[:k]) for k in range(len(shapes))]
        maps = [layer_map(hashing, offset, shape) for offset, shape in zip(offsets, shapes, strict=True)]
        counts = load_factor(maps, slots)
        # the optimal load factor: every slot read floor(n/m) or ceil(n/m) times
        assert int(counts.min()) >= shared // slots and int(counts.max()) <= math.ceil(shared / slots)
        idx = torch.cat([i.reshape(-1) for i, _ in maps]).to(torch.int64)
        g = torch.cat([s.reshape(-1) for _, s in maps])
        # chunks of `chunk` consecutive positions read consecutive slots of z
        whole = idx[: (idx.numel() // chunk) * chunk].reshape(-1, chunk)
        assert torch.equal(whole - whole[:, :1], torch.arange(chunk).expand_as(whole))
        # ... but in a hashed order: consecutive chunks do not land next to each other
        assert float((whole[1:, 0] - whole[:-1, 0] == chunk).float().mean()) < 0.1
        assert 0.47 < float((g < 0).float().mean()) < 0.53


def test_map_regenerates_identically_in_another_process() -> None:
    hashing = Hashing(seed=11, slots=memory_slots(50_000, 0.25, 64), chunk_size=64)
    idx, g = layer_map(hashing, 12_345, (100, 300))
    here = hashlib.sha256(idx.numpy().tobytes() + g.numpy().tobytes()).hexdigest()
    code = (
        "import hashlib; from squeezeflow.compression.sharing.rps.math import Hashing, layer_map; "
        f"i, g = layer_map(Hashing(seed=11, slots={hashing.slots}, chunk_size=64), 12345, (100, 300)); "
        "print(hashlib.sha256(i.numpy().tobytes() + g.numpy().tobytes()).hexdigest())"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here
    other_seed, _ = layer_map(Hashing(seed=12, slots=hashing.slots, chunk_size=64), 12_345, (100, 300))
    assert float((other_seed != idx).float().mean()) > 0.9  # the seed is what makes the map


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_stored_size_equals_the_ratio(ratio: float, tmp_path: Path) -> None:
    model, tokenizer = tiny_llama()
    targeted = _block_linears(model)
    original = sum(m.weight.numel() * m.weight.element_size() for m in targeted.values())
    base = save_compressed(model, tokenizer, "causal-lm", tmp_path / "base")
    _rps(model, ratio=ratio, chunk_size=64)
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "rps")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as stored:
        keys = set(stored.keys())
        rps_bytes = {k: stored.get_tensor(k).numel() * stored.get_tensor(k).element_size()
                     for k in keys if k.endswith((".z", ".scale"))}
    assert len([k for k in keys if k.endswith(".z")]) == 1  # z is written once
    assert not {f"{name}.weight" for name in targeted} & keys  # no dense copy
    z_bytes = sum(b for k, b in rps_bytes.items() if k.endswith(".z"))
    scale_bytes = sum(b for k, b in rps_bytes.items() if k.endswith(".scale"))
    assert scale_bytes == 4 * len(targeted)  # one fp32 scale per layer
    # |z| = ratio x the targeted weights, rounded up to a whole chunk of 64
    assert ratio * original <= z_bytes < ratio * original + 64 * 4
    assert (z_bytes + scale_bytes) / original == pytest.approx(ratio, abs=0.005)
    # the whole file shrinks by the same amount (the JSON header grows by a few hundred bytes)
    saved = (base / WEIGHTS_FILE).stat().st_size - (folder / WEIGHTS_FILE).stat().st_size
    assert saved == pytest.approx((1 - ratio) * original, rel=0.01)
    description = json.loads((folder / FORMAT_FILE).read_text())
    assert sorted(description["rps"]) == sorted(targeted)


def test_save_and_load_reproduce_outputs_with_one_shared_z(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama()
    _rps(model, ratio=0.5, seed=5)
    layers = _rps_layers(model)
    z = next(iter(layers.values())).z
    assert all(layer.z is z for layer in layers.values())  # one Parameter, counted once
    assert sum(p.numel() for p in model.parameters() if p is z) == z.numel()
    with torch.no_grad():  # as if training moved z: the saved model is the moved one
        z.add_(0.01 * torch.randn_like(z))
    expected = _logits(model, tokenizer)
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "m")
    for runtime in ("dense", "packed"):
        loaded = load_compressed(folder, runtime=runtime).model
        reloaded = _rps_layers(loaded)
        assert sorted(reloaded) == sorted(layers)  # RPSLinear in both: z stays trainable
        first = next(iter(reloaded.values())).z
        assert isinstance(first, nn.Parameter) and all(m.z is first for m in reloaded.values())
        assert torch.equal(first.detach(), z.detach())
        assert torch.equal(_logits(loaded, tokenizer), expected), runtime
    # the stored values describe the layers exactly: the format's reference is the weight
    for linear in stored_linears(load_compressed(folder).model):
        assert linear.format is FORMATS.get("rps")
        layer = layers[linear.owner]
        assert torch.equal(FORMATS.get("rps").reference(linear.stored), layer.weight.detach())


def test_gradients_reach_the_shared_z_as_the_sum_over_its_readers() -> None:
    model, tokenizer = tiny_llama()
    _rps(model, ratio=0.25)
    layers = _rps_layers(model)
    z = next(iter(layers.values())).z
    batch = tokenizer(SENTENCE * 2, return_tensors="pt")
    labels = batch["input_ids"]

    dense = copy.deepcopy(model)  # the same function with ordinary Linear weights
    for name, layer in _rps_layers(dense).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
        linear.weight = nn.Parameter(layer.weight.detach().clone())
        parent, _, attribute = name.rpartition(".")
        setattr(dense.get_submodule(parent), attribute, linear)
    dense(**batch, labels=labels).loss.backward()
    expected = torch.zeros_like(z)
    for name, layer in layers.items():  # dL/dz_j = sum over readers of s * g * dL/dW
        grad_W = dense.get_submodule(name).weight.grad
        idx, g = layer.index_and_signs()
        expected.index_add_(0, idx.reshape(-1).long(), (layer.scale * g * grad_W).reshape(-1))

    model(**batch, labels=labels).loss.backward()
    assert z.grad is not None and float(z.grad.abs().max()) > 0
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-7)
    assert all(layer.scale.grad is not None for layer in layers.values())


def test_inference_weight_is_kept_until_z_or_the_scale_changes() -> None:
    model, _ = tiny_llama()
    _rps(model, ratio=0.5)
    layer = next(iter(_rps_layers(model).values()))
    x = torch.randn(3, layer.in_features)
    trained = layer(x)  # grad enabled, z requires grad: W computed at this call
    with torch.no_grad():
        first, again = layer(x), layer(x)  # no grad: W computed once, then kept
        assert torch.equal(first, trained.detach()) and torch.equal(again, first)
        layer.z.mul_(2.0)  # what an optimizer step does: the kept W is stale now
        assert torch.equal(layer(x), 2 * first - (layer.bias if layer.bias is not None else 0))
        layer.scale.mul_(0.5)
        assert torch.equal(layer(x), first)
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight))


def test_distillation_trains_z_heals_the_model_and_the_healed_z_is_saved(
    trained_llama_dir: Path, tmp_path: Path
) -> None:
    loaded = load_compressed(trained_llama_dir)
    student, tokenizer = loaded.model, loaded.tokenizer
    held_out = list(tokenized_batches(sampledata.sentences(48, seed=12), tokenizer, batch_size=16, max_length=32))
    base = perplexity(student, held_out)
    metrics = _rps(student, ratio=0.5)
    assert 0.2 < metrics["mean_weight_rel_error"] < 0.9  # two trained weights per slot
    shared = perplexity(student, held_out)
    assert shared > base * 1.05  # sharing half the weights costs measurable perplexity
    # a stage boundary: the next stage loads the saved model, densely, as tasks do
    folder = save_compressed(student, tokenizer, "causal-lm", tmp_path / "rps")
    student = load_compressed(folder).model
    z = next(iter(_rps_layers(student).values())).z
    before = z.detach().clone()

    distill = CATALOG.build(CATALOG.parse({"kind": "distill", "max_steps": 40, "lr": 3e-3,
                                           "warmup_steps": 5, "train": "linears"}))
    training = list(tokenized_batches(sampledata.sentences(256, seed=13), tokenizer,
                                      batch_size=16, max_length=32))
    context = TrainingContext(batches=training, folder=tmp_path / "ckpt", teacher=trained_llama_dir)
    [report] = run_stage_steps(student, [distill], training=context)
    # `train: linears` trains z (once) and the 14 scales: nothing else of the model
    assert report.metrics["trainable_parameters"] == z.numel() + 14
    assert not torch.equal(z.detach(), before)
    healed = perplexity(student, held_out)
    recovered = (shared - healed) / (shared - base)  # measured: 0.98 after 40 steps
    assert recovered > 0.8, f"base {base:.3f}, rps {shared:.3f}, healed {healed:.3f}"

    saved = save_compressed(student, tokenizer, "causal-lm", tmp_path / "healed")
    reloaded = load_compressed(saved, runtime="packed").model
    assert torch.equal(next(iter(_rps_layers(reloaded).values())).z.detach(), z.detach())
    assert perplexity(reloaded, held_out) == pytest.approx(healed, rel=1e-6)


def test_format_round_trip_and_runtime_on_a_plain_linear() -> None:
    """The format contract: spec + tensors -> read gives the value back; the runtime
    module built on a plain Linear computes the reference weight."""
    rps = FORMATS.get("rps")
    z = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    stored = RPSWeight(z=z, scale=torch.tensor([0.5]), shape=(48, 64), offset=700, seed=4, chunk_size=32)
    spec = json.loads(json.dumps(rps.spec(stored)))
    tensors = rps.tensors("layer", stored)
    read = rps.read("layer", spec, lambda suffix: tensors.pop(f"layer.{suffix}", None))
    assert not tensors and read.shape == (48, 64) and read.offset == 700 and read.seed == 4
    assert torch.equal(read.z, z) and torch.equal(read.dequantize(), stored.dequantize())
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    with torch.no_grad():
        runtime = rps.runtime(linear, stored)
        assert torch.equal(runtime(x), nn.functional.linear(x, rps.reference(stored), linear.bias))
    with pytest.raises(ValueError, match="packed tensors of layer are incomplete"):
        rps.read("layer", spec, lambda suffix: None)


def test_config_errors_name_the_field() -> None:
    for bad, field in (({"ratio": 0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"chunk_size": 0}, "chunk_size"),
                       ({"mapping": "cyclic"}, "mapping"), ({"ratoi": 0.5}, "ratoi")):
        with pytest.raises((ValidationError, ValueError), match=field):
            CATALOG.parse({"kind": "rps", **bad})
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="select no Linear"):
        _rps(model, targets=["*.nothing.*"])

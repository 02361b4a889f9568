"""Unstructured and N:M pruning (magnitude, Wanda, SparseGPT, SparseGPT + quantization):
exact sparsity counted on the saved artifact, valid N:M masks, identical reloads,
and the calibrated methods keeping a trained LM closer to its base than magnitude."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import FORMAT_FILE, load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.pruning.sparsegpt.math import sparsegpt
from squeezeflow.compression.pruning.sparsity import is_valid_nm, nm_mask
from squeezeflow.compression.quantization.qweight import QUANTIZED_ATTR
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.testing import add_outlier_features, tiny_llama

PRUNED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _calibration(tokenizer, count: int = 32, seed: int = 11) -> list[dict[str, torch.Tensor]]:
    return list(tokenized_batches(sampledata.sentences(count, seed=seed), tokenizer,
                                  batch_size=16, max_length=64))


def _run(model: nn.Module, calibration, **config: object) -> None:
    run_stage_steps(model, [CATALOG.build(CATALOG.parse(config))], calibration)


def _saved_linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every pruned Linear's weight as stored (dense tensors, or packed ones dequantized)."""
    loaded = load_compressed(folder)
    return {
        name: module.weight.detach()
        for name, module in loaded.model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(PRUNED)
    }


@pytest.mark.parametrize("kind", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"sparsity": 0.3}, {"pattern": "2:4"},
                                    {"pattern": "4:8"}])
def test_each_method_reaches_its_sparsity_on_the_saved_artifact(
    tmp_path: Path, kind: str, target: dict[str, object]
) -> None:
    model, tokenizer = tiny_llama(hidden=64, intermediate=128)
    calibration = _calibration(tokenizer)
    _run(model, calibration, kind=kind, **target)
    batch = calibration[0]
    expected = model(**batch).logits
    save_compressed(model, tokenizer, "causal-lm", tmp_path / "pruned")
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), framework="pt") as stored:
        weights = {k.removesuffix(".weight"): stored.get_tensor(k) for k in stored.keys()
                   if k.endswith(tuple(f"{p}.weight" for p in PRUNED))}
    assert len(weights) == 2 * len(PRUNED)
    for name, W in weights.items():
        if "pattern" in target:
            n, m = (int(x) for x in str(target["pattern"]).split(":"))
            assert is_valid_nm(W, n, m), name
            # exactly N kept of every M: the pattern is met with nothing extra pruned
            assert int((W == 0).sum()) == W.numel() * (m - n) // m, name
        elif kind == "wanda":  # Wanda compares weights within each output row
            rows, columns = W.shape
            assert int((W == 0).sum()) == rows * round(float(target["sparsity"]) * columns), name
        else:
            assert int((W == 0).sum()) == round(float(target["sparsity"]) * W.numel()), name
    loaded = load_compressed(tmp_path / "pruned")
    torch.testing.assert_close(loaded.model(**batch).logits, expected, rtol=0, atol=0)


def test_nm_mask_keeps_the_largest_n_of_every_m() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]


def test_sparsegpt_beats_magnitude_on_the_layer_output() -> None:
    """The OBS update must shrink the output error ||(W - W') X^T|| below magnitude's."""
    torch.manual_seed(0)
    X = torch.randn(512, 64) * torch.linspace(0.1, 3.0, 64)  # (tokens, in), uneven inputs
    W = torch.randn(32, 64)  # (out, in)
    H = 2 * X.T @ X / X.shape[0]
    pruned = sparsegpt(W, H, sparsity=0.5).W
    layer = nn.Linear(64, 32, bias=False)
    layer.weight.data.copy_(W)
    CATALOG.build(CATALOG.parse({"kind": "magnitude", "sparsity": 0.5})).apply({"layer": layer})
    error_sparsegpt = float(((W - pruned) @ X.T).norm())
    error_magnitude = float(((W - layer.weight.detach()) @ X.T).norm())
    assert int((pruned == 0).sum()) == W.numel() // 2
    assert error_sparsegpt < 0.7 * error_magnitude


def test_sparsegpt_with_bits_packs_a_sparse_quantized_artifact(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=64, intermediate=128)
    calibration = _calibration(tokenizer)
    _run(model, calibration, kind="sparsegpt", pattern="2:4", bits=4, group_size=32)
    batch = calibration[0]
    expected = model(**batch).logits
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "joint")
    import json

    packed = json.loads((folder / FORMAT_FILE).read_text())["quantized"]
    assert len(packed) == 2 * len(PRUNED) and all(s["bits"] == 4 for s in packed.values())
    loaded = load_compressed(folder)
    for name, module in loaded.model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(PRUNED):
            quantized = getattr(module, QUANTIZED_ATTR)
            assert quantized.bits == 4
            assert is_valid_nm(module.weight.detach(), 2, 4), name
            assert float((module.weight == 0).float().mean()) >= 0.5
            assert len(torch.unique(module.weight[:, :32])) <= 16 * module.weight.shape[0]
    torch.testing.assert_close(loaded.model(**batch).logits, expected, rtol=0, atol=0)


def test_wanda_and_sparsegpt_keep_perplexity_closer_to_base_than_magnitude(
    trained_llama_dir: Path,
) -> None:
    # A few large input features, as trained LLMs have (see add_outlier_features); the
    # rescaling leaves the model's function unchanged, which the first assertion checks.
    base = load_compressed(trained_llama_dir)
    model = base.model
    add_outlier_features(model)
    calibration = _calibration(base.tokenizer, 64, seed=11)
    evaluation = _calibration(base.tokenizer, 64, seed=12)
    base_ppl = perplexity(model, evaluation)
    assert base_ppl == pytest.approx(perplexity(load_compressed(trained_llama_dir).model, evaluation),
                                     rel=1e-4)  # the rescaling changed nothing
    ppl = {}
    for kind in ("magnitude", "wanda", "sparsegpt"):
        pruned = copy.deepcopy(model)
        _run(pruned, calibration, kind=kind, sparsity=0.5)
        ppl[kind] = perplexity(pruned, evaluation)
    gap = {kind: value - base_ppl for kind, value in ppl.items()}
    assert gap["magnitude"] > 0
    assert gap["wanda"] < 0.8 * gap["magnitude"], ppl
    assert gap["sparsegpt"] < 0.8 * gap["magnitude"], ppl


def test_wanda_ignores_how_a_feature_is_scaled_between_norm_and_weight(trained_llama_dir: Path) -> None:
    """|W_ij| * ||X_j|| does not change when X_j is scaled up and W_:j down: same mask."""
    plain = load_compressed(trained_llama_dir).model
    rescaled = copy.deepcopy(plain)
    add_outlier_features(rescaled)
    tokenizer = load_compressed(trained_llama_dir).tokenizer
    calibration = _calibration(tokenizer)
    for model in (plain, rescaled):
        _run(model, calibration, kind="wanda", sparsity=0.5)
    for (name, a), (_, b) in zip(plain.named_modules(), rescaled.named_modules(), strict=True):
        if isinstance(a, nn.Linear) and name.endswith(PRUNED):
            assert torch.equal(a.weight == 0, b.weight == 0), name

"""SmoothQuant: exact folding where valid, runtime factors elsewhere, and better W8A8."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.packed import to_packed_runtime
from squeezeflow.compression.quantization.smoothquant.math import smoothing_scales
from squeezeflow.compression.quantization.smoothquant.step import SMOOTHING_ATTR
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.kernels import QuantLinear, ops
from squeezeflow.testing import tiny_bert, tiny_llama

OUTLIERS = [3, 17, 42]  # hidden channels made ~40x larger than the rest
SENTENCES = [
    "The robot repaired the garden fence.",
    "Yesterday the engineer cooked dinner in the kitchen.",
    "A teacher painted the old bridge near the river.",
]


def _with_outlier_channels(model: nn.Module, factor: float = 40.0) -> nn.Module:
    """Make a few hidden channels huge at every norm output, without changing the model:
    the norm scales them up and the Linears reading it scale their columns down. This is
    the activation pattern (a few outlier channels) that SmoothQuant addresses."""
    channels = torch.tensor(OUTLIERS)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in (
                (layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                         layer.self_attn.v_proj]),
                (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
            ):
                norm.weight[channels] *= factor
                for linear in readers:
                    linear.weight[:, channels] /= factor
    return model


def _run(model: nn.Module, kinds: list[dict[str, object]], batch: dict[str, torch.Tensor]) -> None:
    steps = [CATALOG.build(CATALOG.parse(raw)) for raw in kinds]
    run_stage_steps(model, steps, [batch])


def _batch(tokenizer: object) -> dict[str, torch.Tensor]:
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # type: ignore[operator]
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).norm() / reference.norm())


def test_scales_follow_the_paper() -> None:
    act = torch.tensor([4.0, 1.0, 0.0])
    W = torch.tensor([[1.0, 2.0, 3.0], [-0.5, 4.0, 1.0]])  # column maxima 1, 4, 3
    s = smoothing_scales(act, [W], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0]))  # sqrt(4/1), sqrt(1/4), silent


def test_llama_folds_into_pre_norms_and_keeps_the_function() -> None:
    model, tokenizer = tiny_llama(hidden=64, intermediate=128)
    model = _with_outlier_channels(model)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
        norm_before = model.model.layers[0].input_layernorm.weight.clone()
        _run(model, [{"kind": "smoothquant"}], batch)
        logits = model(**batch).logits
    # norm -> q/k/v and norm -> gate/up fold; o_proj and down_proj read attention and
    # the MLP product, so they keep a runtime factor and their weights stay untouched
    layer = model.model.layers[0]
    assert not torch.equal(layer.input_layernorm.weight, norm_before)
    assert getattr(layer.self_attn.q_proj, SMOOTHING_ATTR, None) is None
    assert getattr(layer.self_attn.o_proj, SMOOTHING_ATTR, None) is not None
    assert getattr(layer.mlp.down_proj, SMOOTHING_ATTR, None) is not None
    assert _relative_error(logits, expected) < 1e-5


def test_post_norm_bert_is_not_folded() -> None:
    """BERT's LayerNorm output is also the residual stream: folding would change it."""
    model, tokenizer = tiny_bert(hidden=64, intermediate=128)
    batch = _batch(tokenizer)
    norms_before = {n: p.clone() for n, p in model.named_parameters() if "LayerNorm" in n}
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        _run(model, [{"kind": "smoothquant"}], batch)
        hidden = model(**batch).last_hidden_state
    assert all(torch.equal(p, norms_before[n]) for n, p in model.named_parameters() if n in norms_before)
    assert all(getattr(m, SMOOTHING_ATTR, None) is not None
               for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layer." in n)
    assert _relative_error(hidden, expected) < 1e-6


def _force_integer_kernels(model: torch.nn.Module) -> None:
    """Pin every W8A8 layer to an exact integer kernel of this CPU (eager quantization),
    so the error measured is that of int8 activations."""
    saturating = {name for name, probe in (("onednn_s8", ops.onednn_int8_saturates),
                                           ("int_mm", ops.int_mm_saturates)) if probe()}
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            usable = [k.name for k in layer.kernels()
                      if not k.name.endswith("_fused") and k.name not in saturating]
            layer.force_kernel(usable[0])


# Measured: Llama 0.10 (folded and runtime factors), BERT 0.72 (runtime factors only;
# its GELU and attention inputs have no outliers to migrate). Without smoothing: 1.
@pytest.mark.parametrize(("make", "max_ratio"), [(tiny_llama, 0.5), (tiny_bert, 0.85)])
def test_smoothquant_lowers_w8a8_error_with_outlier_channels(make: object, max_ratio: float) -> None:
    errors = {}
    for recipe in ("w8a8", "smoothquant+w8a8"):
        model, tokenizer = make(hidden=64, intermediate=128)  # type: ignore[operator]
        if make is tiny_llama:
            model = _with_outlier_channels(model)
        else:  # BERT: outlier channels in every LayerNorm output (the residual stream)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "LayerNorm" in name:
                        parameter[OUTLIERS] *= 40.0
        batch = _batch(tokenizer)
        with torch.no_grad():
            expected = model(**batch)[0]
            _run(model, [{"kind": kind} for kind in recipe.split("+")], batch)
            to_packed_runtime(model)
            _force_integer_kernels(model)  # the measured choice may pick the dense product
            output = model(**batch)[0]
        # BERT's outlier channels pass the residual stream to its output and would
        # dominate the error's norm: compare the channels that carry the rest
        keep = torch.ones(expected.shape[-1], dtype=torch.bool)
        keep[OUTLIERS] = make is tiny_llama  # Llama: the outliers stay inside the blocks
        errors[recipe] = _relative_error(output[..., keep], expected[..., keep])
    assert errors["smoothquant+w8a8"] < max_ratio * errors["w8a8"], errors
    assert errors["smoothquant+w8a8"] < 0.05, errors


def test_alpha_out_of_range_is_an_error() -> None:
    with pytest.raises(ValidationError, match="alpha"):
        CATALOG.parse({"kind": "smoothquant", "alpha": 1.5})

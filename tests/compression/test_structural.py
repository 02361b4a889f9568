"""Steps that change the model's structure (heads/channels, depth, block sharing,
low-rank, MoE merging): what they claim is counted on the saved artifact, and the
artifact reloads with identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from squeezeflow import sampledata
from squeezeflow.compression.artifact import FORMAT_FILE, load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.lowrank.factorized import FactorizedLinear
from squeezeflow.compression.lowrank.svd.math import rank_for_energy, spectrum
from squeezeflow.compression.moe.merge.math import group_experts, merge_weights
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.step import StepReport
from squeezeflow.evaluation.size import weights_bytes
from squeezeflow.testing import save_model, tiny_llama, tiny_mixtral, word_tokenizer

Batch = dict[str, torch.Tensor]


def _calibration(tokenizer, count: int = 32) -> list[Batch]:
    return list(tokenized_batches(sampledata.sentences(count, seed=11), tokenizer,
                                  batch_size=16, max_length=48))


def _run(model: nn.Module, calibration: list[Batch], **config: object) -> StepReport:
    return run_stage_steps(model, [CATALOG.build(CATALOG.parse(config))], calibration)[0]


def _stored(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as stored:
        return {name: tuple(stored.get_slice(name).get_shape()) for name in stored.keys()}


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def _round_trip(model: nn.Module, tokenizer, folder: Path, batch: Batch) -> nn.Module:
    """Save, reload, and require bit-identical logits."""
    expected = _logits(model, batch)
    save_compressed(model, tokenizer, "causal-lm", folder)
    loaded = load_compressed(folder).model
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=0)
    return loaded


def _gqa_llama() -> tuple[LlamaForCausalLM, object]:
    tokenizer = word_tokenizer("causal-lm")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).eval(), tokenizer


# --- structured: heads and MLP channels -------------------------------------------------


@pytest.mark.parametrize("gqa", [False, True])
def test_structured_removes_heads_and_channels_for_real(tmp_path: Path, gqa: bool) -> None:
    model, tokenizer = _gqa_llama() if gqa else tiny_llama(hidden=64, layers=2, intermediate=128)
    calibration = _calibration(tokenizer)
    batch = calibration[0]
    step = CATALOG.build(CATALOG.parse({"kind": "structured", "remove_heads": 2, "remove_channels": 0.25}))
    modules = step.select(model)
    with step.observe(modules), torch.no_grad():
        for b in calibration:
            model(**b, use_cache=False)
    step.apply(modules)  # zeroes what goes away
    zeroed = _logits(model, batch)
    step.restructure(model)  # removes it: the same function with smaller matrices
    torch.testing.assert_close(_logits(model, batch), zeroed, rtol=1e-5, atol=1e-5)

    folder = tmp_path / "structured"
    _round_trip(model, tokenizer, folder, batch)
    config = json.loads((folder / "config.json").read_text())
    kv_heads = 1 if gqa else 2  # GQA: one key/value group (2 query heads) went
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, kv_heads)
    assert config["intermediate_size"] == 96
    shapes = _stored(folder)
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        assert shapes[f"{prefix}.self_attn.q_proj.weight"] == (2 * 16, 64)
        assert shapes[f"{prefix}.self_attn.k_proj.weight"] == (kv_heads * 16, 64)
        assert shapes[f"{prefix}.self_attn.o_proj.weight"] == (64, 2 * 16)
        assert shapes[f"{prefix}.mlp.gate_proj.weight"] == (96, 64)
        assert shapes[f"{prefix}.mlp.down_proj.weight"] == (64, 96)
    # an ordinary Hugging Face folder: transformers alone loads it to the same function
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(plain, batch), _logits(model, batch), rtol=0, atol=0)


def test_structured_drops_the_least_important_heads() -> None:
    """A head whose output projection is zero contributes nothing: it must go first."""
    model, tokenizer = tiny_llama(hidden=64, layers=1, intermediate=128)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 16:32] = 0  # head 1 writes nothing
    report = _run(model, _calibration(tokenizer), kind="structured", remove_heads=2, remove_channels=0.0)
    importance_removed = report.per_module["model.layers.0.self_attn.o_proj"]["removed_importance"]
    assert 0 < importance_removed < 0.5
    kept_q = model.model.layers[0].self_attn.q_proj.weight
    original, _ = tiny_llama(hidden=64, layers=1, intermediate=128)
    rows = original.model.layers[0].self_attn.q_proj.weight[16:32]
    assert not any(torch.equal(kept_q[h * 16:(h + 1) * 16], rows) for h in range(2))


def test_structured_channels_on_bert(tmp_path: Path) -> None:
    tokenizer = word_tokenizer("encoder")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    config.architectures = ["BertModel"]
    model = BertModel(config).eval()
    calibration = _calibration(tokenizer)
    _run(model, calibration, kind="structured", remove_channels=0.5)
    batch = calibration[0]
    expected = model(**batch).last_hidden_state
    folder = save_compressed(model, tokenizer, "encoder", tmp_path / "bert")
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 64
    assert _stored(folder)["encoder.layer.0.intermediate.dense.weight"] == (64, 64)
    loaded = load_compressed(folder).model
    torch.testing.assert_close(loaded(**batch).last_hidden_state, expected, rtol=0, atol=0)


# --- depth ----------------------------------------------------------------------------


def test_depth_removes_the_least_influential_blocks(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=64, layers=4, intermediate=128)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: influence 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    kept_q = [model.model.layers[i].self_attn.q_proj.weight.clone() for i in (0, 1, 3)]
    calibration = _calibration(tokenizer)
    report = _run(model, calibration, kind="depth", remove=1)
    assert report.per_module["model.layers.2"] == {"influence": pytest.approx(0.0, abs=1e-9), "removed": 1.0}
    loaded = _round_trip(model, tokenizer, tmp_path / "depth", calibration[0])
    assert json.loads((tmp_path / "depth" / "config.json").read_text())["num_hidden_layers"] == 3
    layers = {name.split(".")[2] for name in _stored(tmp_path / "depth") if name.startswith("model.layers.")}
    assert layers == {"0", "1", "2"}
    for index, q in enumerate(kept_q):
        assert torch.equal(loaded.model.layers[index].self_attn.q_proj.weight, q)
    # layer_idx follows the new positions, so generation with a KV cache works
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    prompt = tokenizer(["The robot"], return_tensors="pt")
    cached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_depth_fraction_counts_blocks(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=32, layers=4, intermediate=64)
    calibration = _calibration(tokenizer)
    _run(model, calibration, kind="depth", fraction=0.5)
    _round_trip(model, tokenizer, tmp_path / "half", calibration[0])
    assert json.loads((tmp_path / "half" / "config.json").read_text())["num_hidden_layers"] == 2


# --- block sharing ---------------------------------------------------------------------


def test_shared_blocks_are_stored_once_and_reload_tied(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=64, layers=4, intermediate=128)
    dense = save_model(model, tokenizer, tmp_path / "dense")
    calibration = _calibration(tokenizer)
    report = _run(model, calibration, kind="share", group_size=2)
    representatives = [name for name, m in report.per_module.items() if m["representative"] == 1.0]
    assert len(representatives) == 2  # one per group of two
    loaded = _round_trip(model, tokenizer, tmp_path / "shared", calibration[0])

    shapes = _stored(tmp_path / "shared")
    linear_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    stored_linears = [n for n in shapes if n.endswith(tuple(f"{p}.weight" for p in linear_names))]
    assert len(stored_linears) == 2 * len(linear_names)  # 2 groups, each stored once
    tied = json.loads((tmp_path / "shared" / FORMAT_FILE).read_text())["tied"]
    assert len(tied) == 2 * len(linear_names)
    # loading restores the tying: the same Parameter object, not a copy
    for group in ((0, 1), (2, 3)):
        a, b = (loaded.model.layers[i] for i in group)
        for name in linear_names:
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            assert getattr(getattr(a, part), name).weight is getattr(getattr(b, part), name).weight
        assert a.input_layernorm.weight is not b.input_layernorm.weight  # norms stay per block
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert weights_bytes(dense) - weights_bytes(tmp_path / "shared") >= 2 * block_bytes * 0.95


def test_sharing_picks_the_representative_with_the_lowest_group_error() -> None:
    """Blocks 0 and 1 are copies, block 2 is far off: a group of three must use 0 or 1."""
    model, tokenizer = tiny_llama(hidden=32, layers=3, intermediate=64)
    with torch.no_grad():
        model.model.layers[1].load_state_dict(model.model.layers[0].state_dict())
        for p in model.model.layers[2].parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    report = _run(model, _calibration(tokenizer), kind="share", group_size=3)
    assert report.per_module["model.layers.2"]["representative"] == 0.0


# --- low-rank ----------------------------------------------------------------------------


def test_lowrank_param_ratio_factorizes_to_the_claimed_ranks(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=64, layers=2, intermediate=128)
    shapes_before = {n: m.weight.shape for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and "layers" in n}
    calibration = _calibration(tokenizer)
    _run(model, calibration, kind="lowrank", param_ratio=0.5)
    loaded = _round_trip(model, tokenizer, tmp_path / "lowrank", calibration[0])
    factorized = json.loads((tmp_path / "lowrank" / FORMAT_FILE).read_text())["factorized"]
    shapes = _stored(tmp_path / "lowrank")
    assert set(factorized) == set(shapes_before)
    for name, (out_features, in_features) in shapes_before.items():
        rank = int(0.5 * out_features * in_features // (out_features + in_features))
        assert factorized[name] == rank
        assert shapes[f"{name}.in_factor.weight"] == (rank, in_features)
        assert shapes[f"{name}.out_factor.weight"] == (out_features, rank)
        assert f"{name}.weight" not in shapes
        assert isinstance(loaded.get_submodule(name), FactorizedLinear)
        assert rank * (out_features + in_features) <= 0.5 * out_features * in_features


def test_lowrank_energy_rank_and_only_where_it_saves(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=64, layers=1, intermediate=128)
    calibration = _calibration(tokenizer)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and "layers" in n}
    report = _run(model, calibration, kind="lowrank", energy=0.6, whiten=False)
    for name, W in weights.items():
        _, S, _ = spectrum(W, None)
        rank = rank_for_energy(S, 0.6)
        assert S[:rank].pow(2).sum() / S.pow(2).sum() >= 0.6 > S[: rank - 1].pow(2).sum() / S.pow(2).sum()
        metrics = report.per_module[name]
        assert metrics["rank"] == rank
        saves = rank * sum(W.shape) < W.numel()
        assert metrics["factorized"] == float(saves)
        assert isinstance(model.get_submodule(name), FactorizedLinear if saves else nn.Linear)
    _round_trip(model, tokenizer, tmp_path / "mixed", calibration[0])


def test_whitened_lowrank_has_lower_output_error_than_plain_svd() -> None:
    torch.manual_seed(0)
    X = torch.randn(2048, 64) * torch.logspace(-1, 1, 64)  # (tokens, in): uneven input scales
    W = torch.randn(96, 64)
    layers = {}
    for whiten in (False, True):
        linear = nn.Linear(64, 96, bias=False)
        linear.weight.data.copy_(W)
        model = nn.Sequential(linear)
        step = CATALOG.build(CATALOG.parse({"kind": "lowrank", "rank": 16, "whiten": whiten}))
        modules = {"0": linear}
        with step.observe(modules):
            model(X)
        step.apply(modules)
        step.restructure(model)
        layers[whiten] = model
    with torch.no_grad():
        errors = {w: float((m(X) - X @ W.T).norm()) for w, m in layers.items()}
    assert errors[True] < 0.8 * errors[False]


# --- MoE expert merging ----------------------------------------------------------------


def test_moe_merge_keeps_the_claimed_experts(tmp_path: Path) -> None:
    model, tokenizer = tiny_mixtral(experts=4, top_k=2)
    calibration = _calibration(tokenizer)
    report = _run(model, calibration, kind="moe_merge", experts=2)
    assert all(m["experts"] == 2.0 for m in report.per_module.values())
    _round_trip(model, tokenizer, tmp_path / "moe", calibration[0])
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["num_local_experts"] == 2
    shapes = _stored(tmp_path / "moe")
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp"
        assert shapes[f"{prefix}.gate.weight"] == (2, 64)
        assert shapes[f"{prefix}.experts.gate_up_proj"] == (2, 128, 64)
        assert shapes[f"{prefix}.experts.down_proj"] == (2, 64, 64)


def test_experts_merge_by_routing_frequency_into_the_dominant_ones() -> None:
    frequency = torch.tensor([0.4, 0.1, 0.3, 0.2])
    similarity = torch.tensor([[1.0, 0.9, 0.1, 0.2],
                               [0.9, 1.0, 0.2, 0.1],
                               [0.1, 0.2, 1.0, 0.8],
                               [0.2, 0.1, 0.8, 1.0]])
    groups = group_experts(frequency, similarity, keep=2)
    assert groups == [[0, 1], [2, 3]]
    W = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1) * torch.ones(4, 2, 3)
    merged = merge_weights(W, groups, frequency)
    assert merged.shape == (2, 2, 3)
    torch.testing.assert_close(merged[0], torch.full((2, 3), 0.1 / 0.5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged[1], torch.full((2, 3), (0.3 * 2 + 0.2 * 3) / 0.5), rtol=1e-4, atol=1e-4)

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from squeezeflow.compression.artifact import FORMAT_FILE, load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.integrity import IntegrityError
from squeezeflow.compression.quantization.qweight import QUANTIZED_ATTR
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation.size import weights_bytes
from squeezeflow.testing import save_model, tiny_bert, tiny_llama


def _quantize(model: torch.nn.Module, **config: object) -> None:
    run_stage_steps(model, [CATALOG.build(CATALOG.parse({"kind": "rtn", **config}))])


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 32), (3, 16), (2, 64)])
def test_packed_model_reloads_with_identical_logits(tmp_path: Path, bits: int,
                                                     group_size: int | None) -> None:
    model, tokenizer = tiny_llama(hidden=64, intermediate=192)
    _quantize(model, bits=bits, group_size=group_size)
    batch = tokenizer(["The robot repaired the garden fence."], return_tensors="pt")
    expected = model(**batch).logits
    save_compressed(model, tokenizer, "causal-lm", tmp_path / "q")
    loaded = load_compressed(tmp_path / "q")
    assert loaded.kind == "causal-lm"
    torch.testing.assert_close(loaded.model(**batch).logits, expected, rtol=0, atol=0)
    # the codes travel with the modules, so a later stage can save packed again
    assert all(
        getattr(m, QUANTIZED_ATTR, None) is not None
        for n, m in loaded.model.named_modules() if n.endswith("q_proj")
    )


def test_packed_int4_is_smaller_on_disk(tmp_path: Path) -> None:
    model, tokenizer = tiny_bert(hidden=128, intermediate=512)
    dense = save_model(model, tokenizer, tmp_path / "dense")
    linear_fp32 = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    _quantize(model, bits=4, group_size=128)
    packed = save_compressed(model, tokenizer, "encoder", tmp_path / "int4")
    saved = weights_bytes(dense) - weights_bytes(packed)
    # 4-bit codes + fp16 scales + 4-bit zeros per 128 columns: 1/8 + 3/512 of fp32 bytes
    assert saved >= linear_fp32 * (1 - 0.14)


def test_weight_changed_after_quantization_is_stored_dense(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama()
    _quantize(model, bits=4, group_size=32)
    run_stage_steps(model, [CATALOG.build(CATALOG.parse({"kind": "magnitude", "sparsity": 0.5}))])
    batch = tokenizer(["Yesterday the engineer cooked."], return_tensors="pt")
    expected = model(**batch).logits
    save_compressed(model, tokenizer, "causal-lm", tmp_path / "m")
    torch.testing.assert_close(load_compressed(tmp_path / "m").model(**batch).logits, expected)


def test_tied_embeddings_are_stored_once_and_retied(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = tiny_llama()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    save_compressed(model, tokenizer, "causal-lm", tmp_path / "tied")
    loaded = load_compressed(tmp_path / "tied").model
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama()
    folder = save_compressed(model, tokenizer, "causal-lm", tmp_path / "m")
    text = (folder / FORMAT_FILE).read_text().replace('"version": 1', '"version": 99')
    (folder / FORMAT_FILE).write_text(text)
    with pytest.raises(IntegrityError, match=FORMAT_FILE):  # edited after saving: refused
        load_compressed(folder)
    with pytest.raises(ValueError, match="format version 99"):
        load_compressed(folder, verify=False)

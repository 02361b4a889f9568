"""GGUF export: GPTQ 4-bit g32 codes and scales land in Q4_0 blocks exactly (after
llama.cpp's q/k row permutation), other grids are requantized with their error
reported, and the metadata llama.cpp reads is there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from squeezeflow import sampledata
from squeezeflow.compression.artifact import load_compressed, save_compressed
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.exports.base import NotExportableError
from squeezeflow.compression.exports.gguf import GGUF_FILE, export
from squeezeflow.compression.quantization.gptq.step import GPTQConfig, GPTQStep
from squeezeflow.compression.quantization.qweight import current_quantized
from squeezeflow.compression.quantization.rtn.step import RTNConfig, RTNStep
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.testing import byte_bpe_tokenizer, llama_cpp_folder, tiny_llama

gguf = pytest.importorskip("gguf")

HEADS = 4
HIDDEN = 64


def hf_to_ggml_rows(W: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's `LlamaModel.permute`, written from its definition."""
    rows = W.shape[0]
    return W.reshape(heads, 2, rows // heads // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama (BPE tokenizer): GPTQ 4-bit g32 symmetric everywhere, then o_proj
    re-rounded by RTN 4-bit g16 (blocks of 32 span two groups: not exact) and down_proj by
    RTN 4-bit g32 asymmetric (zero points move offsets past Q4_0's: exact in Q8_0)."""
    folder = tmp_path_factory.mktemp("gguf")
    model, tokenizer = tiny_llama(hidden=HIDDEN, layers=2, heads=HEADS, intermediate=128,
                                  tokenizer=byte_bpe_tokenizer(vocab_size=384))
    batches = list(tokenized_batches(sampledata.sentences(32, seed=3), tokenizer,
                                     batch_size=16, max_length=32))
    gptq = GPTQConfig(bits=4, group_size=32, symmetric=True, calibration_precision="fp32")
    run_stage_steps(model, [GPTQStep(gptq)], batches)
    run_stage_steps(model, [RTNStep(RTNConfig(bits=4, group_size=16, targets=("*o_proj",))),
                            RTNStep(RTNConfig(bits=4, group_size=32, symmetric=False,
                                              targets=("*down_proj",)))], batches)
    source = save_compressed(model, tokenizer, "causal-lm", folder / "packed")
    figures = export(source, folder / "out")
    reader = gguf.GGUFReader(folder / "out" / GGUF_FILE)
    return {"model": load_compressed(source).model, "tokenizer": tokenizer, "figures": figures,
            "tensors": {t.name: t for t in reader.tensors}, "fields": reader.fields, "source": source}


def stored(exported: dict[str, Any], name: str) -> Any:
    quantized = current_quantized(exported["model"].get_submodule(name))
    assert quantized is not None
    return quantized


def field(exported: dict[str, Any], key: str) -> Any:
    return exported["fields"][key].contents()


@pytest.mark.parametrize("hf, ggml", [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                                      ("self_attn.v_proj", "attn_v"), ("mlp.up_proj", "ffn_up")])
def test_gptq_codes_and_scales_are_the_q4_0_blocks(exported: dict[str, Any], hf: str, ggml: str) -> None:
    for layer in range(2):
        quantized = stored(exported, f"model.layers.{layer}.{hf}")
        tensor = exported["tensors"][f"blk.{layer}.{ggml}.weight"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
        rows, columns = quantized.shape
        blocks = np.asarray(tensor.data).reshape(rows, columns // 32, 18)  # (out, in/32, d + 16 bytes)
        d = torch.from_numpy(blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0])
        nibbles = torch.from_numpy(blocks[..., 2:].astype(np.int16))  # (out, in/32, 16)
        q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(rows, columns) - 8
        offsets = quantized.codes.to(torch.int16) - quantized.zero[:, quantized.g_idx].to(torch.int16)
        scale = quantized.scale  # (out, in/32): group size 32 = one scale per block
        permute = ggml in ("attn_q", "attn_k")
        expected_q = hf_to_ggml_rows(offsets, HEADS) if permute else offsets
        expected_d = hf_to_ggml_rows(scale, HEADS) if permute else scale
        # the same integers and the same scales: our scales are fp16 values, d holds them exactly
        assert torch.equal(q, expected_q)
        assert torch.equal(d, expected_d)
        # and gguf's own dequantizer gives back our dequantized weight, bit for bit
        W = quantized.dequantize()
        decoded = torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type))
        assert torch.equal(decoded, hf_to_ggml_rows(W, HEADS) if permute else W)
        if permute:  # the permutation is not the identity: unpermuted rows would differ
            assert not torch.equal(decoded, W)


def test_asymmetric_grid_is_exact_in_q8_0_and_g16_is_requantized(exported: dict[str, Any]) -> None:
    figures = exported["figures"]
    for layer in range(2):
        down = exported["tensors"][f"blk.{layer}.ffn_down.weight"]
        assert down.tensor_type == gguf.GGMLQuantizationType.Q8_0
        W = stored(exported, f"model.layers.{layer}.mlp.down_proj").dequantize()
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(np.asarray(down.data), down.tensor_type)), W)
    errors = []
    for layer in range(2):
        out = exported["tensors"][f"blk.{layer}.attn_output.weight"]
        assert out.tensor_type == gguf.GGMLQuantizationType.Q8_0
        W = stored(exported, f"model.layers.{layer}.self_attn.o_proj").dequantize()
        decoded = torch.from_numpy(gguf.quants.dequantize(np.asarray(out.data), out.tensor_type))
        errors.append(float((decoded - W).norm() / W.norm()))
    # 7 GPTQ Q4_0 layers minus o_proj and down_proj per block: 5 x 2 exact Q4_0, 2 exact Q8_0
    assert figures["tensors_exact_q4_0"] == 10 and figures["tensors_exact_q8_0"] == 2
    assert figures["tensors_requantized"] == 2
    # the reported error is the measured one: Q8_0's, well above zero, well below 4-bit's
    assert figures["requantized_max_rel_error"] == pytest.approx(max(errors), rel=1e-5)
    assert 1e-4 < figures["requantized_max_rel_error"] < 1e-2


def test_norms_f32_and_embeddings_f16(exported: dict[str, Any]) -> None:
    tensors, model = exported["tensors"], exported["model"]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type == gguf.GGMLQuantizationType.F16
    expected = model.model.embed_tokens.weight.detach().to(torch.float16)
    assert torch.equal(torch.from_numpy(np.asarray(embedding.data).copy()), expected)
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert 0 < exported["figures"]["f16_max_rel_error"] < 2**-10


def test_metadata_llama_cpp_reads(exported: dict[str, Any]) -> None:
    config, tokenizer = exported["model"].config, exported["tokenizer"]
    assert field(exported, "general.architecture") == "llama"
    assert field(exported, "llama.context_length") == config.max_position_embeddings
    assert field(exported, "llama.embedding_length") == HIDDEN
    assert field(exported, "llama.block_count") == 2
    assert field(exported, "llama.feed_forward_length") == 128
    assert field(exported, "llama.attention.head_count") == HEADS
    assert field(exported, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert field(exported, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert field(exported, "llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert field(exported, "tokenizer.ggml.model") == "gpt2"
    assert field(exported, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(exported, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert field(exported, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(exported, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    types = field(exported, "tokenizer.ggml.token_type")
    assert types[tokenizer.bos_token_id] == gguf.TokenType.CONTROL
    assert types[300] == gguf.TokenType.NORMAL
    assert len(field(exported, "tokenizer.ggml.merges")) > 0
    assert field(exported, "tokenizer.ggml.add_bos_token") is True


def test_word_level_tokenizer_is_refused(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=32, layers=1, heads=2, intermediate=64)
    source = save_compressed(model, tokenizer, "causal-lm", tmp_path / "packed")
    with pytest.raises(NotExportableError, match="WordLevel"):
        export(source, tmp_path / "out")
    assert not (tmp_path / "out" / GGUF_FILE).exists()


def test_qwen2_keeps_rotary_rows_biases_and_tied_head(tmp_path: Path) -> None:
    """Qwen2 runs NEOX rotary in llama.cpp: q/k rows stay in HF order; q/k/v biases are
    written as F32; a head tied to the embedding is not written (llama.cpp reuses it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = byte_bpe_tokenizer(vocab_size=320)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_()  # zero biases would hide a dropped one
    run_stage_steps(model, [RTNStep(RTNConfig(bits=4, group_size=32))], [])
    source = save_compressed(model, tokenizer, "causal-lm", tmp_path / "packed")
    figures = export(source, tmp_path / "out")
    reader = gguf.GGUFReader(tmp_path / "out" / GGUF_FILE)
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["qwen2.attention.head_count_kv"].contents() == 2
    assert "output.weight" not in tensors and figures["tensors_f16"] == 1  # token_embd only
    assert figures["tensors_exact_q4_0"] == 7
    for hf, ggml in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
        module = model.model.layers[0].self_attn.get_submodule(hf)
        weight, bias = tensors[f"blk.0.{ggml}.weight"], tensors[f"blk.0.{ggml}.bias"]
        decoded = torch.from_numpy(gguf.quants.dequantize(np.asarray(weight.data), weight.tensor_type))
        assert torch.equal(decoded, module.weight.detach())  # HF row order, exact
        assert bias.tensor_type == gguf.GGMLQuantizationType.F32
        assert torch.equal(torch.from_numpy(np.asarray(bias.data).copy()), module.bias.detach())


LLAMA_CPP = llama_cpp_folder(Path(__file__).resolve().parents[2])  # this CPU's build


@pytest.mark.slow
def test_llama_cpp_logits_match_the_packed_model(tmp_path: Path) -> None:
    """llama.cpp loads the export and its logits match our packed runtime's (tolerance and
    its reason: benchmarks/export_llamacpp.py, which also builds llama.cpp for this CPU)."""
    import sys

    if not (LLAMA_CPP / "llama_cpp").is_dir():
        pytest.skip(f"llama-cpp-python is not built in {LLAMA_CPP} (see benchmarks/export_llamacpp.py)")
    sys.path.append(str(LLAMA_CPP))
    import llama_cpp

    from squeezeflow.testing import train_causal_lm

    model, tokenizer = tiny_llama(hidden=64, layers=2, heads=4, intermediate=128,
                                  tokenizer=byte_bpe_tokenizer(vocab_size=384))
    train_causal_lm(model, tokenizer, steps=60)
    batches = list(tokenized_batches(sampledata.sentences(32, seed=3), tokenizer,
                                     batch_size=16, max_length=32))
    run_stage_steps(model, [GPTQStep(GPTQConfig(bits=4, group_size=32, calibration_precision="fp32"))],
                    batches)
    source = save_compressed(model, tokenizer, "causal-lm", tmp_path / "packed")
    assert export(source, tmp_path / "out")["tensors_exact_q4_0"] == 14
    prompt = " ".join(sampledata.sentences(2, seed=5))
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        ours = load_compressed(source, runtime="packed").model(input_ids=torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / GGUF_FILE), logits_all=True, n_ctx=64,
                          n_threads=2, verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    llm.close()
    assert float((theirs - ours).norm() / ours.norm()) < 0.03  # measured 0.56-0.66 % on 128-wide models
    assert float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()) >= 0.95

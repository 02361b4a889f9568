"""GGUF export checked by llama.cpp itself: its logits against our packed model's.

A tiny Llama with a byte-level BPE tokenizer (one llama.cpp reproduces) is trained for
a few seconds, quantized by `gptq` 4-bit group 32 symmetric, saved packed, exported to
GGUF (Q4_0 exactly) and loaded by llama.cpp (`llama-cpp-python`, compiled here once
into .cache/llamacpp). Both run the same token ids; the table shows how far llama.cpp's
logits are from our packed runtime's and from the dequantized fp32 model's.

Tolerance (why it is not zero): llama.cpp's CPU Q4_0 product rounds each activation
row to Q8_0 (int8 per block of 32, fp16 scale) before its integer dot products, and
the F16 embedding / head round to fp16; our packed runtime computes in fp32 (or bf16)
from the same weights. Activations rounded to int8 err by up to 1/254 of their block's
largest value per matmul, 15 matmuls deep here: we accept a relative logit error
(Frobenius, over the prompt) below 3% and top-1 agreement of at least 95% of positions.
A wrong weight layout (e.g. q/k rows not permuted to ggml's rotary order) errs by
tens of percent: the `unpermuted q/k` row measures that control.

The first run on a CPU builds llama-cpp-python from PyPI for it (about 10 minutes on
2 cores) into .cache/llamacpp-<CPU flags hash> (`squeezeflow.testing.llama_cpp_folder`:
llama.cpp compiles for the building CPU, so each CPU class gets its own build); the slow
test in tests/compression/test_export_gguf.py uses that build when it exists.
Run: .venv/bin/python benchmarks/export_llamacpp.py
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from squeezeflow import sampledata
from squeezeflow.compression.artifact import load_compressed, save_compressed
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.exports import gguf as gguf_export
from squeezeflow.compression.quantization.gptq.step import GPTQConfig, GPTQStep
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.testing import (
    LLAMA_CPP_CMAKE_ARGS,
    LLAMA_CPP_PYTHON,
    byte_bpe_tokenizer,
    llama_cpp_folder,
    tiny_llama,
    train_causal_lm,
)

LLAMA_CPP = llama_cpp_folder(Path(__file__).resolve().parents[1])
MAX_REL_ERROR = 0.03  # see the module docstring: int8 activations in llama.cpp's Q4_0 product
MIN_TOP1 = 0.95
PROMPT = " ".join(sampledata.sentences(3, seed=99))
CASES = ("llama", "llama-gqa", "qwen2")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def llama_cpp_logits(path: Path, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits (tokens, vocab) for `ids`, and its own tokenization of PROMPT."""
    sys.path.append(str(LLAMA_CPP))  # after the venv: its numpy copy is not used
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2,
                          n_batch=128, verbose=False)
    own_ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)  # (tokens, vocab)
    llm.close()
    return logits, list(own_ids)


def compare(reference: torch.Tensor, logits: np.ndarray) -> dict[str, float]:
    other = torch.from_numpy(logits)
    return {
        "max_abs_diff": float((other - reference).abs().max()),
        "rel_error": float((other - reference).norm() / reference.norm()),
        "top1_agreement": float((other.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def build(case: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """The case's tiny model: Llama (4 heads), Llama with grouped-query attention (2 kv
    heads: k is permuted per kv head), Qwen2 (q/k/v biases, tied head, no permutation)."""
    if case.startswith("llama"):
        model, _ = tiny_llama(hidden=128, layers=2, heads=4, intermediate=256, tokenizer=tokenizer)
        if case == "llama":
            return model
        config = model.config
        config.num_key_value_heads = 2
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    return Qwen2ForCausalLM(config).eval()


def run_case(case: str, folder: Path) -> dict[str, Any]:
    tokenizer = byte_bpe_tokenizer(vocab_size=512)
    model = build(case, tokenizer)
    loss = train_causal_lm(model, tokenizer, steps=150)
    calibration = list(tokenized_batches(sampledata.sentences(64, seed=11), tokenizer,
                                         batch_size=16, max_length=64))
    config = GPTQConfig(bits=4, group_size=32, symmetric=True, calibration_precision="fp32")
    run_stage_steps(model, [GPTQStep(config)], calibration)
    ids = tokenizer(PROMPT)["input_ids"]
    source = save_compressed(model, tokenizer, "causal-lm", folder / case / "packed")
    figures = gguf_export.export(source, folder / case / "gguf")
    batch = torch.tensor([ids])
    with torch.no_grad():
        packed = load_compressed(source, runtime="packed").model(input_ids=batch).logits[0].float()
        dense = load_compressed(source).model(input_ids=batch).logits[0].float()
    logits, llama_ids = llama_cpp_logits(folder / case / "gguf" / gguf_export.GGUF_FILE, ids)
    rows = {"ours packed vs ours dense": compare(dense, packed.numpy()),
            "llama.cpp vs ours packed": compare(packed, logits),
            "llama.cpp vs ours dense": compare(dense, logits)}
    if case.startswith("llama"):  # control: the same export without the q/k rotary permutation
        original = gguf_export._rotary_rows
        gguf_export._rotary_rows = lambda config, name: torch.arange(  # type: ignore[assignment]
            original(config, name).numel())
        try:
            gguf_export.export(source, folder / case / "unpermuted")
        finally:
            gguf_export._rotary_rows = original  # type: ignore[assignment]
        control, _ = llama_cpp_logits(folder / case / "unpermuted" / gguf_export.GGUF_FILE, ids)
        rows["control: q/k rows not permuted"] = compare(packed, control)
    return {"loss": loss, "tokens": len(ids), "tokenization_equal": llama_ids == ids,
            "figures": figures, "rows": rows}


def build_llama_cpp() -> None:
    """Compile llama-cpp-python for this CPU into LLAMA_CPP, unless it is there."""
    if (LLAMA_CPP / "llama_cpp").is_dir():
        return
    print(f"building {LLAMA_CPP_PYTHON} for this CPU into {LLAMA_CPP} (about 10 minutes)", flush=True)
    partial = LLAMA_CPP.with_name(LLAMA_CPP.name + ".partial")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(partial),
                    LLAMA_CPP_PYTHON], check=True,
                   env={**os.environ, "CMAKE_ARGS": LLAMA_CPP_CMAKE_ARGS})
    partial.replace(LLAMA_CPP)  # a killed build leaves only the .partial folder


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    build_llama_cpp()
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for case in CASES:
            results[case] = run_case(case, Path(folder))
    print(f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}); llama-cpp-python 0.3.36; "
          f"models 128 wide, 2 blocks, byte-level BPE vocab 512, trained 150 steps; "
          f"gptq 4-bit g32 symmetric; prompt {results[CASES[0]]['tokens']} tokens")
    print(f"{'model':9s} {'comparison':34s} {'max |diff|':>10s} {'rel error':>9s} {'top-1':>6s}")
    summary: dict[str, Any] = {}
    passed = True
    for case, result in results.items():
        for name, row in result["rows"].items():
            print(f"{case:9s} {name:34s} {row['max_abs_diff']:10.4f} {row['rel_error']:9.3%} "
                  f"{row['top1_agreement']:6.1%}")
        figures = result["figures"]
        print(f"{case:9s} export: {figures['tensors_exact_q4_0']:.0f} Q4_0 exact, "
              f"{figures['tensors_requantized']:.0f} requantized, {figures['tensors_f16']:.0f} F16 "
              f"(rel err {figures['f16_max_rel_error']:.1e}), {figures['gguf_bytes'] / 1024:.0f} KiB; "
              f"llama.cpp tokenizes the prompt as HF does: {result['tokenization_equal']}")
        main_row = result["rows"]["llama.cpp vs ours packed"]
        ok = (main_row["rel_error"] < MAX_REL_ERROR and main_row["top1_agreement"] >= MIN_TOP1
              and result["tokenization_equal"])
        passed = passed and ok
        summary[case] = {
            "llamacpp_vs_packed": main_row,
            "llamacpp_vs_dense_rel_error": result["rows"]["llama.cpp vs ours dense"]["rel_error"],
            "packed_vs_dense_rel_error": result["rows"]["ours packed vs ours dense"]["rel_error"],
            "tokenization_equal": result["tokenization_equal"],
            "tensors_exact_q4_0": figures["tensors_exact_q4_0"],
            "tensors_requantized": figures["tensors_requantized"],
            "f16_max_rel_error": figures["f16_max_rel_error"], "gguf_bytes": figures["gguf_bytes"],
        }
        if "control: q/k rows not permuted" in result["rows"]:
            summary[case]["control_unpermuted"] = result["rows"]["control: q/k rows not permuted"]
    print(f"tolerance: rel error < {MAX_REL_ERROR:.0%}, top-1 >= {MIN_TOP1:.0%}, same tokens: "
          f"{'PASS' if passed else 'FAIL'}  ({time.perf_counter() - start:.0f} s)")
    print(json.dumps({"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "llama_cpp_python": "0.3.36", "max_rel_error_tolerance": MAX_REL_ERROR,
                      "min_top1_tolerance": MIN_TOP1, "passed": passed, **summary}))


if __name__ == "__main__":
    main()

"""QMoE on the recipes' tiny Mixtral: bits per expert parameter on disk, zeros, perplexity
against the base and against 2-bit RTN of the experts, and the cost of decoding per call.

The tiny Mixtral of recipes/tiny_models.py (2 blocks, hidden 64, 8 experts of 64, top-2,
trained 200 steps on the sample sentences, seed 0) is trained here (or read with
`--model`). 128 calibration sentences (seed 11), perplexity on 128 held-out ones (seed
12), every model saved with `save_compressed` and measured from its reload. Variants of
the experts (attention and routers stay fp32 in all):
- `qmoe`: the `qmoe` step (GPTQ on the ternary grid, dictionary coded, `qmoe` format);
  bits = bytes of the experts' tensors in model.safetensors * 8 / expert parameters;
- `rtn-ternary`: the same grid and coding, rounded to nearest (QMoE's `--nearest`);
- `rtn-2bit`: 2-bit round to nearest per row (asymmetric, one fp16 scale and a 2-bit
  zero per row), written into the fp32 model: its bits are the integer format's layout
  (2 + 18/64 per weight), computed, since that format stores Linears, not stacked experts.
For `qmoe` the table also gives the bits the paper's row layout would take (bf16 min and
max per row: 32 bits a row instead of 12) on the same codewords.

Speed (one experts layer of the tiny Mixtral, and one large synthetic matrix): the
runtime modules decode the codewords on every call, then multiply in fp32; the dense
product is the baseline. Median of `--repeats` calls after warm-up.

Usage: python benchmarks/qmoe.py [--model recipes/models/tiny-mixtral] [--steps 200]
       [--threads N] [--repeats 50]
Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import WEIGHTS_FILE, load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.moe.qmoe.coding import code_bits
from squeezeflow.compression.moe.qmoe.math import round_ternary, ternary_values
from squeezeflow.compression.moe.qmoe.runtime import (
    EXPERT_PARAMETERS,
    TernaryExperts,
    TernaryLinear,
)
from squeezeflow.compression.moe.qmoe.weight import TERNARY_ATTR, TernaryWeight, row_levels
from squeezeflow.compression.quantization.rtn.math import quantize_rtn
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation.machine import machine_tags
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.settings import apply_defaults, quiet_progress_bars
from squeezeflow.testing import tiny_mixtral, train_causal_lm


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith("mlp.experts")}


def expert_parameters(model: nn.Module) -> int:
    return sum(getattr(m, p).numel() for m in expert_modules(model).values() for p in EXPERT_PARAMETERS)


def expert_file_bytes(folder: Path) -> int:
    """Bytes of every tensor of the experts modules in the saved safetensors file."""
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as stored:
        return sum(stored.get_tensor(k).numel() * stored.get_tensor(k).element_size()
                   for k in stored.keys() if ".mlp.experts." in k)


def rtn_ternary(model: nn.Module) -> None:
    """QMoE's grid and coding, rounded to nearest (no calibration)."""
    for module in expert_modules(model).values():
        codes, levels = {}, {}
        for name in EXPERT_PARAMETERS:
            parameter = getattr(module, name)
            levels[name] = row_levels(parameter)
            codes[name] = round_ternary(parameter.detach(), levels[name].values())
            with torch.no_grad():
                parameter.copy_(ternary_values(codes[name], levels[name].values()))
        setattr(module, TERNARY_ATTR, TernaryWeight.from_codes(codes, levels))


def rtn_2bit(model: nn.Module) -> None:
    for module in expert_modules(model).values():
        for name in EXPERT_PARAMETERS:
            parameter = getattr(module, name)
            with torch.no_grad():
                for expert in range(parameter.shape[0]):
                    quantized = quantize_rtn(parameter[expert], 2, None, symmetric=False)
                    parameter[expert] = quantized.dequantize()


def zero_fraction(model: nn.Module) -> float:
    zeros = sum(int((getattr(m, p) == 0).sum()) for m in expert_modules(model).values() for p in EXPERT_PARAMETERS)
    return zeros / expert_parameters(model)


def median_ms(call: Callable[[], Any], repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):  # warm-up
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def speed(model: nn.Module, quantized: nn.Module, repeats: int) -> dict[str, float]:
    """Decode + matmul per call vs the dense product: one experts layer, one large matrix."""
    figures: dict[str, float] = {}
    dense_experts: Any = model.get_submodule("model.layers.0.mlp.experts")
    stored = getattr(quantized.get_submodule("model.layers.0.mlp.experts"), TERNARY_ATTR)
    coded_experts = TernaryExperts(dense_experts, stored)
    hidden = dense_experts.gate_up_proj.shape[2]
    experts = dense_experts.gate_up_proj.shape[0]
    generator = torch.Generator().manual_seed(0)
    for tokens in (1, 1024):  # one generated token; a batch of 16 x 64 tokens
        x = torch.randn(tokens, hidden, generator=generator)
        index = torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(tokens)])
        weights = torch.full((tokens, 2), 0.5)
        with torch.no_grad():
            figures[f"experts_dense_ms_{tokens}"] = median_ms(partial(dense_experts, x, index, weights), repeats)
            figures[f"experts_qmoe_ms_{tokens}"] = median_ms(partial(coded_experts, x, index, weights), repeats)
    # One large matrix (4096 x 1024, a Switch-base expert's shape is 3072 x 768) with
    # the paper's ~90% zeros, as iid ternary codes on random row levels.
    rows, columns = 4096, 1024
    W = torch.randn(rows, columns, generator=generator) * 0.02
    codes = torch.where(torch.rand(rows, columns, generator=generator) < 0.9, 0, torch.sign(W)).to(torch.int8)
    large = TernaryWeight.from_codes({"weight": codes}, {"weight": row_levels(W)})
    layer = TernaryLinear(large, None)
    W_dense = large.dequantize()
    for tokens in (1, 64):
        x = torch.randn(tokens, columns, generator=generator)
        with torch.no_grad():
            figures[f"large_dense_ms_{tokens}"] = median_ms(partial(nn.functional.linear, x, W_dense), repeats)
            figures[f"large_qmoe_ms_{tokens}"] = median_ms(partial(layer, x), repeats)
    figures["large_code_bits"] = code_bits(int(large.stream.numel()), rows * columns)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a saved tiny Mixtral folder to use")
    parser.add_argument("--steps", type=int, default=200, help="training steps (recipes/tiny_models.py: 200)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per speed figure")
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.model is not None:
        loaded = load_compressed(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        print(f"base model {args.model}")
    else:
        model, tokenizer = tiny_mixtral(hidden=64, layers=2, heads=4, intermediate=64, experts=8, top_k=2)
        train_causal_lm(model, tokenizer, steps=args.steps)
        print(f"trained the tiny Mixtral ({args.steps} steps) in {time.perf_counter() - start:.0f} s")
    calibration = list(tokenized_batches(sampledata.sentences(128, seed=11), tokenizer,
                                         batch_size=16, max_length=64))
    evaluation = list(tokenized_batches(sampledata.sentences(128, seed=12), tokenizer,
                                        batch_size=16, max_length=64))
    parameters = expert_parameters(model)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        results["base"] = {"ppl": perplexity(model, evaluation), "bits": 32.0, "zeros": zero_fraction(model)}

        qmoe = copy.deepcopy(model)
        start = time.perf_counter()
        report = run_stage_steps(qmoe, [CATALOG.build(CATALOG.parse({"kind": "qmoe"}))], calibration)[0]
        seconds = time.perf_counter() - start
        folder = save_compressed(qmoe, tokenizer, "causal-lm", Path(scratch) / "qmoe")
        reloaded = load_compressed(folder).model
        stored = [getattr(m, TERNARY_ATTR) for m in expert_modules(qmoe).values()]
        words = sum(int(s.stream.numel()) for s in stored)
        rows = sum(int(s.level_codes.shape[0]) for s in stored)
        results["qmoe"] = {
            "ppl": perplexity(reloaded, evaluation),
            "bits": 8 * expert_file_bytes(folder) / parameters,
            "zeros": zero_fraction(reloaded),
            "code_bits": 16 * words / parameters,
            "paper_rows_bits": (16 * words + 32 * rows) / parameters,  # bf16 min + max per row
            "output_rel_error": report.metrics["mean_output_rel_error"],
            "seconds": seconds,
        }

        nearest = copy.deepcopy(model)
        rtn_ternary(nearest)
        folder = save_compressed(nearest, tokenizer, "causal-lm", Path(scratch) / "rtn-ternary")
        reloaded = load_compressed(folder).model
        results["rtn-ternary"] = {"ppl": perplexity(reloaded, evaluation),
                                  "bits": 8 * expert_file_bytes(folder) / parameters,
                                  "zeros": zero_fraction(reloaded)}

        two_bit = copy.deepcopy(model)
        rtn_2bit(two_bit)
        results["rtn-2bit"] = {"ppl": perplexity(two_bit, evaluation), "bits": 2 + 18 / 64,
                               "zeros": zero_fraction(two_bit)}
    figures = speed(model, qmoe, args.repeats)
    tags = machine_tags()

    print(f"\nCPU: {tags['cpu_model']} ({tags['cpu_capability']}), torch {tags['torch_version']}, "
          f"{tags['threads']} threads; {parameters} expert parameters")
    print(f"{'experts':<14}{'ppl':>9}{'ppl/base':>10}{'bits/param':>12}{'zeros':>8}")
    base_ppl = results["base"]["ppl"]
    for name, r in results.items():
        print(f"{name:<14}{r['ppl']:>9.4f}{r['ppl'] / base_ppl:>10.4f}{r['bits']:>12.3f}{r['zeros']:>8.3f}")
    q = results["qmoe"]
    print(f"qmoe: codewords {q['code_bits']:.3f} bits/param; with the paper's bf16 min/max per row "
          f"{q['paper_rows_bits']:.3f}; mean layer output error {q['output_rel_error']:.3f}; "
          f"step {q['seconds']:.1f} s")
    print(f"\n{'decode + matmul per call':<34}{'dense ms':>10}{'qmoe ms':>10}{'ratio':>8}")
    for label, key in (("tiny experts layer, 1 token", "experts_{}_ms_1"),
                       ("tiny experts layer, 1024 tokens", "experts_{}_ms_1024"),
                       ("4096x1024 matrix, 1 token", "large_{}_ms_1"),
                       ("4096x1024 matrix, 64 tokens", "large_{}_ms_64")):
        dense, coded = figures[key.format("dense")], figures[key.format("qmoe")]
        print(f"{label:<34}{dense:>10.3f}{coded:>10.3f}{coded / dense:>8.1f}")
    print(f"(4096x1024 at 90% zeros: {figures['large_code_bits']:.3f} code bits per weight)")
    print(json.dumps({**{f"{m}_{k}": round(v, 4) for m, r in results.items() for k, v in r.items()},
                      **{k: round(v, 4) for k, v in figures.items()}, **tags}))


if __name__ == "__main__":
    main()

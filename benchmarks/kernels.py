"""Packed CPU kernels side by side: fp32, bf16, int8 and int4 Linear layers on 7B-class
shapes, and W8A8 (SmoothQuant) on the default model, all measured in one run.

Part 1: Linear shapes of 7B-class models (out x in: 4096x4096, 4096x11008, 11008x4096)
at batch 1 and 8: fp32 F.linear, bf16 F.linear, int8 (per-channel) and int4 (g128)
QuantLinear layers as the packed runtime runs them (bf16 activations; the fp32-activation
variants of the aten ops are timed too), each with its fraction of the bytes-moved
limit: weight bytes / measured read bandwidth, divided by the measured time.
Part 2: all-MiniLM-L6-v2, 32 sentences padded to 128 tokens: fp32 vs smoothquant +
w8a8 on the packed runtime (and PyTorch's dynamic int8 quantization as the peer),
with mean embedding cosine to fp32.

Variants are interleaved within each repeat, so load from other processes hits them
alike; figures are medians. Last line: one JSON object.
Usage: python benchmarks/kernels.py [--repeats N] [--threads N]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

if __name__ != "__main__":
    # Imported as `kernels`: this folder is on sys.path while any benchmark here runs,
    # and transformers probes for the hub `kernels` package by importing that name. A
    # module without __file__ and __version__ reads to it as "not installed", and
    # nothing below imports torch or squeezeflow unless this file runs as a script.
    del globals()["__file__"]

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (out, in) of Llama-7B's Linears
BATCHES = (1, 8)
GROUP_SIZE = 128  # the usual int4 group


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant, timed round-robin after one warm-up call."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for call in variants.values():
            call()
        for _ in range(repeats):
            for name, call in variants.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def read_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
    """Bytes per second of the fastest streaming read (sum of a large fp32 tensor): the
    best of several, since other processes only ever slow a read down."""
    big = torch.ones(megabytes * 2**20 // 4)
    with torch.inference_mode():
        big.sum()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            big.sum()
            best = min(best, time.perf_counter() - start)
    return big.numel() * 4 / best


def linear_table(repeats: int, bandwidth: float) -> dict[tuple[int, int, int], dict[str, float]]:
    results = {}
    for out_features, in_features in SHAPES:
        generator = torch.Generator().manual_seed(0)
        W = torch.randn(out_features, in_features, generator=generator) * 0.02
        W_bf16 = W.to(torch.bfloat16)
        groups = in_features // GROUP_SIZE
        int8 = pack_linear(
            torch.randint(0, 256, (out_features, in_features), dtype=torch.uint8, generator=generator),
            torch.rand(out_features, 1, generator=generator) * 1e-3,
            torch.full((out_features, 1), 128, dtype=torch.uint8),
            torch.zeros(in_features, dtype=torch.int64), bits=8,
        )
        int4 = pack_linear(
            torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=generator),
            torch.rand(out_features, groups, generator=generator) * 1e-2,
            torch.full((out_features, groups), 8, dtype=torch.uint8),
            torch.arange(in_features) // GROUP_SIZE, bits=4,
        )
        int8_fp32_scales = int8.scales.to(torch.float32)
        int4_fp32_sz = int4.scales_and_zeros.to(torch.float32)
        weight_bytes = {
            "fp32": 4 * W.numel(), "bf16": 2 * W.numel(),
            "int8": W.numel() + 2 * out_features,  # codes + bf16 scales
            "int4": W.numel() // 2 + 2 * 2 * out_features * groups,  # codes + bf16 scale, zero
        }
        weight_bytes["int8 fp32-act"] = weight_bytes["int8"]
        weight_bytes["int4 fp32-act"] = weight_bytes["int4"]
        for batch in BATCHES:
            x = torch.randn(batch, in_features, generator=generator)
            variants = linear_variants(x, W, W_bf16, int8, int4, int8_fp32_scales, int4_fp32_sz)
            seconds = interleaved(variants, repeats)
            row = {}
            for name, value in seconds.items():
                row[f"{name}_ms"] = value * 1e3
                row[f"{name}_limit"] = weight_bytes[name] / bandwidth / value
            results[(out_features, in_features, batch)] = row
    return results


def linear_variants(
    x: torch.Tensor, W: torch.Tensor, W_bf16: torch.Tensor, int8: torch.nn.Module,
    int4: torch.nn.Module, int8_fp32_scales: torch.Tensor, int4_fp32_sz: torch.Tensor,
) -> dict[str, Callable[[], object]]:
    x_bf16 = x.to(torch.bfloat16)
    return {
        "fp32": lambda: F.linear(x, W),
        "bf16": lambda: F.linear(x_bf16, W_bf16),
        "int8": lambda: int8(x),
        "int4": lambda: int4(x),
        # the same aten ops fed fp32 activations, to show why the runtime casts
        "int8 fp32-act": lambda: torch.ops.aten._weight_int8pack_mm(x, int8.weight, int8_fp32_scales),
        "int4 fp32-act": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, int4.weight, int4.op_group, int4_fp32_sz),
    }


def minilm_w8a8(repeats: int) -> dict[str, float]:
    base = load_pretrained(resolve_source("default"))
    tokenizer = base.tokenizer
    batch = tokenizer(sampledata.sentences(32, seed=5), padding="max_length", max_length=128,
                      truncation=True, return_tensors="pt")
    calibration = list(tokenized_batches(sampledata.sentences(128, seed=7), tokenizer,
                                         batch_size=32, max_length=128))
    w8a8 = copy.deepcopy(base.model)
    steps = [CATALOG.build(CATALOG.parse({"kind": kind})) for kind in ("smoothquant", "w8a8")]
    run_stage_steps(w8a8, steps, calibration)
    to_packed_runtime(w8a8)
    dynamic = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(base.model), {torch.nn.Linear}, dtype=torch.qint8
    )
    models = {"fp32": base.model, "smoothquant+w8a8": w8a8, "quantize_dynamic": dynamic}

    def embed(model: torch.nn.Module) -> torch.Tensor:
        return mean_pooled_embeddings(model, batch["input_ids"], batch["attention_mask"])

    with torch.inference_mode():
        reference = embed(base.model)
        cosines = {name: float((embed(m) * reference).sum(dim=-1).mean()) for name, m in models.items()}
    seconds = interleaved({name: (lambda m=m: embed(m)) for name, m in models.items()}, repeats)
    return {
        **{f"{name}_ms": value * 1e3 for name, value in seconds.items()},
        **{f"{name}_cos": value for name, value in cosines.items()},
        **{f"{name}_speedup": seconds["fp32"] / value for name, value in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--minilm-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()
    torch.set_num_threads(args.threads)

    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {args.threads} threads, "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s, median of {args.repeats} repeats")
    table = linear_table(args.repeats, bandwidth)
    names = ("fp32", "bf16", "int8", "int4", "int8 fp32-act", "int4 fp32-act")
    print("\nms per call (fraction of the bytes-moved limit); out x in, batch")
    print(f"{'shape':<18}" + "".join(f"{name:>17}" for name in names))
    for (out_features, in_features, batch), row in table.items():
        cells = "".join(f"{row[f'{n}_ms']:>9.2f} ({row[f'{n}_limit']:>4.0%})" for n in names)
        print(f"{out_features}x{in_features} b{batch:<5}" + cells)
    largest = max(SHAPES, key=lambda shape: (shape[0] * shape[1], shape[0]))
    speedups = {}
    for batch in BATCHES:
        row = table[(*largest, batch)]
        for name in ("int8", "int4"):
            speedups[f"{name}_speedup_b{batch}"] = row["fp32_ms"] / row[f"{name}_ms"]
    print(f"\nspeed-up vs fp32 on {largest[0]}x{largest[1]}: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))

    minilm = minilm_w8a8(args.minilm_repeats)
    print("\nall-MiniLM-L6-v2, 32 sentences x 128 tokens")
    print(f"{'variant':<20}{'ms':>10}{'speed-up':>10}{'cosine':>10}")
    for name in ("fp32", "smoothquant+w8a8", "quantize_dynamic"):
        print(f"{name:<20}{minilm[f'{name}_ms']:>10.1f}{minilm[f'{name}_speedup']:>9.2f}x"
              f"{minilm[f'{name}_cos']:>10.4f}")
    summary = speedups | {
        "minilm_w8a8_speedup": minilm["smoothquant+w8a8_speedup"],
        "minilm_w8a8_cos": minilm["smoothquant+w8a8_cos"],
    }
    print(json.dumps({key: round(value, 4) for key, value in summary.items()}))


if __name__ == "__main__":
    # keep this folder off the import path, so that transformers' probe for the hub
    # `kernels` package does not find this file
    HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import argparse
    import copy
    import json
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from squeezeflow import sampledata
    from squeezeflow.compression.catalog import CATALOG
    from squeezeflow.compression.data import tokenized_batches
    from squeezeflow.compression.models import (
        load_pretrained,
        mean_pooled_embeddings,
        resolve_source,
    )
    from squeezeflow.compression.packed import to_packed_runtime
    from squeezeflow.compression.runners import run_stage_steps
    from squeezeflow.kernels import pack_linear
    from squeezeflow.settings import apply_defaults, quiet_progress_bars

    main()

"""Packed CPU kernels side by side: the measured kernel choice of int8, int4 and NF4
Linear layers on 7B-class shapes against fp32 F.linear, and W8A8 (SmoothQuant) on the
default model, all measured in one run on this machine.

Part 1: Linear shapes of 7B-class models (out x in: 4096x4096, 4096x11008, 11008x4096)
at 1, 8 and 1024 rows. Each packed layer decides its kernel as the runtime does (every
candidate checked against the format's accuracy contract, then timed; decisions in a
fresh file unless --decisions names one), and the table prints every candidate's time
and the one chosen; then the chosen kernel and fp32 F.linear are timed interleaved for
the speed-up. Resident bytes of each packed weight are compared with fp32's.
Part 2: all-MiniLM-L6-v2, 32 sentences padded to 128 tokens: fp32 vs smoothquant +
w8a8 on the packed runtime (and PyTorch's dynamic int8 quantization as the peer),
with mean embedding cosine to fp32.

Variants are interleaved within each repeat, so load from other processes hits them
alike; figures are medians. Last line: one JSON object.
Usage: python benchmarks/kernels.py [--repeats N] [--threads N] [--decisions FILE]
"""

from __future__ import annotations

import os
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
BATCHES = (1, 8, 1024)
GROUP_SIZE = 128  # the usual int4 group
NF4_BLOCK = 64  # bitsandbytes' NF4 block size
FORMATS = ("int8", "int4", "nf4")


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


def packed_layers(W: torch.Tensor, generator: torch.Generator) -> dict[str, QuantLinear]:
    """int8 per channel, int4 g128 and NF4 blocks of 64 of the same weight (out, in)."""
    out_features, in_features = W.shape
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
    coded = quantize_to_codebook(W, nf4_codebook(), NF4_BLOCK, "nf4")
    nf4 = CodebookLinear.from_weight(coded, None)
    return {"int8": int8, "int4": int4, "nf4": nf4}


def linear_table(repeats: int, large_repeats: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for out_features, in_features in SHAPES:
        generator = torch.Generator().manual_seed(0)
        W = torch.randn(out_features, in_features, generator=generator) * 0.02
        layers = packed_layers(W, generator)
        fp32_bytes = 4 * W.numel()
        for batch in BATCHES:
            x = torch.randn(batch, in_features, generator=generator)
            variants: dict[str, Callable[[], object]] = {"fp32": lambda x=x, W=W: F.linear(x, W)}
            row: dict[str, object] = {"shape": f"{out_features}x{in_features}", "batch": batch}
            for name, layer in layers.items():
                with torch.inference_mode():
                    layer(x)  # decides this rows bucket: contract, then timing
                decision = layer.decisions[row_bucket(batch)]
                row[f"{name}_kernel"] = decision.kernel
                row[f"{name}_candidates"] = decision.ms
                row[f"{name}_rejected"] = decision.rejected
                row[f"{name}_resident"] = layer.resident_bytes() / fp32_bytes
                variants[name] = lambda layer=layer, x=x: layer(x)
            seconds = interleaved(variants, large_repeats if batch >= 256 else repeats)
            row["fp32_ms"] = seconds["fp32"] * 1e3
            for name in layers:
                row[f"{name}_ms"] = seconds[name] * 1e3
                row[f"{name}_speedup"] = seconds["fp32"] / seconds[name]
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: dict[str, object]) -> None:
    print(f"\n{row['shape']} x {row['batch']} rows: fp32 F.linear {row['fp32_ms']:.2f} ms")
    for name in FORMATS:
        candidates = row[f"{name}_candidates"]
        assert isinstance(candidates, dict)
        timed = ", ".join(f"{k} {v:.2f}" for k, v in sorted(candidates.items(), key=lambda i: i[1]))
        rejected = row[f"{name}_rejected"]
        assert isinstance(rejected, dict)
        dropped = "".join(f"; {k} rejected: {v}" for k, v in rejected.items())
        print(f"  {name:5} chose {row[f'{name}_kernel']!s:15} {row[f'{name}_ms']:9.2f} ms "
              f"{row[f'{name}_speedup']:6.2f}x   candidates (ms): {timed}{dropped}")


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
        "mix": kernel_mix(w8a8),
        **{f"{name}_ms": value * 1e3 for name, value in seconds.items()},
        **{f"{name}_cos": value for name, value in cosines.items()},
        **{f"{name}_speedup": seconds["fp32"] / value for name, value in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--large-repeats", type=int, default=3, help="repeats at 1024 rows")
    parser.add_argument("--minilm-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--decisions", type=Path, default=None,
                        help="kernel decisions file to use (default: a fresh one)")
    parser.add_argument("--parts", default="linear,minilm",
                        help="comma-separated parts to run: linear, minilm")
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()
    torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="kernel-decisions-")
    os.environ["SQUEEZEFLOW_KERNEL_CACHE"] = str(args.decisions or Path(scratch) / "k.json")

    capability = torch.backends.cpu.get_cpu_capability()
    cpu = cpu_fingerprint()["cpu"]
    print(f"{cpu}, capability {capability}, torch {torch.__version__}, {args.threads} threads; "
          f"medians of {args.repeats} repeats ({args.large_repeats} at 1024 rows)")
    summary: dict[str, object] = {"cpu_capability": capability}
    parts = set(args.parts.split(","))
    if "linear" in parts:
        summary |= linear_part(args.repeats, args.large_repeats)
    if "minilm" in parts:
        summary |= minilm_part(args.minilm_repeats)
    print(json.dumps({key: round(value, 4) if isinstance(value, float) else value
                      for key, value in summary.items()}))


def linear_part(repeats: int, large_repeats: int) -> dict[str, object]:
    rows = linear_table(repeats, large_repeats)
    largest = max(SHAPES, key=lambda shape: (shape[0] * shape[1], shape[0]))
    name_of = f"{largest[0]}x{largest[1]}"
    print(f"\nspeed-up of the chosen kernel over fp32 F.linear on {name_of}")
    print(f"{'rows':>6}" + "".join(f"{name:>10}" for name in FORMATS))
    summary: dict[str, object] = {}
    for row in rows:
        if row["shape"] != name_of:
            continue
        batch = row["batch"]
        print(f"{batch!s:>6}" + "".join(f"{row[f'{n}_speedup']:>9.2f}x" for n in FORMATS))
        for name in FORMATS:
            summary[f"{name}_speedup_b{batch}"] = row[f"{name}_speedup"]
    large = [float(row[f"{n}_speedup"]) for row in rows for n in FORMATS  # type: ignore[arg-type]
             if row["batch"] == max(BATCHES)]
    summary["large_batch_speedup"] = min(large)
    resident = {name: max(float(row[f"{name}_resident"]) for row in rows)  # type: ignore[arg-type]
                for name in FORMATS}
    print("resident weight bytes / fp32: "
          + ", ".join(f"{name} {value:.3f}" for name, value in resident.items()))
    summary |= {f"{name}_resident_ratio": value for name, value in resident.items()}
    return summary


def minilm_part(repeats: int) -> dict[str, object]:
    minilm = minilm_w8a8(repeats)
    print("\nall-MiniLM-L6-v2, 32 sentences x 128 tokens")
    print(f"{'variant':<20}{'ms':>10}{'speed-up':>10}{'cosine':>10}")
    for name in ("fp32", "smoothquant+w8a8", "quantize_dynamic"):
        print(f"{name:<20}{minilm[f'{name}_ms']:>10.1f}{minilm[f'{name}_speedup']:>9.2f}x"
              f"{minilm[f'{name}_cos']:>10.4f}")
    print(f"w8a8 kernels: {minilm['mix']}")
    return {
        "minilm_w8a8_speedup": minilm["smoothquant+w8a8_speedup"],
        "minilm_w8a8_cos": minilm["smoothquant+w8a8_cos"],
    }


if __name__ == "__main__":
    # keep this folder off the import path, so that transformers' probe for the hub
    # `kernels` package does not find this file
    HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import argparse
    import copy
    import json
    import statistics
    import tempfile
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
    from squeezeflow.compression.quantization.codebook import quantize_to_codebook
    from squeezeflow.compression.quantization.float4.math import nf4_codebook
    from squeezeflow.compression.runners import run_stage_steps
    from squeezeflow.kernels import QuantLinear, kernel_mix, pack_linear
    from squeezeflow.kernels.choice import cpu_fingerprint, row_bucket
    from squeezeflow.kernels.codebook import CodebookLinear
    from squeezeflow.settings import apply_defaults, quiet_progress_bars

    main()

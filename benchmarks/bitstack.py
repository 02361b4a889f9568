"""BitStack: perplexity vs bits per weight from one decomposition, next to RTN 4/3/2-bit.

A tiny Llama (default 4 blocks, hidden 256, MLP 512, trained 300 steps at lr 0.01 on the
sample sentences: bigger than the tests', and sensitive enough that RTN 3-bit costs ~4%
perplexity and 2-bit ruins it; at lr 0.003 it shrugs off even 3 bits) is decomposed once per
importance score (`perplexity`, the paper's; `fisher`; `output_error`) with the same
blocks (`niter` blocks of rank k from `factor_bits`); then for each target size the
artifact of just the blocks that fit (`write_budget`) is written, reloaded and measured:
held-out perplexity, and bits per weight = bytes on disk of the BitStack Linears' stored
tensors in that artifact (the loaded blocks and the fp16 column scales) * 8 / their
weights. RTN (the `rtn` step's default group size: one grid per output row) is measured
the same way: bytes of its packed codes, scales and zero points.

Also: each importance order's agreement with the perplexity order (Spearman correlation
of the blocks' positions, blocks after each Linear's first), the seconds to decompose and
rank, and one forward of 8 x 64 tokens on the packed runtime (`BitStackLinear` rebuilds
each weight from its blocks per call) against the dense model, with the CPU named.

Usage: python benchmarks/bitstack.py [--model DIR] [--hidden 256] [--layers 4] [--steps 300]
       [--lr 0.01] [--seed 0] [--niter 8] [--factor-bits 0.125]
       [--importance perplexity,fisher,output_error] [--eval 128] [--threads N]
Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import (
    FORMAT_FILE,
    WEIGHTS_FILE,
    load_compressed,
    save_compressed,
)
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.formats.bitstack import MIB, safetensors_bytes
from squeezeflow.compression.quantization.bitstack.budget import (
    bitstack_loaded,
    read_plan,
    write_budget,
)
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation.machine import cpu_model
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.settings import apply_defaults, quiet_progress_bars
from squeezeflow.testing import tiny_llama, train_causal_lm

TARGET_BITS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)  # budgets, as bits per weight
RTN_BITS = (4, 3, 2)
GOALS = {"bpw_4": 4.0, "bpw_2_5": 2.5}  # the acceptance points


def cpu_name() -> str:
    """The CPU model name and torch's vector capability (e.g. `AMD EPYC (AVX512)`)."""
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def linear_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and "lm_head" not in name)


def stored_bits(folder: Path, format_name: str, weights: int) -> float:
    """Bits per weight of the `format_name` Linears' tensors stored in `folder`."""
    layers = json.loads((folder / FORMAT_FILE).read_text()).get(format_name, {})
    sizes = safetensors_bytes(folder / WEIGHTS_FILE)
    stored = sum(size for name, size in sizes.items() if name.rsplit(".", 1)[0] in layers
                 or name.rsplit(".", 2)[0] in layers)
    return 8 * stored / weights


def block_positions(folder: Path) -> dict[tuple[str, int], int]:
    layers = json.loads((folder / FORMAT_FILE).read_text())["bitstack"]
    return {(layer, i): p for layer, spec in layers.items() for i, p in enumerate(spec["order"])}


def spearman(a: dict[tuple[str, int], int], b: dict[tuple[str, int], int]) -> float:
    """Rank correlation of two orders' positions over the blocks after each first block."""
    keys = [key for key in a if key[1] > 0]
    rank_a = {k: r for r, k in enumerate(sorted(keys, key=a.__getitem__))}
    rank_b = {k: r for r, k in enumerate(sorted(keys, key=b.__getitem__))}
    n = len(keys)
    d2 = sum((rank_a[k] - rank_b[k]) ** 2 for k in keys)
    return 1 - 6 * d2 / (n * (n * n - 1))


def forward_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> float:
    with torch.no_grad():
        model(**batch, use_cache=False)
        start = time.perf_counter()
        for _ in range(repeats):
            model(**batch, use_cache=False)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a saved causal-LM folder to use")
    parser.add_argument("--hidden", type=int, default=256, help="width of the tiny Llama (MLP: 2x)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the tiny Llama")
    parser.add_argument("--steps", type=int, default=300, help="its training steps")
    parser.add_argument("--lr", type=float, default=1e-2, help="its learning rate")
    parser.add_argument("--seed", type=int, default=0, help="its initialization and data seed")
    parser.add_argument("--niter", type=int, default=8, help="BitStack blocks per Linear")
    parser.add_argument("--factor-bits", type=float, default=0.125, help="fp16 factor bits per block")
    parser.add_argument("--importance", default="perplexity,fisher,output_error")
    parser.add_argument("--eval", type=int, default=128, help="held-out sentences for perplexity")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    if args.model is not None:
        loaded = load_compressed(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        print(f"base model {args.model}")
    else:
        model, tokenizer = tiny_llama(hidden=args.hidden, layers=args.layers, heads=4,
                                      intermediate=2 * args.hidden, seed=args.seed)
        train_causal_lm(model, tokenizer, steps=args.steps, lr=args.lr, seed=args.seed)
        print(f"trained a {args.hidden}-wide, {args.layers}-block Llama ({args.steps} steps, lr "
              f"{args.lr}, seed {args.seed}) in {time.perf_counter() - started:.0f} s")
    calibration = list(tokenized_batches(sampledata.sentences(128, seed=11), tokenizer,
                                         batch_size=16, max_length=64))
    evaluation = list(tokenized_batches(sampledata.sentences(args.eval, seed=12), tokenizer,
                                        batch_size=16, max_length=64))
    weights = linear_weights(model)
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                               "linear_weights": weights}

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base_ppl = perplexity(model, evaluation)
        results["base_ppl"] = round(base_ppl, 4)
        rows.append({"method": "base (fp32)", "bpw": 32.0, "ppl": base_ppl})
        for bits in RTN_BITS:
            quantized = copy.deepcopy(model)
            run_stage_steps(quantized, [CATALOG.build(CATALOG.parse({"kind": "rtn", "bits": bits}))])
            folder = save_compressed(quantized, tokenizer, "causal-lm", root / f"rtn{bits}")
            ppl = perplexity(load_compressed(folder).model, evaluation)
            bpw = stored_bits(folder, "quantized", weights)
            rows.append({"method": f"RTN {bits}-bit, per output row", "bpw": bpw, "ppl": ppl})
            results[f"rtn{bits}"] = {"bpw": round(bpw, 4), "ppl": round(ppl, 4)}

        positions: dict[str, dict[tuple[str, int], int]] = {}
        for importance in args.importance.split(","):
            decomposed = copy.deepcopy(model)
            step = CATALOG.build(CATALOG.parse({
                "kind": "bitstack", "niter": args.niter, "factor_bits": args.factor_bits,
                "importance": importance,
            }))
            start = time.perf_counter()
            report = run_stage_steps(decomposed, [step], calibration)[0]
            seconds = time.perf_counter() - start
            folder = save_compressed(decomposed, tokenizer, "causal-lm", root / f"bitstack-{importance}")
            positions[importance] = block_positions(folder)
            full = read_plan(folder)
            scale_bytes = bitstack_loaded(decomposed).scale_bytes  # counted in bpw and in fixed_bytes
            curve = []
            for target in TARGET_BITS:
                # blocks + scales = target bits per weight; every other tensor on top
                budget = full.fixed_bytes - scale_bytes + target * weights / 8
                if budget < full.minimum_bytes or budget > full.total_bytes:
                    continue
                subset = root / f"bitstack-{importance}-{target}"
                plan = write_budget(folder, subset, budget / MIB)
                reloaded = load_compressed(subset)
                bpw = stored_bits(subset, "bitstack", weights)
                loaded = bitstack_loaded(reloaded.model)
                assert abs(bpw - loaded.bits_per_weight) < 1e-9, (bpw, loaded.bits_per_weight)
                assert sum(safetensors_bytes(subset / WEIGHTS_FILE).values()) == plan.total_bytes
                ppl = perplexity(reloaded.model, evaluation)
                point = {"target": target, "budget_mb": round(budget / MIB, 4), "bpw": round(bpw, 4),
                         "blocks": plan.blocks_loaded, "ppl": round(ppl, 4)}
                curve.append(point)
                rows.append({"method": f"BitStack {importance}", "bpw": bpw, "ppl": ppl,
                             "budget_mb": budget / MIB, "blocks": f"{plan.blocks_loaded}/{plan.blocks_stored}"})
            results[f"bitstack_{importance}"] = {
                "seconds": round(seconds, 1),
                "importance_seconds": round(report.metrics["importance_seconds"], 1),
                "curve": curve,
                **({"spearman_output_error_vs_ppl_per_level":
                    round(report.metrics["importance_spearman_output_error"], 3)}
                   if "importance_spearman_output_error" in report.metrics else {}),
            }
            if importance == args.importance.split(",")[0]:
                batch = next(iter(tokenized_batches(sampledata.sentences(8, seed=13), tokenizer,
                                                    batch_size=8, max_length=64)))
                dense_ms = forward_ms(load_compressed(folder).model, batch)
                packed_ms = forward_ms(load_compressed(folder, runtime="packed").model, batch)
                results["forward_ms_batch8"] = {"dense": round(dense_ms, 2), "bitstack_packed": round(packed_ms, 2)}
        if "perplexity" in positions:
            for importance, order in positions.items():
                if importance != "perplexity":
                    results[f"spearman_{importance}_vs_perplexity"] = round(
                        spearman(order, positions["perplexity"]), 3)

    print(f"\nCPU: {results['cpu']}, {results['threads']} torch threads; "
          f"{weights} weights in the targeted Linears (lm_head and embeddings stay fp32)")
    print(f"\n{'method':<34}{'budget MiB':>11}{'blocks':>10}{'bits/w':>9}{'ppl':>9}{'ppl/base':>10}")
    for row in rows:
        budget = f"{row['budget_mb']:.4f}" if "budget_mb" in row else ""
        print(f"{row['method']:<34}{budget:>11}{row.get('blocks', ''):>10}{row['bpw']:>9.3f}"
              f"{row['ppl']:>9.4f}{row['ppl'] / base_ppl:>10.4f}")
    for importance in args.importance.split(","):
        curve = results[f"bitstack_{importance}"]["curve"]
        for goal, bits in GOALS.items():
            near = [p for p in curve if abs(p["bpw"] - bits) <= 0.25]
            if not near:
                continue
            point = min(near, key=lambda p: abs(p["bpw"] - bits))
            rtn = results["rtn4"] if goal == "bpw_4" else results["rtn2"]
            ratio = point["ppl"] / rtn["ppl"]
            results[f"bitstack_{importance}"][goal] = {"bpw": point["bpw"], "ppl": point["ppl"],
                                                       "ppl_over_rtn": round(ratio, 4)}
            verdict = ("within 10% of RTN 4-bit" if ratio <= 1.10 else "NOT within 10% of RTN 4-bit") \
                if goal == "bpw_4" else ("better than RTN 2-bit" if ratio < 1 else "NOT better than RTN 2-bit")
            print(f"BitStack {importance} at {point['bpw']:.3f} bits/w: ppl {point['ppl']:.4f} = "
                  f"{ratio:.4f} x RTN {'4' if goal == 'bpw_4' else '2'}-bit ({verdict})")
    for key, value in results.items():
        if key.startswith("spearman_"):
            print(f"{key}: {value}")
    timing = ", ".join(f"{i} {results[f'bitstack_{i}']['seconds']} s (ranking "
                       f"{results[f'bitstack_{i}']['importance_seconds']} s)"
                       for i in args.importance.split(","))
    print(f"decompose + rank: {timing}")
    if "forward_ms_batch8" in results:
        speed = results["forward_ms_batch8"]
        print(f"forward, 8 x 64 tokens: dense {speed['dense']} ms, BitStack packed runtime "
              f"{speed['bitstack_packed']} ms ({results['cpu']})")
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    print(f"total {results['total_seconds']} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

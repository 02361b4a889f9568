"""Quality vs. compression of every pruning, sharing and low-rank method on one model.

A tiny Llama (4 blocks, hidden 128, MLP 256) is trained on the sample sentences
with a fixed seed, then each method compresses a copy with the same calibration
data; every result is saved with `save_compressed`, reloaded, and measured: held-out
perplexity, unique parameters (shared ones once), non-zero parameters and the
weights' size on disk. Runs with the library only (no Prefect, no MLflow).

Usage: python benchmarks/pruning.py [--model recipes/models/tiny-llama] [--steps 200] [--eval 128]
       [--hidden 128] [--layers 4] [--lr 0.003] [--seed 0]
       [--outliers] [--only METHOD,METHOD]
(`--outliers` first rescales the model so that a few input features are large, as in
trained LLMs, without changing its function: see squeezeflow.testing.add_outlier_features.)
(`--model` takes the same tiny Llama already written by recipes/tiny_models.py instead of
training one here, which takes minutes on a busy 2-core machine.)
Last line: one JSON object {method: {"ppl", "params", "size_mb"}, ..., "base": {...}}.
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
from squeezeflow.compression.artifact import load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.evaluation.size import parameter_counts, weights_bytes
from squeezeflow.settings import apply_defaults, quiet_progress_bars
from squeezeflow.testing import add_outlier_features, tiny_llama, train_causal_lm

# Each method: its stages (each a list of steps), as a recipe would write them.
METHODS: dict[str, list[list[dict[str, Any]]]] = {
    "magnitude-50%": [[{"kind": "magnitude", "sparsity": 0.5}]],
    "wanda-50%": [[{"kind": "wanda", "sparsity": 0.5}]],
    "sparsegpt-50%": [[{"kind": "sparsegpt", "sparsity": 0.5}]],
    "magnitude-2:4": [[{"kind": "magnitude", "pattern": "2:4"}]],
    "wanda-2:4": [[{"kind": "wanda", "pattern": "2:4"}]],
    "sparsegpt-2:4": [[{"kind": "sparsegpt", "pattern": "2:4"}]],
    "sparsegpt-50%+int4": [[{"kind": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 64}]],
    "structured-2heads-25%ch": [[{"kind": "structured", "remove_heads": 2, "remove_channels": 0.25}]],
    "depth-1of4": [[{"kind": "depth", "remove": 1}]],
    "share-groups-of-2": [[{"kind": "share", "group_size": 2}]],
    "foldgpt-depth1+share2": [[{"kind": "depth", "remove": 1}], [{"kind": "share", "group_size": 2}]],
    "lowrank-60%-whitened": [[{"kind": "lowrank", "param_ratio": 0.6, "whiten": True}]],
    "lowrank-60%-plain": [[{"kind": "lowrank", "param_ratio": 0.6, "whiten": False}]],
}


def measure(model: nn.Module, folder: Path, evaluation: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    counts = parameter_counts(model)
    return {
        "ppl": round(perplexity(model, evaluation), 4),
        "params": int(counts["parameters"]),
        "nonzero": int(counts["nonzero_parameters"]),
        "size_mb": round(weights_bytes(folder) / 2**20, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a saved causal-LM folder to use")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the tiny Llama")
    parser.add_argument("--hidden", type=int, default=128, help="width of the tiny Llama (MLP: 2x)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the tiny Llama")
    parser.add_argument("--lr", type=float, default=3e-3, help="its learning rate")
    parser.add_argument("--seed", type=int, default=0, help="its initialization and data seed")
    parser.add_argument("--eval", type=int, default=128, help="held-out sentences for perplexity")
    parser.add_argument("--outliers", action="store_true", help="give the model large input features")
    parser.add_argument("--only", default="", help="comma-separated methods to run (default: all)")
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()

    start = time.perf_counter()
    if args.model is not None:
        loaded = load_compressed(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        print(f"base model {args.model}")
    else:
        model, tokenizer = tiny_llama(hidden=args.hidden, layers=args.layers, heads=4,
                                      intermediate=2 * args.hidden, seed=args.seed)
        train_causal_lm(model, tokenizer, steps=args.steps, lr=args.lr, seed=args.seed)
        print(f"trained a {args.hidden}-wide, {args.layers}-block Llama ({args.steps} steps, "
              f"lr {args.lr}, seed {args.seed}) in {time.perf_counter() - start:.0f} s")
    if args.outliers:
        add_outlier_features(model)
    methods = {m: s for m, s in METHODS.items() if not args.only or m in args.only.split(",")}
    calibration = list(tokenized_batches(sampledata.sentences(128, seed=11), tokenizer,
                                         batch_size=16, max_length=64))
    evaluation = list(tokenized_batches(sampledata.sentences(args.eval, seed=12), tokenizer,
                                        batch_size=16, max_length=64))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        base_dir = save_compressed(model, tokenizer, "causal-lm", Path(scratch) / "base")
        results["base"] = measure(load_compressed(base_dir).model, base_dir, evaluation)
        for method, stages in methods.items():
            start = time.perf_counter()
            compressed = copy.deepcopy(model)
            for stage in stages:
                steps = [CATALOG.build(CATALOG.parse(step)) for step in stage]
                run_stage_steps(compressed, steps, calibration)
            folder = save_compressed(compressed, tokenizer, "causal-lm", Path(scratch) / method)
            results[method] = measure(load_compressed(folder).model, folder, evaluation)
            results[method]["seconds"] = round(time.perf_counter() - start, 1)

    base = results["base"]
    print(f"\n{'method':<26}{'ppl':>9}{'ppl/base':>10}{'params':>10}{'non-zero':>10}{'MB':>8}{'s':>7}")
    for method, r in results.items():
        print(f"{method:<26}{r['ppl']:>9.3f}{r['ppl'] / base['ppl']:>10.3f}{r['params']:>10}"
              f"{r['nonzero']:>10}{r['size_mb']:>8.3f}{r.get('seconds', 0):>7}")
    print(json.dumps({m: {k: r[k] for k in ("ppl", "params", "size_mb")} for m, r in results.items()}))


if __name__ == "__main__":
    main()

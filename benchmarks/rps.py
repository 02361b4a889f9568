"""Stable-RPS vs depth pruning vs block sharing at the same parameter count, each healed
by the same distillation.

A trained tiny Llama (default: the 4-block, hidden-128 model of recipes/tiny_models.py)
keeps 50% and 25% of its block Linear weights three ways:
- `rps`: every block Linear reads one shared z of ratio 0.5 / 0.25 of those weights;
- `depth`: 2 / 3 of the 4 blocks removed (the least influential on calibration data);
- `share`: blocks in groups of 2 / 4 run one block's Linear weights (FoldGPT);
then each is distilled from the base with the same `distill` step (same losses, steps,
learning rate, data and seed). Every model is saved with `save_compressed`, reloaded,
and measured from the reload: held-out perplexity before and after distillation,
unique block Linear weights (shared ones once; RPS: z and the per-layer scales;
what the 50% / 25% refers to), all unique parameters (embeddings, head and norms
included, the same for all three) and the weights' size on disk. Library only (no
Prefect, no MLflow).

Usage: python benchmarks/rps.py [--model recipes/models/tiny-llama] [--steps 100] [--lr 0.002]
       [--eval 128] [--only METHOD,METHOD]
(without --model a tiny Llama is trained here first, as recipes/tiny_models.py does.)
Last line: one JSON object {method: {"ppl_before", "ppl", "block_weights", "params",
"size_mb", "seconds"}, ..., "base": {...}, "cpu": ..., "cpu_capability": ...}.
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
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.sharing.rps.linear import RPSLinear
from squeezeflow.compression.step import TrainingContext
from squeezeflow.evaluation.machine import cpu_model
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.evaluation.size import parameter_counts, weights_bytes
from squeezeflow.settings import apply_defaults, quiet_progress_bars
from squeezeflow.testing import tiny_llama, train_causal_lm

# Each method: the stage that compresses, as a recipe writes it (4 blocks assumed).
METHODS: dict[str, dict[str, Any]] = {
    "rps-50%": {"kind": "rps", "ratio": 0.5},
    "depth-50%": {"kind": "depth", "remove": 2},
    "share-50%": {"kind": "share", "group_size": 2},
    "rps-25%": {"kind": "rps", "ratio": 0.25},
    "depth-25%": {"kind": "depth", "remove": 3},
    "share-25%": {"kind": "share", "group_size": 4},
}


def block_weights(model: nn.Module) -> int:
    """Unique numbers behind the blocks' Linear weights (a shared Parameter once)."""
    _, blocks = find_blocks(model)
    unique: dict[int, int] = {}
    for module in blocks.modules():
        if isinstance(module, nn.Linear):
            unique[id(module.weight)] = module.weight.numel()
        elif isinstance(module, RPSLinear):
            unique[id(module.z)] = module.z.numel()
            unique[id(module.scale)] = module.scale.numel()
    return sum(unique.values())


def measure(folder: Path, evaluation: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    model = load_compressed(folder).model
    return {
        "ppl": round(perplexity(model, evaluation), 4),
        "block_weights": block_weights(model),
        "params": int(parameter_counts(model)["parameters"]),
        "size_mb": round(weights_bytes(folder) / 2**20, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a saved 4-block causal-LM folder")
    parser.add_argument("--steps", type=int, default=100, help="distillation steps of every method")
    parser.add_argument("--lr", type=float, default=2e-3, help="distillation learning rate")
    parser.add_argument("--eval", type=int, default=128, help="held-out sentences for perplexity")
    parser.add_argument("--only", default="", help="comma-separated methods to run (default: all)")
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()
    capability, cpu = torch.backends.cpu.get_cpu_capability(), cpu_model()
    print(f"{cpu}, capability {capability}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    if args.model is not None:
        loaded = load_compressed(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        print(f"base model {args.model}")
    else:  # the model recipes/tiny_models.py writes
        model, tokenizer = tiny_llama(hidden=128, layers=4, heads=4, intermediate=256)
        train_causal_lm(model, tokenizer, steps=200)
        print(f"trained a 128-wide 4-block Llama (200 steps) in {time.perf_counter() - start:.0f} s")
    methods = {m: s for m, s in METHODS.items() if not args.only or m in args.only.split(",")}
    calibration = list(tokenized_batches(sampledata.sentences(128, seed=11), tokenizer,
                                         batch_size=16, max_length=64))
    training = list(tokenized_batches(sampledata.sentences(256, seed=13), tokenizer,
                                      batch_size=16, max_length=64))
    evaluation = list(tokenized_batches(sampledata.sentences(args.eval, seed=12), tokenizer,
                                        batch_size=16, max_length=64))
    # the same healing for every method: the distill step's default losses (logits and
    # hidden states, evenly spaced block map), one learning rate, one budget, one seed
    distill = {"kind": "distill", "max_steps": args.steps, "lr": args.lr, "warmup_steps": 10}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        base_dir = save_compressed(model, tokenizer, "causal-lm", Path(scratch) / "base")
        results["base"] = measure(base_dir, evaluation)
        for method, step in methods.items():
            started = time.perf_counter()
            compressed = copy.deepcopy(model)
            run_stage_steps(compressed, [CATALOG.build(CATALOG.parse(step))], calibration)
            folder = save_compressed(compressed, tokenizer, "causal-lm", Path(scratch) / method)
            before = measure(folder, evaluation)["ppl"]
            student = load_compressed(folder).model  # a stage boundary, as `squeeze run` has
            context = TrainingContext(batches=training, folder=Path(scratch) / f"{method}-ckpt",
                                      teacher=base_dir, seed=0)
            run_stage_steps(student, [CATALOG.build(CATALOG.parse(distill))], training=context)
            healed = save_compressed(student, tokenizer, "causal-lm", Path(scratch) / f"{method}-healed")
            results[method] = {"ppl_before": before, **measure(healed, evaluation),
                               "seconds": round(time.perf_counter() - started, 1)}
            print(f"{method}: {results[method]}", flush=True)

    base = results["base"]
    print(f"\ndistill: {args.steps} steps, lr {args.lr}, 256 sentences, batch 16; perplexity on "
          f"{args.eval} held-out sentences; block weights = unique numbers behind the blocks' "
          "Linear weights")
    print(f"{'method':<12}{'ppl before':>11}{'ppl after':>10}{'after/base':>11}{'block w':>9}"
          f"{'of base':>8}{'params':>9}{'MB':>7}{'s':>7}")
    for method, r in results.items():
        print(f"{method:<12}{r.get('ppl_before', r['ppl']):>11.3f}{r['ppl']:>10.3f}"
              f"{r['ppl'] / base['ppl']:>11.3f}{r['block_weights']:>9}"
              f"{r['block_weights'] / base['block_weights']:>8.3f}{r['params']:>9}"
              f"{r['size_mb']:>7.3f}{r.get('seconds', 0):>7}")
    print(json.dumps({**results, "cpu": cpu, "cpu_capability": capability, "distill_steps": args.steps,
                      "lr": args.lr}))


if __name__ == "__main__":
    main()

"""Base vs compressed for the default recipe: size, latency and fidelity side by side.

Runs the recipe's stages with the library (no Prefect, no MLflow), then evaluates
base and compressed model on the recipe's evaluation data with more latency repeats
than the recipe uses. Usage: python benchmarks/default_recipe.py [RECIPE] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from squeezeflow.compression.artifact import load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import load_texts
from squeezeflow.compression.models import resolve_source
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.evaluation.suite import LatencySettings, evaluate
from squeezeflow.recipe import load_recipe
from squeezeflow.settings import apply_defaults, quiet_progress_bars

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "default.yaml"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()

    recipe = load_recipe(args.recipe)
    if recipe.needs_calibration():
        raise SystemExit("this benchmark runs recipes whose stages need no calibration data")
    base_dir = resolve_source(recipe.model.source, recipe.model.revision)
    start = time.perf_counter()
    loaded = load_compressed(base_dir)
    for stage in recipe.stages:
        run_stage_steps(loaded.model, [CATALOG.build(config) for config in stage.steps])
    compress_s = time.perf_counter() - start
    data = recipe.evaluation.data
    texts = load_texts(data.source, split=data.split, text_field=data.text_field,
                       num_samples=data.num_samples)
    settings = recipe.evaluation.model_copy(update={
        "latency": LatencySettings(warmup=5, repeats=args.repeats,
                                   batch_size=recipe.evaluation.latency.batch_size),
    })
    with tempfile.TemporaryDirectory() as scratch:
        candidate_dir = save_compressed(loaded.model, loaded.tokenizer, loaded.kind,
                                        Path(scratch) / "candidate")
        metrics = evaluate(base_dir, candidate_dir, texts, settings).metrics

    rows = [
        ("weights on disk (MB)", metrics["base_weights_mb"], metrics["weights_mb"]),
        ("latency p50 (ms)", metrics["base_latency_p50_ms"], metrics["latency_p50_ms"]),
        ("latency p95 (ms)", metrics["base_latency_p95_ms"], metrics["latency_p95_ms"]),
        ("peak memory (MB)", metrics["base_peak_memory_mb"], metrics["peak_memory_mb"]),
        ("parameters", metrics["base_parameters"], metrics["parameters"]),
    ]
    print(f"recipe {recipe.name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"compression took {compress_s:.2f} s")
    print(f"{'':24}{'base':>14}{'compressed':>14}")
    for label, base, compressed in rows:
        print(f"{label:24}{base:14.4g}{compressed:14.4g}")
    for name in ("fidelity_cosine", "fidelity_spearman", "fidelity_topk", "compression_ratio",
                 "speedup"):
        if name in metrics:
            print(f"{name:24}{'':14}{metrics[name]:14.4f}")
    keys = ("base_weights_mb", "weights_mb", "compression_ratio", "base_latency_p50_ms",
            "latency_p50_ms", "speedup", "base_peak_memory_mb", "peak_memory_mb",
            "fidelity_cosine", "fidelity_spearman", "fidelity_topk")
    print(json.dumps({key: round(metrics[key], 6) for key in keys if key in metrics}))


if __name__ == "__main__":
    main()

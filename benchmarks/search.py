"""Search wall time: serial vs a 2-worker Dask LocalCluster, and a sweep vs independent runs.

The sweep: a 4-block Llama (hidden 256, MLP 688, trained 100 steps on the sample
sentences), stage `prune` = sparsegpt 50% (calibrated on 64 x 64 tokens), stage
`quantize` = rtn (`--workload rtn`, default) or gptq (`--workload gptq`, a 6-block
hidden-384 Llama calibrated on 128 x 64 tokens) with bits {2, 3, 4, 8} x group_size
{32, 128}: 8 trials that vary only the last stage, objectives perplexity_ratio and
weights_mb, evaluated by the quality and size suites (32 sentences).

Cases, each in a fresh workspace and registry (so each computes the shared stage once),
each in its own process, timed from the first trial submitted to the search's end (the
Prefect server is started before the clock; the Dask cluster's start is inside it):
- serial:      `squeeze search --workers 1` (one trial at a time, a local process)
- dask:        `squeeze search --cluster dask --workers 2` (LocalCluster, 2 worker processes)
- independent: the same 8 trial recipes run one after another by the compress flow with
               `use_cache=False` (what a user does without search: every stage recomputed)

Goals (issue 13): dask >= 1.6x faster than serial; the sweep (serial) >= 3x faster than
independent. Run from the repository root:  .venv/bin/python benchmarks/search.py
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CASES = ("serial", "dask", "independent")
SPEEDUP_GOAL_DASK = 1.6
SPEEDUP_GOAL_SWEEP = 3.0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


# The sweep's shape: model size, calibration, and the searched (last) step.
# rtn: a cheap last stage (the shared sparsegpt stage is most of a trial's work);
# gptq: a last stage as heavy as the shared one (trials worth spreading over workers).
WORKLOADS: dict[str, dict[str, Any]] = {
    "rtn": {"hidden": 256, "layers": 4, "intermediate": 688, "samples": 64, "last": "rtn"},
    "gptq": {"hidden": 384, "layers": 6, "intermediate": 1024, "samples": 128, "last": "gptq"},
}


def write_inputs(folder: Path, workload: str) -> Path:
    """The trained model, the data files and the search recipe; returns the recipe."""
    from squeezeflow import sampledata
    from squeezeflow.testing import save_model, tiny_llama, train_causal_lm

    shape = WORKLOADS[workload]
    model, tokenizer = tiny_llama(hidden=shape["hidden"], layers=shape["layers"], heads=4,
                                  intermediate=shape["intermediate"])
    train_causal_lm(model, tokenizer, steps=100)
    save_model(model, tokenizer, folder / "model")
    samples, last = shape["samples"], shape["last"]
    (folder / "calibration.txt").write_text("\n".join(sampledata.sentences(samples, seed=1)) + "\n")
    (folder / "evaluation.txt").write_text("\n".join(sampledata.sentences(32, seed=2)) + "\n")
    recipe = {
        "name": "search-bench",
        "model": {"source": str(folder / "model")},
        "calibration": {"source": str(folder / "calibration.txt"), "num_samples": samples, "max_length": 64},
        # what a sweep over quality and size measures: perplexity and weights (no latency
        # or memory suites, which a user adds once the front is known)
        "evaluation": {"data": {"source": str(folder / "evaluation.txt"), "num_samples": 32,
                                "max_length": 64},
                       "suites": ["quality", "size"]},
        "stages": [
            {"name": "prune", "steps": [{"kind": "sparsegpt", "sparsity": 0.5}]},
            {"name": "quantize", "steps": [{"kind": last, "bits": 4, "group_size": 32}]},
        ],
        "registration": {"model_name": "search-bench"},
        "search": {
            "parameters": {f"quantize.{last}.bits": {"choices": [2, 3, 4, 8]},
                           f"quantize.{last}.group_size": {"choices": [32, 128]}},
            "objectives": [{"metric": "perplexity_ratio"}, {"metric": "weights_mb"}],
            "constraints": [{"metric": "perplexity_ratio", "max": 1.5}],
            "strategy": "grid",
        },
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_case(case: str, recipe_path: Path, folder: Path) -> dict[str, Any]:
    """One case in this process (called in a child): its seconds and figures."""
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["SQUEEZEFLOW_HOME"] = str(folder / ".squeezeflow")
    from squeezeflow.flows.search import run_search, share_servers

    share_servers(os.environ["MLFLOW_TRACKING_URI"])  # the Prefect server starts before the clock
    if case == "independent":
        return _independent(recipe_path, folder)
    start = time.perf_counter()
    result = run_search(str(recipe_path), cluster="dask" if case == "dask" else "local",
                        workers=2 if case == "dask" else 1)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "trials": len(result.outcomes), "failed": len(result.failed),
            "cache_hits": sum(o.cache_hits for o in result.outcomes),
            "stages_computed": sum(o.stages_computed for o in result.outcomes),
            "front_size": len(result.front), "trial_s": sum(o.seconds for o in result.outcomes)}


def _independent(recipe_path: Path, folder: Path) -> dict[str, Any]:
    from squeezeflow.compression.search.space import grid_points, trial_recipe
    from squeezeflow.flows.compress import compress
    from squeezeflow.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    assert recipe.search is not None
    base = yaml.safe_load(recipe_path.read_text())
    paths = []
    for number, point in enumerate(grid_points(recipe.search)):
        path = folder / f"trial-{number}.yaml"
        path.write_text(yaml.safe_dump(trial_recipe(base, recipe.search, point, number)))
        paths.append(path)
    start = time.perf_counter()
    for path in paths:
        compress(str(path), use_cache=False)
    return {"seconds": time.perf_counter() - start, "trials": len(paths), "failed": 0,
            "cache_hits": 0, "stages_computed": 2 * len(paths), "front_size": None, "trial_s": None}


def main(workload: str) -> None:
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch) / "inputs"
        inputs.mkdir()
        recipe_path = write_inputs(inputs, workload)
        results: dict[str, dict[str, Any]] = {}
        for case in CASES:
            folder = Path(scratch) / case
            folder.mkdir()
            done = subprocess.run(
                [sys.executable, __file__, "--case", case, str(recipe_path), str(folder)],
                capture_output=True, text=True, cwd=REPO,
            )
            if done.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{done.stdout[-3000:]}{done.stderr[-6000:]}")
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    dask_speedup = results["serial"]["seconds"] / results["dask"]["seconds"]
    sweep_speedup = results["independent"]["seconds"] / results["serial"]["seconds"]
    print(f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; workload {workload}: {WORKLOADS[workload]}; "
          f"sparsegpt 50% then {WORKLOADS[workload]['last']} bits x group_size, 8 trials")
    print(f"{'case':12s} {'seconds':>8s} {'trials':>6s} {'cache hits':>10s} {'stages run':>10s} "
          f"{'sum of trial s':>14s}")
    for case in CASES:
        row = results[case]
        trial_s = "" if row["trial_s"] is None else f"{row['trial_s']:.1f}"
        print(f"{case:12s} {row['seconds']:8.1f} {row['trials']:6d} {row['cache_hits']:10d} "
              f"{row['stages_computed']:10d} {trial_s:>14s}")
    print(f"dask vs serial: {dask_speedup:.2f}x (goal >= {SPEEDUP_GOAL_DASK}x, "
          f"{'met' if dask_speedup >= SPEEDUP_GOAL_DASK else 'NOT met'})")
    print(f"sweep vs independent recipes: {sweep_speedup:.2f}x (goal >= {SPEEDUP_GOAL_SWEEP}x, "
          f"{'met' if sweep_speedup >= SPEEDUP_GOAL_SWEEP else 'NOT met'})")
    print(json.dumps({
        "serial_s": round(results["serial"]["seconds"], 2), "dask_s": round(results["dask"]["seconds"], 2),
        "independent_s": round(results["independent"]["seconds"], 2),
        "trials": results["dask"]["trials"], "cache_hits": results["dask"]["cache_hits"],
        "front_size": results["dask"]["front_size"], "dask_speedup": round(dask_speedup, 3),
        "sweep_speedup": round(sweep_speedup, 3), "workload": workload,
        "cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
    }))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--workload", choices=sorted(WORKLOADS), default="rtn")
        main(parser.parse_args().workload)

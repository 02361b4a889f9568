"""Wall time of `squeeze validate recipes/default.yaml`, the command a user waits on.

Two cases, each the median of 5 runs of the installed `squeeze` entry point:
- cold: the model checks' cache is empty (a fresh folder per run), so validation
  builds the model on the meta device (imports torch and transformers' modeling code);
- warm: the model checks of this recipe are remembered (`squeezeflow/checkcache.py`),
  so validation imports neither.

Run from the repository root:  .venv/bin/python benchmarks/cli_speed.py
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SQUEEZE = Path(sys.executable).parent / "squeeze"
RECIPE = REPO / "recipes" / "default.yaml"
RUNS = 5  # a median of 5 is stable against one slow start on a shared machine


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def timed_validate(cache: Path) -> float:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    start = time.perf_counter()
    done = subprocess.run([str(SQUEEZE), "validate", str(RECIPE)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"squeeze validate failed:\n{done.stdout}{done.stderr}")
    return seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        cold = [timed_validate(Path(scratch) / f"cold{i}") for i in range(RUNS)]
        warm_cache = Path(scratch) / "warm"
        timed_validate(warm_cache)  # fills the cache
        warm = [timed_validate(warm_cache) for _ in range(RUNS)]
    load = os.getloadavg()[0]
    results = {
        "command": f"squeeze validate {RECIPE.relative_to(REPO)}",
        "cold_median_s": round(statistics.median(cold), 3),
        "warm_median_s": round(statistics.median(warm), 3),
        "cold_s": [round(s, 3) for s in cold],
        "warm_s": [round(s, 3) for s in warm],
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "load_average_1min": round(load, 2),  # other work on the machine slows every figure
    }
    print(f"squeeze validate recipes/default.yaml on {results['cpu']} "
          f"({results['cpu_capability']}, {results['cores']} cores, load {load:.2f})")
    print(f"{'case':<6} {'median s':>9}   runs (s)")
    for case in ("cold", "warm"):
        runs = " ".join(f"{s:.2f}" for s in results[f"{case}_s"])  # type: ignore[union-attr]
        print(f"{case:<6} {results[f'{case}_median_s']:>9.2f}   {runs}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

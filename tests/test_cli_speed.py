"""`squeeze validate` stays fast: it imports no torch, transformers models, mlflow, prefect,
lm_eval or torchao once the model checks of a recipe are remembered, and the remembered
result is the same as the checked one (an error stays an error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "default.yaml"
# What validation must not import: each costs seconds on a 2-core machine (torch alone
# ~2.5 s of CPU; transformers' quantizer registry pulls torchao, ~2 s more).
HEAVY = ("torch", "transformers.modeling_utils", "transformers.quantizers", "torchao",
         "mlflow", "prefect", "lm_eval", "datasets", "optuna", "gguf", "compressed_tensors")

# Runs `squeeze validate` in this process, then reports the exit code and the heavy
# modules it imported. The CLI's own entry point is the same `app`.
PROBE = """
import json, sys
from squeezeflow.cli import app
try:
    app(["validate", sys.argv[1]])
except SystemExit as exit:
    code = exit.code or 0
heavy = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
print(json.dumps({"exit": code, "heavy": heavy}))
"""


def _validate(recipe: Path, home: Path) -> tuple[dict[str, object], str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(home / "cache"), "SQUEEZEFLOW_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(recipe), json.dumps(HEAVY)],
        capture_output=True, text=True, env=env, cwd=home.parent, timeout=300,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result, done.stdout + done.stderr


def test_validate_remembers_model_checks_and_imports_nothing_heavy(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cold, cold_output = _validate(DEFAULT_RECIPE, home)
    assert cold["exit"] == 0, cold_output
    assert "torch" in cold["heavy"]  # the first check builds the model on the meta device
    warm, warm_output = _validate(DEFAULT_RECIPE, home)
    assert warm == {"exit": 0, "heavy": []}, warm_output
    assert warm_output.splitlines()[:3] == cold_output.splitlines()[:3]  # same report


def test_only_passed_checks_are_remembered(tmp_path: Path) -> None:
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    recipe["evaluation"]["data"]["source"] = str(DEFAULT_RECIPE.parent / "data" / "evaluation.txt")
    path = tmp_path / "recipe.yaml"
    home = tmp_path / "home"
    path.write_text(yaml.safe_dump(recipe))
    passed, output = _validate(path, home)
    assert passed["exit"] == 0, output
    # a typo in a step is a different key: checked in full (torch), rejected, not stored
    recipe["stages"][0]["steps"][0]["targets"] = ["*no_such_module*"]
    path.write_text(yaml.safe_dump(recipe))
    stored = sorted((home / "cache").rglob("*.json"))
    for _ in range(2):
        rejected, output = _validate(path, home)
        assert rejected["exit"] == 2 and "torch" in rejected["heavy"], output
        assert "'*no_such_module*' matches no module" in output
    assert sorted((home / "cache").rglob("*.json")) == stored

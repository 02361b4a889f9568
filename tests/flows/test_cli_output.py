"""What `squeeze run` prints, through the real CLI in a subprocess (the `make demo` path on
a tiny encoder): no warnings, no per-file bars, one screen, ending with the result table;
`--json` prints one JSON object and nothing else on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCREEN_LINES = 40  # one terminal screen
# What the test environment sets to quiet the libraries; the CLI must do it by itself.
LIBRARY_QUIETING = ("PREFECT_LOGGING_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
                    "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_CONFIGURE_LOGGING",
                    "TRANSFORMERS_VERBOSITY", "MPLCONFIGDIR")


def _squeeze(args: list[str], workdir: Path, columns: int = 120) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    env = {key: value for key, value in os.environ.items() if key not in LIBRARY_QUIETING}
    env |= {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": str(columns),
            "XDG_CACHE_HOME": str(workdir / "cache")}  # a fresh matplotlib font cache, too
    script = "import sys; from squeezeflow.cli import app; sys.argv = ['squeeze', *sys.argv[1:]]; app()"
    return subprocess.run([sys.executable, "-c", script, *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


def _recipe(workdir: Path, model_dir: Path, evaluation: Path) -> Path:
    recipe = {  # recipes/default.yaml on the tiny encoder: same steps, gates, registration
        "name": "tiny-int8",
        "model": {"source": str(model_dir)},
        "evaluation": {"data": {"source": str(evaluation), "num_samples": 16, "max_length": 32},
                       "latency": {"warmup": 1, "repeats": 3, "batch_size": 4}},
        "stages": [{"name": "quantize", "steps": [
            {"kind": "rtn", "bits": 8, "group_size": None, "symmetric": True}]}],
        "gates": [{"metric": "fidelity_cosine", "min": 0.99}, {"metric": "fidelity_topk", "min": 0.5}],
        "registration": {"model_name": "tiny-compressed", "alias": "candidate"},
    }
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_run_output_is_quiet_and_ends_with_the_result_table(
    workdir: Path, tiny_bert_dir: Path, text_files: dict[str, Path], prefect_server: None,
) -> None:
    path = _recipe(workdir, tiny_bert_dir, text_files["evaluation"])
    done = _squeeze(["run", str(path)], workdir)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert not [line for line in lines if "warning" in line.lower()], output
    assert "Downloading artifacts" not in output and "Starting temporary server" not in output
    assert len(lines) <= SCREEN_LINES, output
    assert "registered tiny-compressed version 1; gates passed; aliases: candidate" in output
    assert "pass fidelity_cosine >= 0.99" in output
    # the phases showed as bars: the stage, evaluation and registering, each finished
    assert any(line.startswith("stage quantize") for line in lines), output
    assert any(line.startswith("evaluation") for line in lines), output
    # the last lines are the result table: title, header, base vs candidate rows, border
    stdout = [line for line in done.stdout.splitlines() if line.strip()]
    title = max(i for i, line in enumerate(stdout) if line.strip() == "result")
    table = stdout[title:]
    assert "metric" in table[2] and "base" in table[2] and "candidate / base" in table[2]
    rows = {line.split("│")[1].strip(): line for line in table if line.count("│") == 5}
    assert {"fidelity cosine", "weights (MB)", "latency p50 (ms)"} <= set(rows), table
    assert table[-1].strip().startswith("└")  # nothing after the table
    log_files = list((workdir / ".squeezeflow" / "logs").glob("tiny-int8-*.log"))
    assert len(log_files) == 1 and log_files[0].stat().st_size > 0  # the logs went there

    # `make demo` then lists the version: at 80 columns its row is whole, and there is
    # no search column when no version came from a search
    listing = _squeeze(["list", "tiny-compressed"], workdir, columns=80)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    listed = [line for line in listing.stdout.splitlines() if line.strip()]
    assert all(len(line) <= 80 for line in listed) and "search" not in listed[0], listing.stdout
    row = next(line for line in listed if line.startswith("tiny-compressed"))
    cells = row.split()
    assert cells[:5] == ["tiny-compressed", "1", "candidate", "passed", "cos"], row
    assert float(cells[5]) >= 0.99  # the quality headline, whole

    again = _squeeze(["run", str(path), "--json"], workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    printed = again.stdout.strip().splitlines()
    assert len(printed) == 1, again.stdout
    summary = json.loads(printed[0])
    assert summary["version"] == "2" and summary["stages"][0]["reused"] is True
    assert summary["metrics"]["fidelity_cosine"] > 0.99
    assert [gate["passed"] for gate in summary["gates"]] == [True, True]

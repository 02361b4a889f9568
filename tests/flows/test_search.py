"""`squeeze search`: the recipe section, trial recipes, a grid search on a Dask
LocalCluster checked against a brute-force Pareto front, and a SIGKILLed search resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from squeezeflow.cli import app
from squeezeflow.compression.search.space import grid_points, trial_key, trial_recipe
from squeezeflow.recipe import RecipeError, parse_recipe

NAME = "tiny-llama-search"
BITS = [2, 3, 4]
GROUPS = [32, 64]
MAX_RATIO = 1.1  # the constraint: at most 10% worse perplexity than the base


def search_recipe(model_dir: Path, text_files: dict[str, Path], **search: Any) -> dict[str, Any]:
    return {
        "name": NAME,
        "model": {"source": str(model_dir)},
        "evaluation": {
            "data": {"source": str(text_files["evaluation"]), "num_samples": 16},
            "max_length": 32,
            "suites": ["quality", "size"],  # the objectives' metrics; latency would triple a trial
        },
        "stages": [{"name": "quantize", "steps": [{"kind": "rtn", "bits": 4, "group_size": 64}]}],
        "registration": {"model_name": NAME},
        "search": {
            "parameters": {"quantize.rtn.bits": {"choices": BITS},
                           "quantize.rtn.group_size": {"choices": GROUPS}},
            "objectives": [{"metric": "perplexity_ratio"}, {"metric": "weights_mb"}],
            "constraints": [{"metric": "perplexity_ratio", "max": MAX_RATIO}],
        } | search,
    }


@pytest.fixture
def untrained_llama(tmp_path: Path) -> Path:
    from squeezeflow.testing import save_model, tiny_llama

    model, tokenizer = tiny_llama()
    return save_model(model, tokenizer, tmp_path / "llama")


# ----- fast: validation and trial recipes ---------------------------------------------


def test_search_errors_name_the_field(untrained_llama: Path, text_files: dict[str, Path]) -> None:
    raw = search_recipe(untrained_llama, text_files)
    cases = {
        "search.parameters.dequant.rtn.bits: no stage 'dequant'; stages: quantize":
            {"dequant.rtn.bits": {"choices": [4]}},
        "search.parameters.quantize.rtn.bitz: rtn has no field 'bitz'":
            {"quantize.rtn.bitz": {"choices": [4]}},
        "search.parameters.quantize.gptq.bits: stage 'quantize': no step 'gptq'":
            {"quantize.gptq.bits": {"choices": [4]}},
        "search.parameters.quantize.rtn.bits: value 99 is invalid":
            {"quantize.rtn.bits": {"choices": [4, 99]}},
    }
    for expected, parameters in cases.items():
        with pytest.raises(RecipeError) as error:
            parse_recipe({**raw, "search": {**raw["search"], "parameters": parameters}})
        assert expected in str(error.value), str(error.value)
    with pytest.raises(RecipeError, match=r"search.objectives.0: metric: unknown metric 'perplexityy'"):
        parse_recipe({**raw, "search": {**raw["search"], "objectives": [{"metric": "perplexityy"}]}})
    with pytest.raises(RecipeError, match="unknown strategy 'annealing'"):
        parse_recipe({**raw, "search": {**raw["search"], "strategy": "annealing"}})


def test_search_section_leaves_other_recipes_hash_alone_and_run_refuses_it(
        untrained_llama: Path, text_files: dict[str, Path], tmp_path: Path) -> None:
    raw = search_recipe(untrained_llama, text_files)
    plain = {key: value for key, value in raw.items() if key != "search"}
    recipe = parse_recipe(plain)
    assert "search" not in recipe.as_mapping()  # the hash of a recipe without search is as before
    assert parse_recipe(raw).sha256() != recipe.sha256()

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    validated = CliRunner().invoke(app, ["validate", str(path)])
    assert validated.exit_code == 0, validated.output
    assert "search grid: 6 points in the space" in validated.output
    refused = CliRunner().invoke(app, ["run", str(path)])
    assert refused.exit_code == 2
    assert "squeeze search" in refused.output


def test_trial_recipes_of_a_grid(untrained_llama: Path, text_files: dict[str, Path]) -> None:
    recipe = parse_recipe(search_recipe(untrained_llama, text_files))
    assert recipe.search is not None
    points = grid_points(recipe.search)
    trials = [trial_recipe(recipe.as_mapping(), recipe.search, point, n) for n, point in enumerate(points)]
    steps = [parse_recipe(raw).stages[0].steps[0] for raw in trials]
    assert sorted((step.bits, step.group_size) for step in steps) == sorted(  # type: ignore[attr-defined]
        (b, g) for b in BITS for g in GROUPS)
    assert all(parse_recipe(raw).search is None for raw in trials)
    assert len({trial_key(raw) for raw in trials}) == 6
    # the key ignores the description: the same point numbered differently is the same trial
    again = trial_recipe(recipe.as_mapping(), recipe.search, points[0], 99)
    assert trial_key(again) == trial_key(trials[0])


# ----- slow: real searches ------------------------------------------------------------


def brute_force_front(rows: dict[int, dict[str, float]]) -> set[int]:
    """Trials no other trial beats: <= in both (lower is better) and < in one."""
    def beats(a: dict[str, float], b: dict[str, float]) -> bool:
        keys = ("perplexity_ratio", "weights_mb")
        return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)

    return {n for n, row in rows.items() if not any(beats(other, row) for m, other in rows.items() if m != n)}


def trial_runs(search_id: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(search_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{search_id}'")


def share_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search exports these for its workers; restore them after the test."""
    from prefect.settings import get_current_settings

    monkeypatch.setenv("PREFECT_API_URL", str(get_current_settings().api.url))
    for key in ("MLFLOW_TRACKING_URI", "SQUEEZEFLOW_HOME"):
        monkeypatch.setenv(key, os.environ[key])


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_grid_search_on_dask_matches_brute_force(workdir: Path, trained_llama_dir: Path,
                                                 text_files: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    share_environment(monkeypatch)
    path = workdir / "search.yaml"
    path.write_text(yaml.safe_dump(search_recipe(trained_llama_dir, text_files)))
    printed = CliRunner().invoke(app, ["search", str(path), "--cluster", "dask", "--workers", "2", "--json"])
    assert printed.exit_code == 0, printed.output
    result = json.loads(printed.stdout.strip().splitlines()[-1])

    assert not result["failed"]
    assert len(result["trials"]) == 6
    runs = trial_runs(result["search_id"])
    assert len(runs) == 6 and all(run.info.status == "FINISHED" for run in runs)
    rows = {int(run.data.tags["squeezeflow.search.trial"]): run.data.metrics for run in runs}
    values = {int(run.data.tags["squeezeflow.search.trial"]): run.data.params for run in runs}
    assert sorted((int(v["quantize.rtn.bits"]), int(v["quantize.rtn.group_size"]))
                  for v in values.values()) == sorted((b, g) for b in BITS for g in GROUPS)

    front = set(result["front"])  # trial numbers
    assert front == brute_force_front(rows)
    on_front = {int(run.data.tags["squeezeflow.search.trial"]) for run in runs
                if run.data.tags.get("squeezeflow.search.front") == "true"}
    assert on_front == front

    passing = {n: row for n, row in rows.items() if row["perplexity_ratio"] <= MAX_RATIO}
    assert passing, rows  # 4-bit RTN stays within 10% on the trained model
    best = min(passing, key=lambda n: (passing[n]["perplexity_ratio"], passing[n]["weights_mb"]))
    assert result["registered"] is not None
    version = MlflowClient().get_model_version(NAME, result["registered"]["version"])
    assert version.tags["squeezeflow.search"] == result["search_id"]
    assert version.tags["squeezeflow.search.trial"] == str(best)
    registered_metrics = MlflowClient().get_run(version.run_id).data.metrics
    assert registered_metrics["perplexity_ratio"] == pytest.approx(rows[best]["perplexity_ratio"])


def checkpoint_folders(workdir: Path) -> set[str]:
    folder = workdir / ".squeezeflow" / "checkpoints"
    return {path.name for path in folder.iterdir() if path.is_dir() and (path / "stage.json").exists()}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_killed_search_resumes_with_only_the_missing_trials(
        workdir: Path, trained_llama_dir: Path, text_files: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    share_environment(monkeypatch)
    path = workdir / "search.yaml"
    path.write_text(yaml.safe_dump(search_recipe(trained_llama_dir, text_files)))
    squeeze = [sys.executable, "-m", "squeezeflow.cli", "search", str(path), "--workers", "1"]
    process = subprocess.Popen(squeeze, cwd=workdir, env=dict(os.environ), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    from mlflow import MlflowClient

    client = MlflowClient()
    deadline = time.monotonic() + 150
    finished: list[Any] = []
    while time.monotonic() < deadline and process.poll() is None:
        experiment = client.get_experiment_by_name("squeezeflow")
        if experiment is not None:
            finished = client.search_runs([experiment.experiment_id],
                                          "tags.`squeezeflow.search.trial` != '' and attributes.status = 'FINISHED'")
            if len(finished) >= 2:
                break
        time.sleep(0.3)
    assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
    os.killpg(process.pid, signal.SIGKILL)  # the search and its worker processes
    process.wait(timeout=30)
    experiment = client.get_experiment_by_name("squeezeflow")
    assert experiment is not None
    done_before = client.search_runs([experiment.experiment_id],
                                     "tags.`squeezeflow.search.trial` != '' and attributes.status = 'FINISHED'")
    assert 2 <= len(done_before) < 6
    stages_before = checkpoint_folders(workdir)

    resumed = CliRunner().invoke(app, ["search", str(path), "--resume", "--workers", "1", "--json"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])  # MLflow's notes go to stderr
    assert summary["resumed"] == len(done_before)
    assert len(summary["trials"]) == 6
    search_id = done_before[0].data.tags["squeezeflow.search"]
    assert summary["search_id"] == search_id
    runs = trial_runs(search_id)
    assert len(runs) == 6 and all(run.info.status == "FINISHED" for run in runs)
    assert len({run.data.tags["squeezeflow.search.key"] for run in runs}) == 6
    # only the missing trials ran, each trial's stage was computed once over both runs
    ran_now = [t for t in summary["trials"] if t["run_id"] not in {r.info.run_id for r in done_before}]
    assert len(ran_now) == 6 - len(done_before)
    stages_after = checkpoint_folders(workdir)
    assert len(stages_after) == 6
    computed_now = sum(t["stages_computed"] for t in ran_now)
    assert computed_now == len(stages_after - stages_before)
    kept = {t["run_id"] for t in summary["trials"]} - {t["run_id"] for t in ran_now}
    assert kept == {run.info.run_id for run in done_before}  # the earlier trials, not rerun


def test_goals_and_task_runners() -> None:
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from squeezeflow.compression.search.space import TrialOutcome
    from squeezeflow.compression.search.spec import SearchSpec
    from squeezeflow.flows.search import _goals_met, task_runner

    spec = SearchSpec.model_validate({
        "parameters": {"quantize.rtn.bits": {"choices": [2, 4]}},
        "objectives": [{"metric": "perplexity_ratio", "target": 1.05}, {"metric": "weights_mb"}],
        "stop_when": "goals_met",
    })

    def outcome(ratio: float, passed: bool) -> TrialOutcome:
        return TrialOutcome(number=0, key="k", values={}, passed=passed,
                            metrics={"perplexity_ratio": ratio, "weights_mb": 1.0})

    assert not _goals_met(spec, [outcome(1.2, True), outcome(1.01, False)])  # target missed / a gate failed
    assert _goals_met(spec, [outcome(1.2, True), outcome(1.01, True)])

    assert isinstance(task_runner("local", 3), ProcessPoolTaskRunner)
    serial = task_runner("local", 1)  # one trial at a time: in the search's process
    assert isinstance(serial, ThreadPoolTaskRunner) and serial._max_workers == 1
    local = task_runner("dask", 3)
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                    "dashboard_address": None}
    team = task_runner("dask", 3, address="tcp://10.0.0.5:8786")
    assert isinstance(team, DaskTaskRunner) and team.address == "tcp://10.0.0.5:8786"

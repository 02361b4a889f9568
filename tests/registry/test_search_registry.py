"""A search's MLflow record: parent run, nested trial runs, resume, Pareto front, best version."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from mlflow import MlflowClient
from typer.testing import CliRunner

from squeezeflow.cli import app
from squeezeflow.compression.search.space import TrialOutcome
from squeezeflow.compression.search.spec import Objective
from squeezeflow.evaluation.gates import GateResult
from squeezeflow.registry import search as registry_search
from squeezeflow.registry.records import RunRecord, StageRecord
from squeezeflow.registry.search import (
    FRONT_TAG,
    finish_search,
    finished_trials,
    latest_unfinished_search,
    log_trial,
    register_best,
    start_search,
)

EXPERIMENT = "search-tests"
OBJECTIVES = (Objective(metric="perplexity_ratio", goal="minimize"), Objective(metric="weights_mb"))
SPEC = {
    "parameters": {"quantize.rtn.bits": {"choices": [2, 3, 4, 8]}},
    "objectives": [{"metric": "perplexity_ratio", "goal": "minimize"}, {"metric": "weights_mb"}],
    "constraints": [{"metric": "perplexity_ratio", "max": 1.2}],
    "strategy": "grid",
}


def record(model_dir: Path, metrics: dict[str, float]) -> dict[str, object]:
    return RunRecord(
        recipe_name="tiny-sweep", recipe={"name": "tiny-sweep", "stages": [{"name": "quantize"}]},
        recipe_sha256="a" * 64, model_name="tiny-sweep", experiment=EXPERIMENT, tracking_uri=None,
        alias="candidate", base_model="base", base_sha256="b" * 64, kind="encoder",
        data_sha256={"evaluation": "c" * 64},
        stages=[StageRecord(name="quantize", checkpoint_sha256="d" * 64, seconds=1.0)],
        metrics=metrics,
        gate_results=[GateResult(gate="perplexity_ratio <= 1.2", value=metrics["perplexity_ratio"],
                                 passed=True)],
        model_dir=str(model_dir), candidate_sha256="f" * 64, code_version="0",
    ).model_dump(mode="json")


def outcomes(model_dir: Path) -> list[TrialOutcome]:
    """Four trials: 2 bits is smallest but fails the constraint; 8 bits is best in quality;
    `3 bits + mlp 8` is dominated by 4 bits (worse quality, larger)."""
    rows = [  # bits, perplexity_ratio, weights_mb, speedup, passed
        ({"quantize.rtn.bits": 2}, 1.90, 0.20, 1.4, False),
        ({"quantize.rtn.bits": 3, "quantize.rtn[*mlp*].bits": 8}, 1.15, 0.50, 1.1, True),
        ({"quantize.rtn.bits": 4}, 1.05, 0.40, 1.3, True),
        ({"quantize.rtn.bits": 8}, 1.01, 0.75, 1.0, True),
    ]
    trials = []
    for number, (values, ratio, size, speedup, passed) in enumerate(rows):
        metrics = {"perplexity_ratio": ratio, "weights_mb": size, "speedup": speedup}
        trials.append(TrialOutcome(
            number=number, key=f"key{number}", values=values, metrics=metrics, passed=passed,
            cache_hits=number, stages_computed=2 - number % 2, seconds=1.5 + number,
            record=record(model_dir, metrics),
        ))
    return trials


def brute_force_front(trials: list[TrialOutcome]) -> list[int]:
    """Trials no other trial beats: both objectives are minimized here."""
    scores = [tuple(trial.metrics[o.metric] for o in OBJECTIVES) for trial in trials]

    def dominated(b: tuple[float, ...]) -> bool:
        return any(all(x <= y for x, y in zip(a, b, strict=True)) and a != b for a in scores)

    return [i for i, score in enumerate(scores) if not dominated(score)]


def test_search_logs_resumes_finishes_and_registers_its_best_trial(workdir: Path,
                                                                   tiny_bert_dir: Path) -> None:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    search_id = start_search(uri, EXPERIMENT, "tiny-sweep", SPEC, "s" * 64)
    parent = client.get_run(search_id)
    assert parent.data.tags["squeezeflow.search"] == search_id
    assert parent.data.tags["squeezeflow.recipe_sha256"] == "s" * 64
    assert parent.data.params["parameters.quantize.rtn.bits.choices.3"] == "8"
    assert parent.data.params["constraints.0.max"] == "1.2"
    assert latest_unfinished_search(uri, EXPERIMENT, "tiny-sweep") == search_id
    assert latest_unfinished_search(uri, EXPERIMENT, "other-sweep") is None

    trials = outcomes(tiny_bert_dir)
    run_ids = [log_trial(uri, search_id, trial) for trial in trials[:3]]
    # a trial whose logging was killed halfway: a RUNNING nested run with trial 3's key
    client.create_run(parent.info.experiment_id, tags={
        "mlflow.parentRunId": search_id, "squeezeflow.search.key": "key3"})
    assert [t.number for t in finished_trials(uri, search_id)] == [0, 1, 2]

    # the search is killed here; resuming reopens the same parent and logs the missing trial
    client.set_terminated(search_id, status="KILLED")
    assert start_search(uri, EXPERIMENT, "tiny-sweep", SPEC, "s" * 64, resume=search_id) == search_id
    assert client.get_run(search_id).info.status == "RUNNING"
    assert log_trial(uri, search_id, trials[1]) == run_ids[1]  # logged already: not twice
    run_ids.append(log_trial(uri, search_id, trials[3]))
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{search_id}'")
    assert sorted(run.info.run_id for run in nested) == sorted(run_ids)  # the half-logged one is gone
    trial_run = client.get_run(run_ids[1])
    assert trial_run.data.params == {"quantize.rtn.bits": "3", "quantize.rtn__mlp__.bits": "8"}
    assert trial_run.data.metrics["perplexity_ratio"] == 1.15
    assert trial_run.data.tags["squeezeflow.search.cache_hits"] == "1"
    assert trial_run.data.tags["squeezeflow.search.passed"] == "true"

    logged = [trial.model_copy(update={"run_id": run_id})
              for trial, run_id in zip(trials, run_ids, strict=True)]
    assert finished_trials(uri, search_id) == logged

    front = finish_search(uri, search_id, logged, OBJECTIVES)
    assert front == brute_force_front(logged) == [0, 2, 3]
    for index, run_id in enumerate(run_ids):
        assert client.get_run(run_id).data.tags[FRONT_TAG] == str(index in front).lower()
    assert client.get_run(search_id).info.status == "FINISHED"
    artifacts = Path(client.download_artifacts(search_id, "", str(workdir / "parent")))
    for name in ("pareto.md", "plots/quality_vs_size.png", "plots/quality_vs_speed.png"):
        assert (artifacts / name).stat().st_size > 0, name
    with (artifacts / "pareto.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["trial"], row["front"], row["passed"]) for row in rows] == [
        ("0", "yes", "no"), ("2", "yes", "yes"), ("3", "yes", "yes"), ("1", "no", "yes")]
    assert [float(row["weights_mb"]) for row in rows] == [0.20, 0.40, 0.75, 0.50]
    assert rows[3]["quantize.rtn[*mlp*].bits"] == "8" and rows[0]["quantize.rtn[*mlp*].bits"] == ""

    # finished: no longer resumable; a new search of the same name is
    assert latest_unfinished_search(uri, EXPERIMENT, "tiny-sweep") is None
    second = start_search(uri, EXPERIMENT, "tiny-sweep", SPEC, "s" * 64)
    assert latest_unfinished_search(uri, EXPERIMENT, "tiny-sweep") == second != search_id

    # the best passing trial: 8 bits (trial 0 is better in size but failed its constraint)
    registered = register_best(logged, OBJECTIVES, search_id)
    assert registered is not None and registered.aliases == ["candidate"]
    version = client.get_model_version("tiny-sweep", registered.version)
    assert version.tags["squeezeflow.search"] == search_id
    assert version.tags["squeezeflow.search.trial"] == "3"
    assert client.get_run(version.run_id).data.metrics["perplexity_ratio"] == 1.01
    listing = CliRunner().invoke(app, ["list", "tiny-sweep", "--tracking-uri", uri])
    assert listing.exit_code == 0 and search_id[:8] in listing.output, listing.output

    failed = [trial.model_copy(update={"passed": False}) for trial in logged]
    assert register_best(failed, OBJECTIVES, search_id) is None


def test_a_new_search_logs_a_trial_without_looking_for_earlier_ones_unless_it_retries(
    workdir: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("SQUEEZEFLOW_REGISTRY_RETRY_DELAYS", "0")  # one retry, no pause
    lookups: list[str] = []
    look = registry_search._trial_runs
    monkeypatch.setattr(registry_search, "_trial_runs",
                        lambda client, search_id: lookups.append(search_id) or look(client, search_id))
    search_id = start_search(uri, EXPERIMENT, "tiny-sweep", SPEC, "s" * 64)
    trials = outcomes(tiny_bert_dir)
    log_trial(uri, search_id, trials[0], new_search=True)
    assert lookups == []
    log_trial(uri, search_id, trials[1])  # a resumed search looks
    assert lookups == [search_id]

    # the first attempt fails after its run was created: the retry finds and replaces it
    texts = registry_search._log_texts
    failures = [sqlalchemy.exc.OperationalError("INSERT", None, Exception("database is locked"))]

    def flaky(*args: Any) -> None:
        if failures:
            raise failures.pop()
        texts(*args)

    monkeypatch.setattr(registry_search, "_log_texts", flaky)
    run_id = log_trial(uri, search_id, trials[2], new_search=True)
    assert lookups == [search_id, search_id]
    client = MlflowClient(uri)
    nested = client.search_runs([client.get_run(search_id).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{search_id}'")
    assert sorted(run.data.tags["squeezeflow.search.key"] for run in nested) == ["key0", "key1", "key2"]
    assert client.get_run(run_id).info.status == "FINISHED"

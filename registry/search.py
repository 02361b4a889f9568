"""A search in MLflow: one parent run, a nested run per trial, the Pareto front, the best version.

The parent run is the search's identity (`squeezeflow.search` = its run id): a killed
search is resumed by reopening it, and the trials already logged under it (nested runs
FINISHED, each with its outcome as `outcome.json`) are not run again. Finishing writes
the Pareto table and plots to the parent, tags the front's trial runs and ends the
parent FINISHED; `register_best` registers the best trial that passed every constraint
the way the compress flow registers its candidate (registry/runs.py).

Calls that fail on a transient registry error (registry/runs.py `is_transient`) are
retried with the pauses of `RetryPolicy`; each is safe to repeat (a trial is found by
its key before it is logged again).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from squeezeflow.compression.search.pareto import best_index, pareto_front
from squeezeflow.compression.search.space import TrialOutcome, describe
from squeezeflow.compression.search.spec import Objective
from squeezeflow.evaluation.metrics import METRICS, headline_quality
from squeezeflow.registry.records import RegisteredVersion, RunRecord
from squeezeflow.registry.runs import (
    TAG_PREFIX,
    RetryPolicy,
    _log_metrics,
    _log_params,
    _log_texts,
    _metric_key,
    flatten,
    is_transient,
    log_and_register,
)
from squeezeflow.registry.store import connect, experiment_id

log = logging.getLogger(__name__)

SEARCH_TAG = TAG_PREFIX + "search"  # the parent run id, on the parent, its trials and the version
NAME_TAG = TAG_PREFIX + "search.name"  # on the parent only: how an unfinished search is found
TRIAL_TAG = TAG_PREFIX + "search.trial"  # the trial number
KEY_TAG = TAG_PREFIX + "search.key"  # the trial recipe's content address (space.trial_key)
FRONT_TAG = TAG_PREFIX + "search.front"  # "true" on the front's trials, "false" on the others
OUTCOME_FILE = "outcome.json"  # the TrialOutcome, exactly, for a resumed search
SIZE_METRIC = "weights_mb"
SPEED_METRICS = ("speedup", "decode_speedup", "decode_tokens_per_s")  # first measured one is plotted

T = TypeVar("T")


def start_search(tracking_uri: str | None, experiment: str, search_name: str,
                 spec: dict[str, Any], recipe_sha256: str, resume: str | None = None) -> str:
    """Parent MLflow run id of the search (a new one, or `resume`'s id reopened).
    Tags: squeezeflow.search=<its own id>, recipe name/sha; params: the spec (flattened)."""
    client = connect(tracking_uri)
    params = {_metric_key(key): value for key, value in flatten(spec).items()}

    def start() -> str:
        if resume is None:
            run = client.create_run(
                experiment_id(client, experiment),
                tags={"mlflow.runName": f"search {search_name}", NAME_TAG: search_name,
                      TAG_PREFIX + "recipe": search_name, TAG_PREFIX + "recipe_sha256": recipe_sha256},
            )
        else:
            run = _reopen(client, resume, search_name, recipe_sha256)
        run_id = run.info.run_id
        client.set_tag(run_id, SEARCH_TAG, run_id)
        logged = run.data.params  # a resumed search keeps the spec it started with
        for key, value in params.items():
            if key in logged and logged[key] != value:
                log.warning("search %s: param %s is now %r; the run keeps %r", run_id, key, value,
                            logged[key])
        _log_params(client, run_id, {key: value for key, value in params.items() if key not in logged})
        return run_id

    return _retrying(f"starting search {search_name}", start)


def _reopen(client: MlflowClient, run_id: str, search_name: str, recipe_sha256: str) -> Run:
    run = client.get_run(run_id)
    name = run.data.tags.get(NAME_TAG)
    if name != search_name:
        raise ValueError(f"run {run_id} is not a search of {search_name!r} "
                         f"({'search ' + repr(name) if name else 'no search'})")
    if run.data.tags.get(TAG_PREFIX + "recipe_sha256") != recipe_sha256:
        log.warning("search %s resumes with a changed recipe; finished trials are kept by their key",
                    run_id)
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    log.info("search %s resumed", run_id)
    return run


def latest_unfinished_search(tracking_uri: str | None, experiment: str, search_name: str) -> str | None:
    """The newest search of `search_name` whose parent run did not end FINISHED (killed,
    failed or still running), or None."""
    client = connect(tracking_uri)

    def find() -> str | None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs(
            [found.experiment_id],
            f"tags.`{NAME_TAG}` = '{_quoted(search_name)}' and attributes.status != 'FINISHED'",
            ViewType.ACTIVE_ONLY, max_results=1, order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    return _retrying(f"looking up search {search_name}", find)


def finished_trials(tracking_uri: str | None, search_id: str) -> list[TrialOutcome]:
    """Outcomes of the trials already logged (nested runs with status FINISHED), by number."""
    client = connect(tracking_uri)

    def read() -> list[TrialOutcome]:
        outcomes = []
        for run in _trial_runs(client, search_id):
            if run.info.status != "FINISHED":
                continue  # its log_trial did not complete: the trial runs again
            with tempfile.TemporaryDirectory() as folder:
                path = client.download_artifacts(run.info.run_id, OUTCOME_FILE, folder)
                outcomes.append(TrialOutcome.model_validate_json(Path(path).read_text()))
        return sorted(outcomes, key=lambda outcome: outcome.number)

    return _retrying(f"reading the trials of search {search_id}", read)


def log_trial(tracking_uri: str | None, search_id: str, outcome: TrialOutcome,
              new_search: bool = False) -> str:
    """One nested run under the parent: params = the trial's values, its metrics, tags
    (key, number, passed, cache hits, stages computed, seconds) and `outcome.json` (the
    outcome with `run_id` set to this run). Returns the run id.

    A trial logged before under the same key is reused when FINISHED, else replaced.
    `new_search`: the parent run was created by this search, so a first attempt has no
    earlier trial runs to look for (a query per trial saved); a retry still looks."""
    client = connect(tracking_uri)
    attempts: list[int] = []

    def log_once() -> str:
        attempts.append(1)
        earlier = [] if new_search and len(attempts) == 1 else _trial_runs(client, search_id)
        for run in earlier:
            if run.data.tags.get(KEY_TAG) != outcome.key:
                continue
            if run.info.status == "FINISHED":
                return run.info.run_id
            client.delete_run(run.info.run_id)  # a half-logged earlier attempt
        parent = client.get_run(search_id)
        run = client.create_run(parent.info.experiment_id, tags={
            "mlflow.parentRunId": search_id,
            "mlflow.runName": f"trial {outcome.number}: {describe(outcome.values)}"[:250],
            SEARCH_TAG: search_id,
            TRIAL_TAG: str(outcome.number),
            KEY_TAG: outcome.key,
            TAG_PREFIX + "search.passed": str(outcome.passed).lower(),
            TAG_PREFIX + "search.cache_hits": str(outcome.cache_hits),
            TAG_PREFIX + "search.stages_computed": str(outcome.stages_computed),
            TAG_PREFIX + "search.seconds": f"{outcome.seconds:.3f}",
        })
        run_id = run.info.run_id
        try:
            _log_params(client, run_id, {_metric_key(name): json.dumps(value)
                                         for name, value in outcome.values.items()})
            _log_metrics(client, run_id, outcome.metrics)
            logged = outcome.model_copy(update={"run_id": run_id})
            _log_texts(client, run_id, {OUTCOME_FILE: logged.model_dump_json(indent=2)})
            client.set_terminated(run_id)
        except Exception:
            _mark_failed(client, run_id)  # not FINISHED: the next attempt replaces it
            raise
        return run_id

    return _retrying(f"logging trial {outcome.number} of search {search_id}", log_once)


def finish_search(tracking_uri: str | None, search_id: str, outcomes: list[TrialOutcome],
                  objectives: Sequence[Objective]) -> list[int]:
    """Write the Pareto table (pareto.md, pareto.csv) and the quality-vs-size (and, when
    measured, quality-vs-speed) plots to the parent run, tag every trial run
    `squeezeflow.search.front`, and end the parent FINISHED. Returns the front's indices
    into `outcomes` (the flow publishes the same table as a Prefect artifact)."""
    client = connect(tracking_uri)
    front = pareto_front([outcome.metrics for outcome in outcomes], objectives)
    on_front = set(front)
    rows = pareto_rows(outcomes, objectives, front)
    markdown = pareto_markdown(rows, len(front))

    def finish() -> None:
        run_ids = {run.data.tags.get(KEY_TAG): run.info.run_id for run in _trial_runs(client, search_id)}
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "pareto.md").write_text(markdown)
            (Path(folder) / "pareto.csv").write_text(_csv(rows))
            pareto_plots(outcomes, objectives, front, Path(folder) / "plots")
            client.log_artifacts(search_id, folder)
        for index, outcome in enumerate(outcomes):
            run_id = outcome.run_id or run_ids.get(outcome.key)
            if run_id:
                client.set_tag(run_id, FRONT_TAG, str(index in on_front).lower())
        _log_metrics(client, search_id, {
            "trials": len(outcomes), "front_size": len(front),
            "trials_passed": sum(outcome.passed for outcome in outcomes),
        })
        client.set_terminated(search_id)

    _retrying(f"finishing search {search_id}", finish)
    return front


def register_best(outcomes: list[TrialOutcome], objectives: Sequence[Objective],
                  search_id: str) -> RegisteredVersion | None:
    """Register the best trial that passed every constraint (pareto.best_index) from its
    RunRecord, with the compress flow's gates and alias logic; the version is tagged
    squeezeflow.search=<search_id> and squeezeflow.search.trial=<number>. None when no
    trial passed."""
    index = best_index([outcome.metrics for outcome in outcomes], objectives,
                       [outcome.passed for outcome in outcomes])
    if index is None:
        return None
    best = outcomes[index]
    if not best.record:
        raise ValueError(f"trial {best.number} passed but carries no run record to register")
    record = RunRecord.model_validate(best.record)
    registered = log_and_register(record)
    client = connect(record.tracking_uri)

    def tag() -> None:
        for key, value in ((SEARCH_TAG, search_id), (TRIAL_TAG, str(best.number))):
            client.set_model_version_tag(registered.model_name, registered.version, key, value)

    _retrying(f"tagging {registered.model_name} version {registered.version}", tag)
    log.info("search %s: trial %d registered as %s version %s", search_id, best.number,
             registered.model_name, registered.version)
    return registered


# ---- the Pareto table and plots ----


def _columns(outcomes: Sequence[TrialOutcome], objectives: Sequence[Objective]) -> list[str]:
    """Metric columns: the objectives, then the plots' axes not among them."""
    axes = [metric for metric in (_quality_metric(outcomes, objectives), SIZE_METRIC,
                                  _speed_metric(outcomes)) if metric]
    return list(dict.fromkeys([objective.metric for objective in objectives] + axes))


def pareto_rows(outcomes: Sequence[TrialOutcome], objectives: Sequence[Objective],
                front: Sequence[int]) -> list[dict[str, str]]:
    """One row per trial (front members first, then by number): its number, whether it
    is on the front and passed, its values and metrics."""
    metrics = _columns(outcomes, objectives)
    dimensions = list(dict.fromkeys(name for outcome in outcomes for name in outcome.values))
    order = sorted(range(len(outcomes)), key=lambda i: (i not in front, outcomes[i].number))
    rows = []
    for index in order:
        outcome = outcomes[index]
        row = {"trial": str(outcome.number), "front": "yes" if index in front else "no",
               "passed": "yes" if outcome.passed else "no"}
        row |= {name: json.dumps(outcome.values[name]) if name in outcome.values else ""
                for name in dimensions}
        row |= {name: f"{outcome.metrics[name]:.6g}" if name in outcome.metrics else ""
                for name in metrics}
        rows.append(row)
    return rows


def pareto_markdown(rows: list[dict[str, str]], front_size: int) -> str:
    if not rows:
        return "# Pareto front\n\nno trials\n"
    header = list(rows[0])
    lines = [f"# Pareto front\n\n{front_size} of {len(rows)} trials on the front\n",
             "| " + " | ".join(f"`{name}`" for name in header) + " |",  # `*mlp*` is no emphasis
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[column].replace("|", "\\|") for column in header) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _quality_metric(outcomes: Sequence[TrialOutcome], objectives: Sequence[Objective]) -> str | None:
    """The first objective that is a quality metric (metric table), else the family's
    headline quality metric of the trials."""
    for objective in objectives:
        known = METRICS.get(objective.metric)
        if known is not None and known.quality_for:
            return objective.metric
    for outcome in outcomes:
        headline = headline_quality(outcome.metrics)
        if headline is not None:
            return headline.name
    return None


def _speed_metric(outcomes: Sequence[TrialOutcome]) -> str | None:
    for name in SPEED_METRICS:
        if any(name in outcome.metrics for outcome in outcomes):
            return name
    return None


def pareto_plots(outcomes: Sequence[TrialOutcome], objectives: Sequence[Objective],
                 front: Sequence[int], folder: Path) -> list[Path]:
    """quality_vs_size.png and (when a speed metric was measured) quality_vs_speed.png:
    every trial a dot, the front's trials starred, labelled and joined in x order."""
    quality = _quality_metric(outcomes, objectives)
    if quality is None:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for x_metric, filename in ((SIZE_METRIC, "quality_vs_size.png"),
                               (_speed_metric(outcomes), "quality_vs_speed.png")):
        if x_metric is None:
            continue
        points = [(i, o.metrics[x_metric], o.metrics[quality]) for i, o in enumerate(outcomes)
                  if x_metric in o.metrics and quality in o.metrics]
        if not points:
            continue
        figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
        axes.scatter([x for _, x, _ in points], [y for _, _, y in points], color="0.6", s=30,
                     label="trial")
        members = sorted((x, y, outcomes[i].number) for i, x, y in points if i in front)
        if members:
            axes.plot([x for x, _, _ in members], [y for _, y, _ in members], color="tab:red",
                      marker="*", markersize=12, label="Pareto front")
            for x, y, number in members:
                axes.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 5),
                              fontsize=8)
        axes.set_xlabel(_axis_label(x_metric))
        axes.set_ylabel(_axis_label(quality))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = folder / filename
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def _axis_label(name: str) -> str:
    known = METRICS.get(name)
    if known is None or known.direction is None:
        return name
    return f"{name} ({known.direction} is better)"


# ---- MLflow helpers ----


def _trial_runs(client: MlflowClient, search_id: str) -> list[Run]:
    experiment = client.get_run(search_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{search_id}'",
                              ViewType.ACTIVE_ONLY, max_results=50000)


def _mark_failed(client: MlflowClient, run_id: str) -> None:
    """Best effort: the registry that just failed may not answer."""
    try:
        client.set_terminated(run_id, status="FAILED")
    except Exception as error:  # the original error is the one to raise
        log.warning("could not mark run %s FAILED: %s", run_id, error)


def _quoted(value: str) -> str:
    return value.replace("'", "\\'")


def _retrying(what: str, call: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, again after each pause of the RetryPolicy while it fails transiently."""
    policy = RetryPolicy.from_environment()
    for attempt, delay in enumerate(policy.delays_s, start=1):
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            log.warning("%s: attempt %d of %d failed (%s); retrying in %g s", what, attempt,
                        policy.attempts, type(error).__name__, delay)
            sleep(delay)
    return call()

"""The `search` flow: a recipe's `search:` section -> trials run concurrently -> Pareto
front -> the best passing trial registered.

Each trial is a task that builds and evaluates one trial recipe (`measure_recipe`, the
compress flow without registering); trials share the workspace, so stages they have in
common are computed once. Concurrency comes from the flow's task runner: local
processes, or a Dask cluster (`prefect-dask`). A killed search resumes: trials already
logged under its MLflow parent run are found by their key and not run again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Literal

from pydantic import BaseModel

from squeezeflow.settings import apply_defaults

apply_defaults()

from prefect import flow  # noqa: E402
from prefect.futures import PrefectFuture, as_completed  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner  # noqa: E402

from squeezeflow.compression.search.space import (  # noqa: E402
    Point,
    TrialOutcome,
    describe,
    trial_key,
    trial_recipe,
)  # noqa: E402
from squeezeflow.compression.search.spec import PLANNED_STRATEGIES, SearchSpec  # noqa: E402
from squeezeflow.compression.search.strategies import StrategyContext, make_strategy  # noqa: E402
from squeezeflow.recipe import Recipe, RecipeError, load_recipe  # noqa: E402
from squeezeflow.registry.records import RegisteredVersion  # noqa: E402
from squeezeflow.registry.search import (  # noqa: E402
    finish_search,
    finished_trials,
    latest_unfinished_search,
    log_trial,
    register_best,
    start_search,
)
from squeezeflow.registry.store import default_tracking_uri  # noqa: E402
from squeezeflow.tasks.refs import workspace  # noqa: E402
from squeezeflow.tasks.search import (  # noqa: E402
    plan_trials,
    publish_front,
    run_trial,
    study_storage,
)

log = logging.getLogger("squeezeflow.search")  # the CLI prints this logger's trial lines

Cluster = Literal["local", "dask"]


class SearchResult(BaseModel):
    search_id: str
    outcomes: list[TrialOutcome]  # by trial number, the resumed ones included
    front: list[int]  # indices into outcomes
    registered: RegisteredVersion | None  # None: no trial passed every constraint
    resumed: int  # trials finished by an earlier run of the search, not run again
    failed: list[str]  # "trial N: error" of trials that raised


class _Trials:
    """Where the next trial recipes come from: the strategy's points, or the plan of
    `strategy: mixed_precision` (its recipes are the trials)."""

    def __init__(self, recipe: Recipe, spec: SearchSpec, search_id: str, tracking_uri: str) -> None:
        self.base = recipe.as_mapping()
        self.spec = spec
        self.planned: list[dict[str, Any]] | None = None
        if spec.strategy in PLANNED_STRATEGIES:  # mixed_precision: its recipes are the trials
            self.planned = plan_trials(recipe, self.base)
        else:
            context = StrategyContext(storage=study_storage(tracking_uri), study_name=search_id)
            self.strategy = make_strategy(spec, context)
        self.asked = 0

    def next(self) -> tuple[int, Point, dict[str, Any]] | None:
        """(number, values, trial recipe) of the next trial, None when none is left."""
        number = self.asked
        if self.planned is not None:
            if number >= len(self.planned):
                return None
            raw = self.planned[number]
            values: Point = {"plan": raw.get("description") or f"plan {number}"}
        else:
            points = self.strategy.ask(1)
            if not points:
                return None
            values = points[0]
            raw = trial_recipe(self.base, self.spec, values, number)
        self.asked += 1
        return number, values, raw

    def tell(self, values: Point, metrics: dict[str, float] | None) -> None:
        if self.planned is None:
            self.strategy.tell(values, metrics)


def _goals_met(spec: SearchSpec, outcomes: list[TrialOutcome]) -> bool:
    return any(
        outcome.passed and all(objective.met(outcome.metrics.get(objective.metric))
                               for objective in spec.objectives)
        for outcome in outcomes
    )


# a deployment runs trials in local processes; run_search picks the runner itself
@flow(name="search", log_prints=False, task_runner=ProcessPoolTaskRunner())  # type: ignore[arg-type]
def search(recipe_path: str, workers: int = 2, resume: bool = False,
           search_id: str | None = None, trial_threads: int | None = None) -> SearchResult:
    """Run the trials of the recipe's `search:` section, at most `workers` at a time.

    `trial_threads`: torch threads per trial (None: torch's default, every core of the
    worker's machine); on one machine, cores / workers keeps trials off each other's cores.

    `resume` continues the latest unfinished search of the recipe (or `search_id`):
    its logged trials are kept, only the missing ones run.
    """
    recipe = load_recipe(recipe_path)
    spec = recipe.search
    if spec is None:
        raise RecipeError(f"{recipe_path} has no 'search' section")
    uri = recipe.registration.tracking_uri or default_tracking_uri()
    experiment = recipe.registration.experiment
    if resume and search_id is None:
        search_id = latest_unfinished_search(uri, experiment, recipe.name)
        if search_id is None:
            raise LookupError(f"no unfinished search of {recipe.name} in experiment {experiment!r}")
    new_search = search_id is None  # else a killed search's parent run, reopened
    search_id = start_search(uri, experiment, recipe.name, spec.model_dump(mode="json"),
                             recipe.sha256(), resume=search_id)
    earlier = {outcome.key: outcome for outcome in finished_trials(uri, search_id)} if resume else {}
    log.info("search %s: %d trials finished earlier", search_id, len(earlier))

    trials = _Trials(recipe, spec, search_id, uri)
    outcomes: list[TrialOutcome] = []
    failed: list[str] = []
    in_flight: dict[PrefectFuture[TrialOutcome], tuple[int, Point]] = {}
    start = time.monotonic()

    def may_start() -> bool:
        """Budget and goals, checked before each new trial."""
        budget = spec.budget
        if budget.max_trials is not None and len(outcomes) + len(failed) + len(in_flight) >= budget.max_trials:
            return False
        if budget.max_minutes is not None and time.monotonic() - start > 60 * budget.max_minutes:
            return False
        return not (spec.stop_when == "goals_met" and _goals_met(spec, outcomes))

    resumed = 0
    exhausted = False
    while True:
        while not exhausted and len(in_flight) < workers and may_start():
            trial = trials.next()
            if trial is None:
                exhausted = True
                break
            number, values, raw = trial
            done = earlier.pop(trial_key(raw), None)
            if done is not None:  # finished before the search was killed
                outcomes.append(done)
                resumed += 1
                trials.tell(values, done.metrics)
                continue
            in_flight[run_trial.submit(raw, number, values, spec.constraints, trial_threads)] = (number, values)
        if not in_flight:
            break
        future = next(as_completed(list(in_flight)))
        number, values = in_flight.pop(future)
        try:
            outcome = future.result()
        except Exception as error:  # one bad trial does not end the search; it is reported
            log.warning("trial %d (%s) failed: %s", number, values, error)
            failed.append(f"trial {number}: {type(error).__name__}: {error}")
            trials.tell(values, None)
            continue
        outcome = outcome.model_copy(update={"run_id": log_trial(uri, search_id, outcome, new_search)})
        outcomes.append(outcome)
        trials.tell(values, outcome.metrics)
        log.info("trial %d: %s", outcome.number, describe(values), extra={"trial": outcome})

    outcomes.sort(key=lambda outcome: outcome.number)
    front = finish_search(uri, search_id, outcomes, spec.objectives)
    publish_front(recipe.name, outcomes, spec.objectives, front)
    registered = register_best(outcomes, spec.objectives, search_id)
    return SearchResult(search_id=search_id, outcomes=outcomes, front=front, registered=registered,
                        resumed=resumed, failed=failed)


def task_runner(cluster: Cluster, workers: int, address: str | None = None) -> TaskRunner[Any]:
    """Local processes, a Dask LocalCluster of `workers` single-threaded processes, or
    the Dask scheduler at `address` (a team's cluster: its workers need this package)."""
    if cluster == "dask" or address:
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            # one thread per worker: torch inside a trial uses the cores itself
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                            "dashboard_address": None},
        )
    if workers == 1:  # one trial at a time: in this process, which has imported the trial's code
        return ThreadPoolTaskRunner(max_workers=1)
    return ProcessPoolTaskRunner(max_workers=workers)


def share_servers(tracking_uri: str | None) -> None:
    """Export the Prefect API, the registry and the workspace to os.environ, so trial
    processes (started after this) report to the same servers and share the stage cache.
    Without a Prefect server, the local one is started here (each worker would else
    start its own)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    if not api:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the same one this process's flow runs use
        server.start()
        api = server.api_url
    os.environ["PREFECT_API_URL"] = str(api)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri or default_tracking_uri()
    os.environ["SQUEEZEFLOW_HOME"] = str(workspace())


def run_search(recipe_path: str, cluster: Cluster = "local", workers: int = 2,
               address: str | None = None, resume: bool = False,
               search_id: str | None = None) -> SearchResult:
    """The `search` flow on the chosen task runner (what `squeeze search` calls)."""
    recipe = load_recipe(recipe_path)
    share_servers(recipe.registration.tracking_uri)
    runner = task_runner(cluster, workers, address)
    # trials on this machine share its cores; a team's scheduler's workers have their own
    threads = None if address else max(1, (os.cpu_count() or 1) // workers)
    return search.with_options(task_runner=runner)(
        recipe_path, workers=workers, resume=resume or search_id is not None, search_id=search_id,
        trial_threads=threads,
    )

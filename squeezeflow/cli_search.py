"""`squeeze search RECIPE`: run the trials of a recipe's `search:` section.

One line per finished trial (number, values, objective metrics, passed, stage cache
hits), then the Pareto table (front marked) and the registered version. Exit codes:
0 done (also when no trial passed: then nothing is registered); 2 an invalid recipe,
one without `search:`, or `--resume` with no unfinished search.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from squeezeflow.compression.search.space import TrialOutcome
    from squeezeflow.compression.search.spec import SearchSpec
    from squeezeflow.flows.search import SearchResult

EXIT_INVALID = 2

console = Console()
errors = Console(stderr=True)


def describe_space(spec: SearchSpec) -> str:
    """What `squeeze validate` says about a search: strategy, space size, budget."""
    from squeezeflow.compression.search.space import grid_points
    from squeezeflow.compression.search.spec import PLANNED_STRATEGIES

    if spec.strategy in PLANNED_STRATEGIES:
        size = "trials planned at run time"
    else:
        size = f"{len(grid_points(spec))} points in the space"
    budget = [f"max {spec.budget.max_trials} trials"] if spec.budget.max_trials else []
    budget += [f"max {spec.budget.max_minutes:g} min"] if spec.budget.max_minutes else []
    budget += ["stop when goals are met"] if spec.stop_when else []
    objectives = ", ".join(f"{'min' if o.minimize else 'max'} {o.metric}" for o in spec.objectives)
    return (f"search {spec.strategy}: {size}; objectives {objectives}"
            f"{'; ' + ', '.join(budget) if budget else ''}")


def _metrics_text(outcome: TrialOutcome, names: list[str]) -> str:
    return ", ".join(f"{name} {outcome.metrics[name]:.4g}" for name in names if name in outcome.metrics)


class _TrialLines(logging.Handler):
    """Prints the search flow's trial lines as the trials end."""

    def __init__(self, metrics: list[str]) -> None:
        super().__init__(logging.INFO)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        outcome = getattr(record, "trial", None)
        if outcome is None:
            return
        from squeezeflow.compression.search.space import describe

        console.print(
            f"trial {outcome.number}: {escape(describe(outcome.values))} | "
            f"{_metrics_text(outcome, self.metrics)} | "
            f"{'[green]passed[/]' if outcome.passed else '[red]failed[/]'} | "
            f"cache hits {outcome.cache_hits}, stages computed {outcome.stages_computed}, "
            f"{outcome.seconds:.1f} s", highlight=False, soft_wrap=True,
        )


def _pareto_table(result: SearchResult, metrics: list[str]) -> Table:
    dimensions = list(dict.fromkeys(name for o in result.outcomes for name in o.values))
    table = Table("trial", "front", *dimensions, *metrics, "passed", "cache hits",
                  title=f"search {result.search_id}: {len(result.front)} of "
                        f"{len(result.outcomes)} trials on the Pareto front")
    for index, outcome in enumerate(result.outcomes):
        table.add_row(
            str(outcome.number), "[bold]*[/]" if index in result.front else "",
            *(escape(_value(outcome.values.get(name))) for name in dimensions),
            *(f"{outcome.metrics[m]:.4g}" if m in outcome.metrics else "-" for m in metrics),
            "yes" if outcome.passed else "no", str(outcome.cache_hits),
        )
    return table


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # a plan's description unquoted


def _summary(result: SearchResult) -> dict[str, Any]:
    return {
        "search_id": result.search_id,
        "trials": [outcome.model_dump(mode="json", exclude={"record"}) for outcome in result.outcomes],
        "front": [result.outcomes[index].number for index in result.front],
        "registered": result.registered.model_dump(mode="json") if result.registered else None,
        "resumed": result.resumed,
        "failed": result.failed,
    }


def search(
    recipe_path: Annotated[Path, typer.Argument(help="recipe YAML file with a search: section",
                                                show_default=False)],
    cluster: Annotated[Literal["local", "dask"], typer.Option(
        help="local: a pool of local processes; dask: a Dask cluster (prefect-dask)")] = "local",
    workers: Annotated[int, typer.Option(
        min=1, help="worker processes, and the most trials in flight at once (1: trials run in this process)")] = 2,
    address: Annotated[str | None, typer.Option(
        help="an existing Dask scheduler (tcp://host:8786) instead of a LocalCluster")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue the latest unfinished search of this recipe")] = False,
    search_id: Annotated[str | None, typer.Option(
        "--search-id", help="continue this search (its MLflow parent run id)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object and nothing else")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show library logs")] = False,
) -> None:
    """Run a search: trials in parallel, Pareto front to MLflow, the best passing trial registered."""
    from squeezeflow.cli import _load_or_exit
    from squeezeflow.console import log_file_for, quiet_environment, run_display

    recipe = _load_or_exit(recipe_path)
    if recipe.search is None:
        errors.print(f"{recipe_path} has no 'search' section; run it with `squeeze run`")
        raise typer.Exit(EXIT_INVALID)
    quiet_environment(verbose)
    # imported before the display takes over stderr: Prefect's handlers keep their stream
    from squeezeflow.flows.search import run_search
    from squeezeflow.tasks.refs import workspace

    metrics = list(dict.fromkeys([o.metric for o in recipe.search.objectives]
                                 + [gate.metric for gate in recipe.search.constraints]))
    lines = _TrialLines(metrics)
    trial_log = logging.getLogger("squeezeflow.search")
    trial_log.setLevel(logging.INFO)
    if not as_json:
        trial_log.addHandler(lines)
    log_file = None if verbose else log_file_for(workspace(), recipe.name)
    try:
        with run_display(errors, verbose=verbose, log_file=log_file):
            result = run_search(str(recipe_path), cluster=cluster, workers=workers, address=address,
                                resume=resume, search_id=search_id)
    except LookupError as error:
        errors.print(f"[bold red]cannot resume[/]: {escape(str(error))}")
        raise typer.Exit(EXIT_INVALID) from None
    finally:
        trial_log.removeHandler(lines)
    if as_json:
        typer.echo(json.dumps(_summary(result), default=str))
        return
    if log_file is not None:
        console.print(f"[dim]log: {log_file}[/]", highlight=False, soft_wrap=True)
    console.print(_pareto_table(result, metrics))
    for failure in result.failed:
        console.print(f"[red]{escape(failure)}[/]", highlight=False)
    if result.resumed:
        console.print(f"{result.resumed} trials were finished by the earlier run and not rerun")
    version = result.registered
    if version is None:
        console.print("no trial passed every constraint; nothing registered")
        return
    console.print(f"[green]registered[/] {version.model_name} version {version.version} "
                  f"(search {result.search_id}); aliases: {', '.join(version.aliases) or '-'}",
                  highlight=False)

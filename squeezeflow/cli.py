"""`squeeze`: validate and run recipes, list registered versions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from squeezeflow.settings import apply_defaults, quiet_progress_bars

app = typer.Typer(add_completion=False, help="Declarative model compression workflows.")
console = Console()
errors = Console(stderr=True)

EXIT_INVALID = 2  # a recipe that cannot run: nothing loaded, nothing logged

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]


def _load_or_exit(recipe_path: Path, strict: bool = False):  # type: ignore[no-untyped-def]
    from squeezeflow.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(recipe_path, strict=strict)
    except RecipeError as error:
        errors.print(f"[bold red]invalid recipe[/] {recipe_path}:")
        # soft_wrap: long paths stay whole (copyable); the terminal wraps them
        errors.print(str(error), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    for warning in recipe.warnings:  # checks not done (hub unreachable): said, not hidden
        errors.print(f"[yellow]warning[/] {escape(warning)}", highlight=False, soft_wrap=True)
    return recipe


@app.command()
def validate(
    recipe_path: RecipeArg,
    strict: Annotated[bool, typer.Option(
        "--strict", envvar="SQUEEZEFLOW_STRICT",
        help="a check that could not be done (hub unreachable) is an error (for CI)",
    )] = False,
) -> None:
    """Check a recipe without loading any weights (exit code 2 when invalid)."""
    recipe = _load_or_exit(recipe_path, strict=strict)
    console.print(f"[green]ok[/] {recipe_path}: {recipe.name}")
    for stage in recipe.stages:
        kinds = ", ".join(step.kind for step in stage.steps)
        console.print(f"  stage [bold]{stage.name}[/]: {kinds}")
    console.print(f"  recipe sha256 {recipe.sha256()[:16]}")
    from squeezeflow.cli_preflight import memory_lines

    for line in memory_lines(recipe):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    if recipe.search is not None:
        from squeezeflow.cli_search import describe_space

        console.print(f"  {describe_space(recipe.search)}", highlight=False)


@app.command()
def run(
    recipe_path: RecipeArg,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="show library logs (Prefect, MLflow, ...) instead of progress bars"
    )] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print one JSON object (version, aliases, gates, metrics) and nothing else"
    )] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="recompute every stage, even unchanged ones")
    ] = False,
    memory_limit: Annotated[str | None, typer.Option(
        "--memory-limit", envvar="SQUEEZEFLOW_MEMORY_LIMIT",
        help="refuse to start when a phase's estimated peak exceeds this (e.g. 8GB); "
             "default: what the machine has available",
    )] = None,
    no_preflight: Annotated[bool, typer.Option(
        "--no-preflight", help="skip the memory estimate before anything loads"
    )] = False,
    device: Annotated[str | None, typer.Option(
        "--device", help="where streamed stages compute each block: auto, cpu or cuda "
                         "(default: the recipe's, else auto)",
    )] = None,
) -> None:
    """Run a recipe: compress, evaluate against the base, register the version.

    Shows one progress bar per long phase, then the result table; library logs go to a
    log file (named at the end) unless `-v`.
    """
    from squeezeflow.console import (
        gate_lines,
        json_line,
        log_file_for,
        quiet_environment,
        result_table,
        run_display,
        run_summary,
    )

    recipe = _load_or_exit(recipe_path)
    if device is not None and device not in ("auto", "cpu", "cuda"):
        errors.print(f"--device must be auto, cpu or cuda, got {device!r}")
        raise typer.Exit(EXIT_INVALID)
    if recipe.search is not None:
        errors.print(f"{recipe_path} has a 'search' section: run it with `squeeze search {recipe_path}`")
        raise typer.Exit(EXIT_INVALID)
    if not no_preflight:  # before anything loads or is logged
        from squeezeflow.cli_preflight import preflight_or_exit

        preflight_or_exit(recipe, memory_limit, errors)
    quiet_environment(verbose)
    apply_defaults()
    # flows.compress (prefect) is imported before the display takes over stderr:
    # Prefect's handlers keep the stream they were made with
    from squeezeflow.evaluation.gates import check_gates
    from squeezeflow.flows.compress import compress
    from squeezeflow.tasks.refs import workspace

    quiet_progress_bars()
    log_file = None if verbose else log_file_for(workspace(), recipe.name)
    with run_display(errors, verbose=verbose, log_file=log_file):
        result = compress(str(recipe_path), use_cache=not no_cache, device=device)
    gates = check_gates(list(recipe.gates), result.metrics)
    if as_json:
        typer.echo(json_line(run_summary(result, gates)))
        return
    version = result.registered
    reused = [stage.name for stage in result.stages if stage.reused]
    if reused:
        console.print(f"cached stages reused: {', '.join(reused)}")
    if log_file is not None:
        console.print(f"[dim]log: {log_file}[/]", highlight=False, soft_wrap=True)
    for line in gate_lines(gates):
        console.print(f"gate {line}", highlight=False)
    console.print(
        f"[green]registered[/] {version.model_name} version {version.version}; "
        f"gates {'passed' if version.gates_passed else '[red]failed[/]'}; "
        f"aliases: {', '.join(version.aliases) or '-'}", highlight=False
    )
    console.print(result_table(result.metrics))


@app.command("list")
def list_versions(
    model_name: Annotated[str | None, typer.Argument(help="registered model name")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Registered versions with their aliases and headline metrics."""
    apply_defaults()
    from squeezeflow.evaluation.metrics import headline_quality
    from squeezeflow.registry.runs import list_versions as versions

    rows = versions(model_name, tracking_uri)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no registered versions")
        return
    # the search column only where a listed version came from a search; no borders
    # between columns or at the edges, so 80 columns hold a version's row whole
    searched = any("squeezeflow.search" in row["tags"] for row in rows)
    table = Table("model", "v", "aliases", "gate", "quality", "ratio", "speedup", "MB",
                  *(["search"] if searched else []),
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.columns[0].no_wrap = True
    if searched:
        table.columns[-1].min_width = 8  # the search id, never cut
    for row in rows:
        metrics = row["metrics"]
        headline = headline_quality(metrics)  # the family's quality metric (metric table)
        quality = "-" if headline is None else f"{headline.short} {metrics[headline.name]:.4g}"
        table.add_row(
            row["name"], str(row["version"]), ", ".join(row["aliases"]) or "-",
            row["tags"].get("gate", "-"), quality,
            *(f"{metrics[m]:.2f}" if m in metrics else "-"
              for m in ("compression_ratio", "speedup", "weights_mb")),
            # the search's parent run id, short
            *([row["tags"].get("squeezeflow.search", "-")[:8]] if searched else []),
        )
    console.print(table)


EXIT_NOT_PROMOTED = 3  # gates were checked and no candidate passed them all


@app.command()
def promote(
    model_name: Annotated[str, typer.Argument(help="registered model name", show_default=False)],
    recipe_path: Annotated[
        Path | None, typer.Option("--recipe", help="take gates from this recipe's promotion:")
    ] = None,
    version: Annotated[str | None, typer.Option(help="consider only this version")] = None,
    alias: Annotated[
        str | None, typer.Option(help="consider only the version holding this alias")
    ] = None,
    max_quality_drop: Annotated[float | None, typer.Option(help="e.g. 0.01 = 1% worse")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="latency speed-up over base")] = None,
    max_size_mb: Annotated[float | None, typer.Option(help="weights on disk")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="p50 latency")] = None,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="restore the previous champion")
    ] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
) -> None:
    """Move the `champion` alias to the best candidate passing every gate (or roll back).

    Exit codes: 0 promoted (or rolled back), 3 no candidate passed, 2 refused (bad input,
    candidates evaluated on other data or base than the champion, or a registry error;
    no alias moved).
    """
    apply_defaults()
    from squeezeflow.evaluation.gates import PromotionGates
    from squeezeflow.registry.promotion import PromotionError
    from squeezeflow.registry.promotion import promote as run_promotion
    from squeezeflow.registry.promotion import rollback as run_rollback

    try:
        if rollback:
            outcome = run_rollback(model_name, tracking_uri)
            console.print(f"[green]rolled back[/] {model_name}: champion is version "
                          f"{outcome.champion} again (was {outcome.previous_champion})")
            return
        gates = _load_or_exit(recipe_path).promotion if recipe_path else PromotionGates()
        gates = gates.merged(PromotionGates(
            max_quality_drop=max_quality_drop, min_speedup=min_speedup,
            max_size_mb=max_size_mb, max_latency_ms=max_latency_ms,
        ))
        outcome = run_promotion(model_name, gates, version=version, alias=alias,
                                tracking_uri=tracking_uri)
    except PromotionError as error:
        errors.print(f"[bold red]promotion refused[/]: {escape(str(error))}", highlight=False,
                     soft_wrap=True)  # hashes and URIs stay whole, copyable
        raise typer.Exit(EXIT_INVALID) from None
    table = Table("version", "result", "gates")
    for decision in outcome.decisions:
        verdict = ("[green]promoted[/]" if decision.version == outcome.champion and outcome.promoted
                   else "passed" if decision.passed else "[red]rejected[/]")
        gates_text = "; ".join(
            f"{'ok' if r.passed else 'FAIL'} {r.gate} "
            f"({'missing' if r.value is None else f'{r.value:.4g}'})"
            for r in decision.results
        )
        if decision.refused is not None:  # not comparable with the champion
            verdict, gates_text = "[yellow]refused[/]", escape(decision.refused)
        table.add_row(decision.version, verdict, gates_text)
    console.print(table)
    if not outcome.promoted:
        console.print(f"no candidate passed every gate; champion stays "
                      f"{outcome.previous_champion or '(none)'}")
        raise typer.Exit(EXIT_NOT_PROMOTED)
    console.print(f"[green]champion[/] of {model_name} is now version {outcome.champion} "
                  f"(was {outcome.previous_champion or 'none'})")


stack_app = typer.Typer(help="A local team stack: MLflow server, Prefect server and a worker.")
app.add_typer(stack_app, name="stack")


def _stack_config(mlflow_port: int, prefect_port: int):  # type: ignore[no-untyped-def]
    from squeezeflow.infra.stack import StackConfig
    from squeezeflow.tasks.refs import workspace

    return StackConfig(root=workspace() / "stack", mlflow_port=mlflow_port,
                       prefect_port=prefect_port,
                       backend_store_uri=os.environ.get("SQUEEZEFLOW_STACK_BACKEND_STORE_URI"),
                       artifacts_destination=os.environ.get("SQUEEZEFLOW_STACK_ARTIFACTS"))


MlflowPort = Annotated[int, typer.Option(help="MLflow server port")]
PrefectPort = Annotated[int, typer.Option(help="Prefect server port")]


@stack_app.command("up")
def stack_up(mlflow_port: MlflowPort = 5000, prefect_port: PrefectPort = 4200) -> None:
    """Start the MLflow server, the Prefect server and a worker on loopback."""
    from squeezeflow.infra.stack import up

    config = _stack_config(mlflow_port, prefect_port)
    with console.status("starting the stack (a minute on 2 cores)"):
        environment = up(config)
    console.print(f"[green]stack up[/]; state and logs in {config.root}. Use it with:")
    for key, value in environment.items():
        typer.echo(f"export {key}={value}")


@stack_app.command("down")
def stack_down(mlflow_port: MlflowPort = 5000, prefect_port: PrefectPort = 4200) -> None:
    """Stop every service of the stack."""
    from squeezeflow.infra.stack import down

    stopped = down(_stack_config(mlflow_port, prefect_port))
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@stack_app.command("status")
def stack_status(mlflow_port: MlflowPort = 5000, prefect_port: PrefectPort = 4200) -> None:
    """Show whether each service runs and answers."""
    from squeezeflow.infra.stack import status

    for name, state in status(_stack_config(mlflow_port, prefect_port)).items():
        console.print(f"{name:8} {state}")


@app.command()
def serve(
    recipe_path: RecipeArg,
    interval: Annotated[float | None, typer.Option(help="seconds between runs")] = None,
    cron: Annotated[str | None, typer.Option(help="cron expression, e.g. '0 2 * * *'")] = None,
    name: Annotated[str | None, typer.Option(help="deployment name")] = None,
    watch_base: Annotated[
        str | None,
        typer.Option(help="registered base model: run when it gets a new version (polls on "
                          "the schedule)"),
    ] = None,
) -> None:
    """Serve the recipe as a scheduled deployment (needs a real Prefect server)."""
    recipe = _load_or_exit(recipe_path)
    if (interval is None) == (cron is None):
        errors.print("give exactly one of --interval or --cron")
        raise typer.Exit(EXIT_INVALID)
    apply_defaults()
    quiet_progress_bars()
    from squeezeflow.flows.serve import NoServerError, serve_recipe

    try:
        serve_recipe(recipe_path, name=name or recipe.name, interval_s=interval, cron=cron,
                     watch_base_model=watch_base)
    except NoServerError as error:
        errors.print(f"[bold red]cannot serve[/]: {error}", highlight=False)
        raise typer.Exit(EXIT_INVALID) from None


@app.command()
def kernels(
    model: Annotated[str, typer.Argument(help="compressed model folder or models:/NAME@alias")],
    batch: Annotated[list[int] | None, typer.Option(help="batch sizes to run (repeatable)")] = None,
    tokens: Annotated[int, typer.Option(help="tokens per sequence", min=1)] = 128,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show which kernel each packed layer runs on this machine, and the timings it was
    chosen by (decisions are measured on first use and cached per CPU)."""
    apply_defaults()
    quiet_progress_bars()
    import torch

    import squeezeflow
    from squeezeflow.evaluation.kernel_report import exercise_kernels
    from squeezeflow.kernels.choice import cache_path

    loaded = squeezeflow.load_compressed(model)
    rows = exercise_kernels(loaded, batch or [1, 8], tokens)
    capability = torch.backends.cpu.get_cpu_capability()
    if as_json:
        print(json.dumps({"cpu_capability": capability, "decisions_file": str(cache_path()),
                          "kernels": [row.__dict__ for row in rows]}))
        return
    if not rows:
        console.print("no packed layers: the model runs dense")
        return
    table = Table(title=f"kernels on {capability} ({torch.get_num_threads()} threads); "
                        f"decisions in {cache_path()}")
    for column in ("rows <=", "format", "out x in", "layers", "kernel", "candidates (ms)",
                   "rejected"):
        table.add_column(column)
    for row in rows:
        timings = ", ".join(f"{name} {ms:.3g}" for name, ms in sorted(row.ms.items(),
                                                                     key=lambda item: item[1]))
        table.add_row(str(row.rows), row.format, row.shape, str(row.layers), row.kernel,
                      timings or "(cached decision)",
                      "; ".join(f"{name}: {why}" for name, why in row.rejected.items()))
    console.print(table)


@app.command("register-base")
def register_base(
    folder: Annotated[Path, typer.Argument(help="a Hugging Face model folder")],
    model_name: Annotated[str, typer.Option("--name", help="registered model name")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
) -> None:
    """Register a model folder as a new version (a base that `serve --watch-base` follows)."""
    apply_defaults()
    if not (folder / "config.json").exists():
        errors.print(f"{folder} has no config.json: not a Hugging Face model folder")
        raise typer.Exit(EXIT_INVALID)
    from squeezeflow.registry.lineage import register_folder

    version = register_folder(folder, model_name, tracking_uri)
    console.print(f"[green]registered[/] {model_name} version {version}")


cache_app = typer.Typer(help="The workspace cache: stage outputs, data, training checkpoints, base references.")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """What the workspace ($SQUEEZEFLOW_HOME or ./.squeezeflow) holds, least recently used first."""
    import time

    from squeezeflow.compression.cache import entries
    from squeezeflow.tasks.refs import workspace

    root = workspace()
    cached = entries(root)
    if as_json:
        typer.echo(json.dumps([{"kind": e.kind, "name": e.name, "path": str(e.path), "bytes": e.bytes,
                                "last_used": e.last_used, "in_use": e.in_use} for e in cached], indent=2))
        return
    table = Table("kind", "name", "MB", "last used", "in use", title=str(root))
    for entry in cached:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        table.add_row(entry.kind, entry.name[:16], f"{entry.bytes / 1e6:.1f}", used,
                      "yes" if entry.in_use else "")
    console.print(table)
    console.print(f"total {sum(e.bytes for e in cached) / 1e6:.1f} MB in {len(cached)} entries")


@cache_app.command("gc")
def cache_gc(
    max_size: Annotated[str, typer.Option("--max-size", help="keep at most this much, e.g. 20G, 500M")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would go")] = False,
) -> None:
    """Delete leftovers of killed runs, then least recently used entries until the cache fits."""
    from squeezeflow.compression.cache import collect_garbage, parse_size
    from squeezeflow.tasks.refs import workspace

    try:
        limit = parse_size(max_size)
    except ValueError as error:
        errors.print(f"--max-size: {error}")
        raise typer.Exit(EXIT_INVALID) from None
    removed = collect_garbage(workspace(), limit, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for entry in removed:
        console.print(f"{verb} {entry.kind}/{entry.name} ({entry.bytes / 1e6:.1f} MB)")
    console.print(f"{verb} {len(removed)} entries, {sum(e.bytes for e in removed) / 1e6:.1f} MB")


# `squeeze export`: its own module (squeezeflow/cli_export.py), which imports nothing heavy at the top
from squeezeflow.cli_export import export as export_command  # noqa: E402

app.command("export")(export_command)
from squeezeflow.cli_search import search as search_command  # noqa: E402

app.command("search")(search_command)


if __name__ == "__main__":
    app()

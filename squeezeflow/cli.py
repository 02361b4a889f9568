"""`squeeze`: validate and run recipes, list registered versions."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from squeezeflow.settings import apply_defaults, quiet_progress_bars

app = typer.Typer(add_completion=False, help="Declarative model compression workflows.")
console = Console()
errors = Console(stderr=True)

EXIT_INVALID = 2  # a recipe that cannot run: nothing loaded, nothing logged

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]


def _load_or_exit(recipe_path: Path):  # type: ignore[no-untyped-def]
    from squeezeflow.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe_path)
    except RecipeError as error:
        errors.print(f"[bold red]invalid recipe[/] {recipe_path}:")
        errors.print(str(error), markup=False, highlight=False)
        raise typer.Exit(EXIT_INVALID) from None


@app.command()
def validate(recipe_path: RecipeArg) -> None:
    """Check a recipe without loading any weights (exit code 2 when invalid)."""
    recipe = _load_or_exit(recipe_path)
    console.print(f"[green]ok[/] {recipe_path}: {recipe.name}")
    for stage in recipe.stages:
        kinds = ", ".join(step.kind for step in stage.steps)
        console.print(f"  stage [bold]{stage.name}[/]: {kinds}")
    console.print(f"  recipe sha256 {recipe.sha256()[:16]}")


@app.command()
def run(
    recipe_path: RecipeArg,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="recompute every stage, even unchanged ones")
    ] = False,
) -> None:
    """Run a recipe: compress, evaluate against the base, register the version."""
    recipe = _load_or_exit(recipe_path)
    apply_defaults()
    quiet_progress_bars()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=errors, show_path=False)],
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "prefect", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from squeezeflow.flows.compress import compress

    with console.status(f"running {recipe.name}", spinner="dots"):
        result = compress(str(recipe_path), use_cache=not no_cache)
    version = result.registered
    reused = [stage.name for stage in result.stages if stage.reused]
    if reused:
        console.print(f"cached stages reused: {', '.join(reused)}")
    console.print(
        f"[green]registered[/] {version.model_name} version {version.version} "
        f"(run {version.run_id}) in {version.tracking_uri}"
    )
    console.print(
        f"gates: {'passed' if version.gates_passed else '[red]failed[/]'}; "
        f"aliases: {', '.join(version.aliases) or '-'}"
    )
    table = Table("metric", "value")
    for name, value in sorted(result.metrics.items()):
        table.add_row(name, f"{value:.6g}")
    console.print(table)


@app.command("list")
def list_versions(
    model_name: Annotated[str | None, typer.Argument(help="registered model name")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Registered versions with their aliases and headline metrics."""
    apply_defaults()
    from squeezeflow.registry.runs import list_versions as versions

    rows = versions(model_name, tracking_uri)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no registered versions")
        return
    table = Table("model", "v", "aliases", "gate", "quality", "ratio", "speedup", "MB")
    table.columns[0].no_wrap = True
    for row in rows:
        metrics = row["metrics"]
        if "fidelity_cosine" in metrics:
            quality = f"cos {metrics['fidelity_cosine']:.4f}"
        elif "perplexity" in metrics:
            quality = f"ppl {metrics['perplexity']:.3f}"
        else:
            quality = "-"
        table.add_row(
            row["name"], str(row["version"]), ", ".join(row["aliases"]) or "-",
            row["tags"].get("gate", "-"), quality,
            *(f"{metrics[m]:.2f}" if m in metrics else "-"
              for m in ("compression_ratio", "speedup", "weights_mb")),
        )
    console.print(table)


if __name__ == "__main__":
    app()

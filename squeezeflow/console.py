"""What `squeeze` shows while it works: one progress bar per long phase, then a result table.

By default a run prints only its progress bars (stages, calibration blocks, training
steps, evaluation, registering; each with its ETA where the phase knows its length)
and a short result table; library logs (Prefect, MLflow, transformers, our own) and
Python warnings go to a log file whose path the last line names. `-v` sends those
logs to the terminal instead; `--json` prints one JSON object and nothing else on
stdout.

Library code reports progress through `squeezeflow.compression.progress` (logging),
never by printing; this module is the only one that renders it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from squeezeflow.compression.progress import PROGRESS_LOGGER, tick_of
from squeezeflow.settings import user_cache

if TYPE_CHECKING:
    from squeezeflow.evaluation.gates import GateResult

# Set before prefect, mlflow or matplotlib are imported; `setdefault`: a user's value wins.
QUIET_ENVIRONMENT = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per downloaded file otherwise
    "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's records go where ours go (file or -v)
    "PREFECT_LOGGING_LEVEL": "WARNING",  # flow/task run boilerplate at INFO
    "TQDM_DISABLE": "1",  # lm-eval's and the hub's per-request bars; ours are rich bars
}
VERBOSE_ENVIRONMENT = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
}
# Loggers that speak at INFO about their own plumbing (HTTP calls, migrations, locks):
# WARNING even with -v, where they would bury the lines that matter.
PLUMBING_LOGGERS = ("httpx", "urllib3", "alembic", "filelock", "asyncio", "matplotlib",
                    "PIL", "numexpr")


def quiet_environment(verbose: bool) -> None:
    """Environment for the libraries, before they are imported (see the tables above).

    matplotlib gets a persistent config folder (`MPLCONFIGDIR`), so its font cache is
    built once per machine instead of announcing it on every run.
    """
    for key, value in (VERBOSE_ENVIRONMENT if verbose else QUIET_ENVIRONMENT).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MPLCONFIGDIR", str(user_cache("matplotlib")))


class ProgressBars(logging.Handler):
    """Renders progress ticks as rich progress bars: one bar per phase.

    A phase whose length is not known (evaluation, registering) shows what it is doing
    and its elapsed time; it is closed when it says it ended, or when another phase
    starts (phases run one after another).
    """

    def __init__(self, progress: Progress) -> None:
        super().__init__(level=logging.DEBUG)
        self.progress = progress
        self.bars: dict[str, TaskID] = {}
        self.open: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        tick = tick_of(record)
        if tick is None:
            return
        if tick.phase not in self.bars:
            self._close_others(tick.phase)
            self.bars[tick.phase] = self.progress.add_task(tick.phase, total=tick.total, detail="")
            self.open.add(tick.phase)
        bar = self.bars[tick.phase]
        self.progress.update(bar, completed=tick.done, total=tick.total, detail=tick.detail)
        if tick.total is not None and tick.done >= tick.total:
            self.open.discard(tick.phase)

    def _close_others(self, phase: str) -> None:
        for other in list(self.open):
            if phase.startswith(f"{other.removeprefix('stage ')}: "):
                continue  # a phase inside this stage (`quantize: calibration blocks`)
            task = self.progress.tasks[self.bars[other]]
            self.progress.update(self.bars[other], total=task.completed or 1,
                                 completed=task.completed or 1)
            self.open.discard(other)

    def close_all(self) -> None:
        self._close_others("")


@contextmanager
def run_display(errors: Console, verbose: bool, log_file: Path | None) -> Iterator[None]:
    """Progress bars on `errors` (stderr) for the duration of a run, library logs to
    `log_file` (or to the terminal with `verbose`), Python warnings logged with them.

    Without `verbose`, what libraries write to stderr themselves (MLflow's
    "Successfully registered model ..." event lines, a stray tqdm bar) goes to the log
    file too; the bars keep the real stderr.
    """
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    progress_logger = logging.getLogger(PROGRESS_LOGGER)
    if verbose:
        handler: logging.Handler = RichHandler(console=errors, show_path=False, level=logging.DEBUG)
        root.setLevel(logging.INFO)
    else:
        handler = logging.NullHandler()
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.INFO)
    root.handlers = [handler]
    for name in PLUMBING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    bars_console = errors if verbose else Console(file=sys.stderr, stderr=False)
    # where stray stderr writes go: the log file, else nowhere (closed below)
    file_stream = handler.stream if isinstance(handler, logging.FileHandler) else None
    stray: TextIO = file_stream or open(os.devnull, "w")  # noqa: SIM115
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[detail]}"),
        console=bars_console, disable=verbose,  # with -v the log lines say the same
    )
    renderer = ProgressBars(bars)
    progress_logger.setLevel(logging.DEBUG)
    progress_logger.addHandler(renderer)
    progress_logger.propagate = verbose  # the ticks are log lines too with -v
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings(), bars:
            warnings.simplefilter("default")  # every warning once, into the log
            if verbose:
                yield
            else:
                with redirect_stderr(stray):
                    yield
            renderer.close_all()
    finally:
        if stray is not file_stream:
            stray.close()
        logging.captureWarnings(False)
        progress_logger.removeHandler(renderer)
        progress_logger.propagate = True
        handler.close()
        root.setLevel(saved[0])
        root.handlers = saved[1]


def log_file_for(workspace: Path, recipe_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return workspace / "logs" / f"{recipe_name}-{stamp}.log"


def result_table(metrics: dict[str, float]) -> Table:
    """Base vs candidate for the headline metrics (`evaluation.report.COMPARED`), then
    the ratios that compare them."""
    from squeezeflow.evaluation.report import comparison_rows

    table = Table("metric", "base", "candidate", "candidate / base", title="result")
    for row in comparison_rows(metrics):
        table.add_row(row.metric, _number(row.base), _number(row.candidate), _number(row.ratio))
    for name in ("compression_ratio", "speedup", "decode_speedup", "memory_ratio"):
        if name in metrics:
            table.add_row(name.replace("_", " "), "", "", _number(metrics[name]))
    return table


def gate_lines(results: list[GateResult]) -> list[str]:
    return [f"{'[green]pass[/]' if r.passed else '[red]FAIL[/]'} {r.gate} "
            f"({'missing' if r.value is None else _number(r.value)})" for r in results]


def run_summary(result: Any, gates: list[GateResult]) -> dict[str, Any]:
    """The `--json` object of a run: version, aliases, gates, metrics, stages."""
    version = result.registered
    return {
        "model_name": version.model_name,
        "version": version.version,
        "run_id": version.run_id,
        "tracking_uri": version.tracking_uri,
        "aliases": list(version.aliases),
        "gates_passed": version.gates_passed,
        "gates": [gate.model_dump() for gate in gates],
        "metrics": result.metrics,
        "stages": [{"name": s.name, "seconds": s.seconds, "reused": s.reused} for s in result.stages],
        "model_dir": result.model_dir,
    }


def json_line(payload: dict[str, Any]) -> str:
    """One line of JSON (no wrapping: rich would wrap it at the terminal's width)."""
    return json.dumps(payload, default=str)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"

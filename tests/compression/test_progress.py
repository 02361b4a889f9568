"""Progress ticks: what the runners report, named by scope, rendered by the CLI's bars."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import Progress

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.progress import PROGRESS_LOGGER, Tick, advance, scope, tick_of
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.console import ProgressBars
from squeezeflow.testing import tiny_llama


class Ticks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.ticks: list[Tick] = []

    def emit(self, record: logging.LogRecord) -> None:
        tick = tick_of(record)
        if tick is not None:
            self.ticks.append(tick)


def _capture() -> Ticks:
    handler = Ticks()
    logger = logging.getLogger(PROGRESS_LOGGER)
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return handler


def test_layerwise_runner_ticks_once_per_block_inside_its_scope() -> None:
    model, tokenizer = tiny_llama(layers=3)
    batch = dict(tokenizer(["The robot repaired the garden fence."], return_tensors="pt"))
    step = CATALOG.build(CATALOG.parse({"kind": "gptq", "bits": 4, "group_size": 32}))
    handler = _capture()
    try:
        with scope("quantize"):
            run_stage_steps(model, [step], [batch])
        advance("outside", 1, 1)
    finally:
        logging.getLogger(PROGRESS_LOGGER).removeHandler(handler)
    blocks = [t for t in handler.ticks if t.phase == "quantize: calibration blocks"]
    assert [(t.done, t.total) for t in blocks] == [(1, 3), (2, 3), (3, 3)]
    assert handler.ticks[-1].phase == "outside"  # the scope ended with its block


def test_bars_one_per_phase_and_open_phases_closed_by_the_next() -> None:
    progress = Progress(console=Console(file=open("/dev/null", "w")))  # noqa: SIM115
    bars = ProgressBars(progress)
    logger = logging.getLogger("test-progress-bars")
    logger.addHandler(bars)
    logger.setLevel(logging.DEBUG)

    def tick(phase: str, done: int, total: int | None) -> None:
        logger.debug("tick", extra={"squeezeflow_tick": Tick(phase, done, total)})

    tick("stage quantize", 0, 1)
    tick("quantize: calibration blocks", 2, 4)  # inside the stage: the stage stays open
    assert not progress.tasks[0].finished
    tick("quantize: calibration blocks", 4, 4)
    tick("stage quantize", 1, 1)
    tick("evaluation", 0, None)
    tick("evaluation", 2, None)
    tick("registering", 0, None)  # the evaluation (length unknown) ended when this began
    bars.close_all()
    assert [t.description for t in progress.tasks] == [
        "stage quantize", "quantize: calibration blocks", "evaluation", "registering"]
    assert all(t.finished for t in progress.tasks)
    assert progress.tasks[2].completed == 2

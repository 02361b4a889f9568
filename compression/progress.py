"""Progress of long phases (calibration blocks, training steps, evaluation, upload),
reported through logging so that any front end can render it and library code prints
nothing.

A phase reports `advance(phase, done, total)`: a DEBUG record on the
`squeezeflow.progress` logger that carries a `Tick` (attribute `squeezeflow_tick`).
The CLI renders ticks as one progress bar per phase with its ETA
(`squeezeflow/console.py`); a notebook may attach its own handler; with none attached
a tick costs one `isEnabledFor` check. Logging, not a callback argument, because ticks
come from inside Prefect tasks, which may run in other threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

PROGRESS_LOGGER = "squeezeflow.progress"
TICK_ATTRIBUTE = "squeezeflow_tick"  # the LogRecord attribute that holds the Tick

# The stage (or other unit) the current code runs for: runners count "calibration
# blocks" without knowing which stage they serve; `scope` names it.
_scope: ContextVar[str] = ContextVar("progress_scope", default="")


@dataclass(frozen=True)
class Tick:
    phase: str  # what is counted, e.g. "quantize: calibration blocks"
    done: int  # units finished so far
    total: int | None  # units in the phase; None when not known (no ETA then)
    detail: str = ""  # what the phase is doing now, e.g. "loss 2.31"


def advance(phase: str, done: int, total: int | None = None, detail: str = "") -> None:
    """Say that `done` of `total` units of `phase` are finished (`done == total`: it ended)."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    if logger.isEnabledFor(logging.DEBUG):
        scope = _scope.get()
        tick = Tick(f"{scope}: {phase}" if scope else phase, done, total, detail)
        logger.debug("%s: %d/%s %s", phase, done, "?" if total is None else total, detail,
                     extra={TICK_ATTRIBUTE: tick})


@contextmanager
def scope(name: str) -> Iterator[None]:
    """Phases reported inside are named `name: phase` (e.g. `quantize: calibration blocks`)."""
    token = _scope.set(name)
    try:
        yield
    finally:
        _scope.reset(token)


def tick_of(record: logging.LogRecord) -> Tick | None:
    """The Tick a progress record carries, or None for any other record."""
    tick = getattr(record, TICK_ATTRIBUTE, None)
    return tick if isinstance(tick, Tick) else None

"""How a search chooses its next trials: one registered class per strategy.

A strategy is asked for up to `count` new points and told each finished point's
metrics (None when the trial failed). `grid` walks every point, `random` walks them in
a seeded random order, `optuna` samples with TPE (one objective) or NSGA-II (several)
and keeps its study in a database, so a killed search resumes where it stopped.
A new strategy is a class registered with `@register_strategy("name")`.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from squeezeflow.compression.search.space import Point, grid_points, random_points
from squeezeflow.compression.search.spec import Range, SearchSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StrategyContext:
    storage: str | None = None  # database URL of an adaptive strategy's state (None: in memory)
    study_name: str = "search"  # the search id: one study per search


class Strategy(ABC):
    def __init__(self, spec: SearchSpec, context: StrategyContext) -> None:
        self.spec = spec
        self.context = context

    @abstractmethod
    def ask(self, count: int) -> list[Point]:
        """Up to `count` new points; an empty list when the space is exhausted."""

    def tell(self, point: Point, metrics: dict[str, float] | None) -> None:
        """A finished trial's metrics (None: it failed); adaptive strategies learn from it."""
        return None  # grid and random do not learn


S = TypeVar("S", bound=type[Strategy])


class StrategyRegistry:
    """Strategy name -> class; a duplicate name is an error."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Strategy]] = {}

    def register(self, name: str) -> Callable[[S], S]:
        def add(cls: S) -> S:
            if name in self._classes:
                raise ValueError(f"strategy {name!r} is registered twice")
            self._classes[name] = cls
            return cls
        return add

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._classes)

    def create(self, spec: SearchSpec, context: StrategyContext) -> Strategy:
        return self._classes[spec.strategy](spec, context)


STRATEGIES = StrategyRegistry()
register_strategy = STRATEGIES.register


class _ListStrategy(Strategy):
    """Walks a precomputed list of points."""

    def __init__(self, spec: SearchSpec, context: StrategyContext) -> None:
        super().__init__(spec, context)
        self._points = self.points()
        self._next = 0

    def points(self) -> list[Point]:
        raise NotImplementedError

    def ask(self, count: int) -> list[Point]:
        batch = self._points[self._next : self._next + count]
        self._next += len(batch)
        return batch


@register_strategy("grid")
class GridStrategy(_ListStrategy):
    def points(self) -> list[Point]:
        return grid_points(self.spec)


@register_strategy("random")
class RandomStrategy(_ListStrategy):
    def points(self) -> list[Point]:
        return random_points(self.spec)


@register_strategy("optuna")
class OptunaStrategy(Strategy):
    """TPE for one objective (Bergstra et al. 2011), NSGA-II for several (Deb et al.
    2002); the study lives in `context.storage` under the search id."""

    def __init__(self, spec: SearchSpec, context: StrategyContext) -> None:
        super().__init__(spec, context)
        import optuna  # optional weight: only this strategy needs it

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = (optuna.samplers.TPESampler(seed=spec.seed) if len(spec.objectives) == 1
                   else optuna.samplers.NSGAIISampler(seed=spec.seed))
        self._optuna = optuna
        self.study = optuna.create_study(
            study_name=context.study_name, storage=context.storage, sampler=sampler,
            directions=["minimize" if o.minimize else "maximize" for o in spec.objectives],
            load_if_exists=True,
        )
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # asked by a search that was killed: its trial is rerun under a new number
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        self._asked: dict[str, int] = {}  # point as JSON -> optuna trial number

    def ask(self, count: int) -> list[Point]:
        points = []
        for _ in range(count):
            trial = self.study.ask()
            point: Point = {}
            for name, values in self.spec.dimensions().items():
                domain = self.spec.parameters.get(name)
                if isinstance(domain, Range) and all(isinstance(v, int) for v in values):
                    point[name] = trial.suggest_int(name, int(domain.range[0]), int(domain.range[1]),
                                                    step=int(domain.step))
                elif isinstance(domain, Range):
                    point[name] = round(trial.suggest_float(name, domain.range[0], domain.range[1],
                                                            step=domain.step), 10)
                else:
                    point[name] = trial.suggest_categorical(name, values)
            self._asked[json.dumps(point, sort_keys=True)] = trial.number
            points.append(point)
        return points

    def tell(self, point: Point, metrics: dict[str, float] | None) -> None:
        number = self._asked.pop(json.dumps(point, sort_keys=True), None)
        if number is None:
            return
        values = [metrics.get(o.metric) for o in self.spec.objectives] if metrics else [None]
        if any(value is None or value != value for value in values):
            self.study.tell(number, state=self._optuna.trial.TrialState.FAIL)
            return
        self.study.tell(number, [float(v) for v in values if v is not None])

    def completed(self) -> int:
        return len(self.study.get_trials(deepcopy=False,
                                         states=(self._optuna.trial.TrialState.COMPLETE,)))


def make_strategy(spec: SearchSpec, context: StrategyContext) -> Strategy:
    return STRATEGIES.create(spec, context)


"""The Pareto front of a search's trials, and the trial to register. Pure code.

A point dominates another when it is at least as good in every objective and better
in one (Deb et al. 2002, NSGA-II, Sec. II); the front is every point nothing dominates.
"""

from __future__ import annotations

from collections.abc import Sequence

from squeezeflow.compression.search.spec import Objective


def _scores(point: dict[str, float], objectives: Sequence[Objective]) -> tuple[float, ...] | None:
    """The point's objective values, each turned so that lower is better; None when one
    is missing or NaN (such a point is on no front)."""
    scores = []
    for objective in objectives:
        value = point.get(objective.metric)
        if value is None or value != value:
            return None
        scores.append(float(value) if objective.minimize else -float(value))
    return tuple(scores)


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[dict[str, float]], objectives: Sequence[Objective]) -> list[int]:
    """Indices (ascending) of the points no other point dominates. Points with equal
    scores are all on the front. O(n^2 k): searches have tens to hundreds of trials."""
    scored = [(index, _scores(point, objectives)) for index, point in enumerate(points)]
    valid = [(index, score) for index, score in scored if score is not None]
    return [
        index for index, score in valid
        if not any(dominates(other, score) for _, other in valid)
    ]


def best_index(points: Sequence[dict[str, float]], objectives: Sequence[Objective],
               allowed: Sequence[bool]) -> int | None:
    """The trial to register: among the allowed points (every constraint passed) on
    their own front, the best in the first objective (ties: the next objectives)."""
    candidates = [index for index, ok in enumerate(allowed) if ok]
    front = pareto_front([points[i] for i in candidates], objectives)
    if not front:
        return None
    ranked = [(_scores(points[candidates[i]], objectives), candidates[i]) for i in front]
    return min(ranked, key=lambda pair: (pair[0], pair[1]))[1]

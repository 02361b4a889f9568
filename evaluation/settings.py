"""What a recipe's `evaluation:` section sets: suites, batch sizes, latency repeats.

Apart from `suite.py` (which runs the evaluation and imports torch and the models) so
that a recipe is checked without importing them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from squeezeflow.compression.config import StrictModel
from squeezeflow.evaluation.task_specs import TaskSpec

Suite = Literal["quality", "latency", "memory", "size"]
ALL_SUITES: tuple[Suite, ...] = ("quality", "latency", "memory", "size")


class LatencySettings(StrictModel):
    warmup: int = Field(3, ge=0)  # first calls pay for allocation and thread start-up
    repeats: int = Field(10, ge=1)  # enough for a stable median on a quiet machine
    batch_size: int = Field(8, ge=1)
    # causal LMs: greedy tokens generated per timed decode; enough steps for a stable
    # per-token time, few enough that a repeat stays short on a CPU
    decode_tokens: int = Field(32, ge=2)


class EvaluationSettings(StrictModel):
    suites: tuple[Suite, ...] = ALL_SUITES
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=2)
    top_k: int = Field(5, ge=1)  # neighbours compared by the retrieval-agreement metric
    latency: LatencySettings = LatencySettings()
    # task accuracy on local, labelled tasks (evaluation/task_specs.py); run on base and candidate
    tasks: tuple[TaskSpec, ...] = ()

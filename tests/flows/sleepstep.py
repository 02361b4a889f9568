"""A test-only step that marks a file and sleeps, so a test can kill a run inside a stage;
then it halves the selected weights (a stage that changes nothing is refused)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.config import StepConfig
from squeezeflow.compression.step import Needs, Step, StepReport


class SleepConfig(StepConfig):
    kind: Literal["test-sleep"] = "test-sleep"
    seconds: float = 0.0
    marker: str = ""  # a file created when the step starts applying


class SleepStep(Step[SleepConfig]):
    needs = Needs.NOTHING

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        if self.config.marker:
            Path(self.config.marker).write_text("inside the stage\n")
        time.sleep(self.config.seconds)
        with torch.no_grad():
            for module in modules.values():
                module.weight.mul_(0.5)
        return StepReport(kind="test-sleep", per_module={n: {"slept": 1.0} for n in modules})


def register() -> None:
    CATALOG.remove("test-sleep")
    CATALOG.add(SleepConfig, SleepStep)

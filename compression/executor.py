"""The stage executor: apply one stage's steps to a model folder, write the output folder.

    reports = compress_stage("models/llama", [GPTQConfig(bits=4)], "out/llama-gptq",
                             calibration=batches, work="out/.llama-gptq.blocks")

One call, usable from a notebook; the Prefect task `run-stage` (`tasks/stages.py`) is a
thin wrapper that adds the content-addressed cache, the lock and the manifest check.
The executor picks how the stage runs:
- a step that writes its checkpoint itself (`gptq` with `backend: gptqmodel`) does so;
- block-wise steps stream (`compression/streaming.py`): weights read block by block,
  resumable from `work`, on `device`;
- the others (structure changes, training, ...) load the whole model, run the
  in-memory runners (`compression/runners.py`) and save it.
Every path refuses a stage that changed nothing (`compression/changes.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from squeezeflow.compression.artifact import load_compressed, save_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.changes import require_change, stage_baseline
from squeezeflow.compression.config import StepConfig
from squeezeflow.compression.runners import Batch, run_stage_steps
from squeezeflow.compression.step import Step, StepReport, TrainingContext
from squeezeflow.compression.streaming import Device, stream_stage, streaming_blocker

log = logging.getLogger(__name__)


def compress_stage(
    source: str | Path,
    configs: Sequence[StepConfig],
    output: str | Path,
    *,
    calibration: Sequence[Batch] = (),
    training: TrainingContext | None = None,
    work: str | Path | None = None,
    device: Device | str = "auto",
    stream: bool | None = None,
    name: str = "stage",
    metadata: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[StepReport]:
    """Write `output`: the model folder `source` after the steps `configs` (one stage).

    `calibration`: tokenized batches for steps that need data; `training`: what a step
    that trains needs. `work`: where a streamed stage keeps finished blocks, so a
    killed run resumes there. `stream`: None streams whenever the steps allow it.
    Returns one report per step.
    """
    source, output = Path(source), Path(output)
    steps = [CATALOG.build(config) for config in configs]
    writer = checkpoint_writer(steps)
    if writer is not None:  # the step loads, compresses and saves the model itself
        return [writer.write_checkpoint(source, calibration, output)]
    blocker = streaming_blocker(steps, source)
    if stream and blocker is not None:
        raise ValueError(f"stage {name} cannot stream: {blocker}")
    if stream is None:
        stream = blocker is None
    if stream:
        return stream_stage(source, steps, calibration, output, work=work, device=device,
                            name=name, metadata=metadata, progress=progress)
    log.info("stage %s runs in memory (%s)", name, blocker or "streaming turned off")
    loaded = load_compressed(source)
    baseline = stage_baseline(loaded.model, configs)
    reports = run_stage_steps(loaded.model, steps, calibration, progress=progress, training=training)
    require_change(name, baseline, loaded.model)  # a no-op stage is an error
    save_compressed(loaded.model, loaded.tokenizer, loaded.kind, output, metadata=metadata)
    return reports


def checkpoint_writer(steps: Sequence[Step[Any]]) -> Step[Any] | None:
    """The stage's step that writes the whole checkpoint itself, if any; it must be alone."""
    writers = [step for step in steps if step.writes_checkpoint]
    if writers and len(steps) > 1:
        raise ValueError(
            f"{writers[0].config.kind} writes the stage's whole checkpoint and must be "
            "the only step of its stage"
        )
    return writers[0] if writers else None

"""Thin Prefect tasks around the library: each takes and returns references."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NONE
from pydantic import BaseModel
from transformers import AutoConfig

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import load_texts, texts_sha256, tokenized_batches
from squeezeflow.compression.executor import compress_stage
from squeezeflow.compression.integrity import (
    IntegrityError,
    atomic_folder,
    atomic_write_text,
    folder_lock,
    has_manifest,
    remove_leftovers,
    verify_folder,
    write_manifest,
)
from squeezeflow.compression.models import detect_kind, load_tokenizer, resolve_source
from squeezeflow.compression.progress import advance
from squeezeflow.compression.progress import scope as progress_scope
from squeezeflow.compression.step import TrainingContext
from squeezeflow.evaluation.gates import Gate, GateResult, check_gates
from squeezeflow.evaluation.report import comparison_rows
from squeezeflow.evaluation.suite import (
    EvaluationReport,
    EvaluationSettings,
    ReferenceCache,
    evaluate,
)
from squeezeflow.recipe import TRAINING_NEEDS, DataSpec, ModelSpec, StageSpec
from squeezeflow.registry.card import model_card
from squeezeflow.registry.records import RegisteredVersion, RunRecord
from squeezeflow.registry.runs import artifact_uris, download_model, log_and_register
from squeezeflow.tasks.refs import CheckpointRef, DataRef, code_version, folder_sha256, workspace

log = logging.getLogger("squeezeflow")

STAGE_FILE = "stage.json"  # written last into a stage's output: its metrics and timing


class StageResult(BaseModel):
    name: str
    checkpoint: CheckpointRef
    seconds: float
    metrics: dict[str, float]
    reused: bool  # True when an identical stage output already existed
    curves: dict[str, list[tuple[int, float]]] = {}  # training curves by step (training stages)


class TrainingRef(BaseModel):
    """What a stage that trains needs besides its source: the text and the teacher."""

    data: DataRef
    spec: DataSpec  # batch size and max length of the training batches
    teacher: CheckpointRef | None = None


@task(name="materialize-model", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 20])
def materialize_model(spec: ModelSpec, tracking_uri: str | None = None) -> CheckpointRef:
    """A local folder for the base model: bundled default, path, hub id, or `models:/...`.

    A registered version is downloaded once into the workspace (under a lock, whole or
    not at all) and checked against the version's hash tag every time it is used.
    """
    if spec.source.startswith("models:/"):  # a version in the registry (lineage: base version)
        name = hashlib.sha256(spec.source.encode()).hexdigest()[:16]
        with folder_lock(workspace() / "locks" / f"base-{name}.lock", what=spec.source):
            path = download_model(spec.source, tracking_uri, destination=workspace() / "bases" / name)
    else:
        path = resolve_source(spec.source, spec.revision)
    kind = spec.kind if spec.kind != "auto" else detect_kind(AutoConfig.from_pretrained(path))
    log.info("base model %s (%s)", path, kind)
    digest = verify_folder(path) if has_manifest(path) else folder_sha256(path)
    return CheckpointRef(path=str(path), sha256=digest, kind=kind)


@task(name="materialize-data", cache_policy=NONE)
def materialize_data(spec: DataSpec) -> DataRef:
    """The selected texts as a JSON file in the workspace, named by their hash.

    Written atomically; an existing file is reused only if its content still hashes to
    its name (a file damaged by a crash or an edit is rewritten).
    """
    texts = load_texts(
        spec.source, split=spec.split, text_field=spec.text_field,
        num_samples=spec.num_samples, subset=spec.subset,
    )
    digest = texts_sha256(texts)
    path = workspace() / "data" / f"{digest}.json"
    if not _holds_texts(path, digest):
        atomic_write_text(path, json.dumps(texts))
    return DataRef(path=str(path), sha256=digest, count=len(texts))


def _holds_texts(path: Path, digest: str) -> bool:
    try:
        return texts_sha256(json.loads(path.read_text())) == digest
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def read_texts(ref: DataRef) -> list[str]:
    texts: list[str] = json.loads(Path(ref.path).read_text())
    return texts


def stage_key(stage: StageSpec, source: CheckpointRef, calibration: DataRef | None, seed: int,
              calibration_spec: DataSpec | None, training: TrainingRef | None = None) -> str:
    """Content address of a stage's output: what it starts from and what it does."""
    parts: dict[str, Any] = {
        "source": source.sha256,
        "stage": stage.model_dump(mode="json"),
        "calibration": calibration.sha256 if calibration else None,
        "calibration_spec": calibration_spec.model_dump(mode="json") if calibration_spec else None,
        "seed": seed,
        "code": code_version(),
    }
    if training is not None:  # only training stages carry it: other stages keep their keys
        parts["training"] = {
            "data": training.data.sha256, "spec": training.spec.model_dump(mode="json"),
            "teacher": training.teacher.sha256 if training.teacher else None,
        }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@task(name="run-stage", cache_policy=NONE)
def run_stage(
    stage: StageSpec,
    source: CheckpointRef,
    calibration: DataRef | None,
    calibration_spec: DataSpec | None,
    seed: int,
    use_cache: bool = True,
    training: TrainingRef | None = None,
    device: str = "auto",
) -> StageResult:
    """Apply one stage to `source`; the output folder is written whole or not at all.

    The folder is named by the content hash of everything the stage depends on
    (input checkpoint, stage config, calibration data, seed, code version), so an
    unchanged stage is reused instead of recomputed, also after a crash in a later
    stage; `use_cache=False` recomputes and replaces it. A cached folder is reused only
    if every file still matches its manifest; otherwise it is recomputed. Runs of the
    same stage (same folder) take turns under a lock: the second one waits and reuses
    the first one's output. A stage that trains keeps a resumable checkpoint under
    `training/<same hash>` until its output is complete, so a killed run continues
    training where it stopped.
    """
    key = stage_key(stage, source, calibration, seed, calibration_spec, training)
    checkpoints = workspace() / "checkpoints"
    output = checkpoints / key
    with folder_lock(workspace() / "locks" / f"{key}.lock", what=f"stage {stage.name}"):
        remove_leftovers(checkpoints, key)  # partial outputs of killed runs of this stage
        if not use_cache:  # recompute everything: no block of an earlier run is kept either
            shutil.rmtree(blocks_folder(key), ignore_errors=True)
        cached = _cached_stage(stage.name, output, source.kind) if use_cache else None
        if cached is not None:
            advance(f"stage {stage.name}", 1, 1, "cached")
            return cached
        advance(f"stage {stage.name}", 0, 1)
        with progress_scope(stage.name):
            result = _compute_stage(stage, source, calibration, calibration_spec, seed, training,
                                    key, output, device)
        advance(f"stage {stage.name}", 1, 1, f"{result.seconds:.1f} s")
        return result


def _cached_stage(name: str, output: Path, kind: str) -> StageResult | None:
    """The stage output at `output` if it is complete and intact, else None."""
    done = output / STAGE_FILE
    if not done.exists():
        return None
    try:
        digest = verify_folder(output)
    except IntegrityError as error:
        log.warning("stage %s: cached output is damaged (%s); recomputing it", name, error)
        return None
    saved = json.loads(done.read_text())
    os.utime(done)  # last use, for `squeeze cache gc`
    log.info("stage %s: cached, reusing %s", name, output)
    return StageResult(
        name=name, checkpoint=CheckpointRef(path=str(output), sha256=digest, kind=kind),
        seconds=saved["seconds"], metrics=saved["metrics"], reused=True,
        curves=saved.get("curves", {}),
    )


def _compute_stage(
    stage: StageSpec, source: CheckpointRef, calibration: DataRef | None,
    calibration_spec: DataSpec | None, seed: int, training: TrainingRef | None,
    key: str, output: Path, device: str = "auto",
) -> StageResult:
    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(Path(source.path))
    batches = []
    if calibration is not None and calibration_spec is not None:
        batches = list(tokenized_batches(
            read_texts(calibration), tokenizer,
            batch_size=calibration_spec.batch_size, max_length=calibration_spec.max_length,
        ))
    context = None
    if training is not None:
        context = TrainingContext(
            batches=list(tokenized_batches(
                read_texts(training.data), tokenizer,
                batch_size=training.spec.batch_size, max_length=training.spec.max_length,
            )),
            folder=workspace() / "training" / key,
            teacher=Path(training.teacher.path) if training.teacher else None,
            seed=seed,
        )
    with atomic_folder(output) as staging:
        reports = compress_stage(
            source.path, stage.steps, staging, calibration=batches, training=context,
            work=blocks_folder(key), device=device, name=stage.name,
            metadata={"stage": stage.name, "source_sha256": source.sha256},
            progress=lambda m: log.info("stage %s: %s", stage.name, m),
        )
        seconds = time.perf_counter() - start
        metrics: dict[str, float] = {}
        curves: dict[str, list[tuple[int, float]]] = {}
        for index, report in enumerate(reports):
            label = f"{index}.{report.kind}"
            metrics |= {f"{label}.{name}": value for name, value in report.metrics.items()}
            curves |= {f"{label}.{name}": points for name, points in report.curves.items()}
            for module, values in report.per_module.items():
                metrics |= {f"{label}.{module}.{name}": value for name, value in values.items()}
        (staging / STAGE_FILE).write_text(
            json.dumps({"stage": stage.name, "seconds": seconds, "metrics": metrics, "curves": curves})
        )
        digest = write_manifest(staging)  # last: it covers every file, stage.json included
    if context is not None:  # the stage is complete: its resumable checkpoint is not needed
        shutil.rmtree(context.folder, ignore_errors=True)
    log.info("stage %s done in %.1f s", stage.name, seconds)
    return StageResult(
        name=stage.name,
        checkpoint=CheckpointRef(path=str(output), sha256=digest, kind=source.kind),
        seconds=seconds, metrics=metrics, reused=False, curves=curves,
    )


def blocks_folder(key: str) -> Path:
    """Where a streamed stage keeps its finished blocks until its output is complete."""
    return workspace() / "blocks" / key


def training_inputs(
    stage: StageSpec, base: CheckpointRef, data: DataRef | None, spec: DataSpec | None,
    tracking_uri: str | None = None,
) -> TrainingRef | None:
    """The training text and teacher of a stage that trains; None for other stages.

    A step that trains against a teacher names it in its `teacher` field: "base" (the
    recipe's base model), a registered version `models:/NAME/VERSION` (downloaded here)
    or a model folder.
    """
    trainers = [step for step in stage.steps if CATALOG.entry(step.kind).config_cls.needs in TRAINING_NEEDS]
    if not trainers:
        return None
    if data is None or spec is None:
        raise ValueError(f"stage {stage.name} trains the model; the recipe needs a 'training' section")
    source = getattr(trainers[0], "teacher", None)
    teacher = None
    if source == "base":
        teacher = base
    elif source:
        teacher = materialize_model(ModelSpec(source=source), tracking_uri)
    return TrainingRef(data=data, spec=spec, teacher=teacher)


@task(name="evaluate", cache_policy=NONE)
def evaluate_candidate(
    base: CheckpointRef, candidate: CheckpointRef, data: DataRef, settings: EvaluationSettings,
    use_cache: bool = True,
) -> EvaluationReport:
    """Evaluate against the base; the base's side of the quality metrics is kept in the
    workspace (`use_cache`), so trials and reruns against the same base compute it once."""
    phases: list[str] = []  # what the evaluation has started, in order

    def tell(message: str) -> None:
        log.info(message)
        advance("evaluation", len(phases), None, message)
        phases.append(message)

    references = (ReferenceCache(workspace() / "references", f"{base.sha256} {code_version()}")
                  if use_cache else None)
    report = evaluate(Path(base.path), Path(candidate.path), read_texts(data), settings,
                      progress=tell, references=references)
    advance("evaluation", len(phases), len(phases), "done")
    return report


@task(name="check-gates", cache_policy=NONE)
def gate_results(gates: tuple[Gate, ...], metrics: dict[str, float]) -> list[GateResult]:
    return check_gates(list(gates), metrics)


@task(name="register", cache_policy=NONE)
def register(record: RunRecord) -> RegisteredVersion:
    """Log and register; safe to retry (a version created by an earlier attempt is reused)."""
    advance("registering", 0, None, f"{record.model_name} in MLflow")
    registered = log_and_register(record)
    advance("registering", 1, 1, f"{record.model_name} version {registered.version}")
    return registered


@task(name="publish-report", cache_policy=NONE)
def publish_report(record: RunRecord, registered: RegisteredVersion) -> None:
    """The comparison table and model card as Prefect artifacts of this flow run."""
    key = re.sub(r"[^a-z0-9-]", "-", record.model_name.lower())
    rows = [row.model_dump() for row in comparison_rows(record.metrics)]
    create_table_artifact(rows, key=f"{key}-comparison",
                          description=f"{record.model_name} v{registered.version} vs base")
    create_markdown_artifact(model_card(record), key=f"{key}-model-card",
                             description=f"model card of {record.model_name} v{registered.version}")
    plots = artifact_uris(registered.run_id, "plots", record.tracking_uri)
    for name, uri in sorted(plots.items()):
        create_link_artifact(uri, link_text=name, key=f"{key}-{name.removesuffix('.png').replace('_', '-')}",
                             description=f"{name} of {record.model_name} v{registered.version} (MLflow artifact)")

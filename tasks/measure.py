"""Build a recipe's candidate stage by stage and evaluate it against its base: the body
of the `compress` flow before registering, and of each search trial (`tasks/search.py`).
A plain function calling tasks, so that flows and tasks both use it and tasks never
import a flow module."""

from __future__ import annotations

from prefect.runtime import flow_run
from pydantic import BaseModel

from squeezeflow.recipe import Recipe
from squeezeflow.registry.records import RunRecord, StageRecord
from squeezeflow.tasks.exports import export_candidate
from squeezeflow.tasks.refs import code_version
from squeezeflow.tasks.stages import (
    StageResult,
    evaluate_candidate,
    gate_results,
    materialize_data,
    materialize_model,
    run_stage,
    training_inputs,
)


class Measured(BaseModel):
    """A candidate built and evaluated, not registered: what registering it needs."""

    record: RunRecord
    stages: list[StageResult]

    @property
    def cache_hits(self) -> int:
        return sum(stage.reused for stage in self.stages)



def measure_recipe(recipe: Recipe, use_cache: bool = True) -> Measured:
    """Build the candidate stage by stage and evaluate it against the base; a search's
    trial stops here (only its best trial is registered)."""
    model = recipe.model.pinned()  # a hub id's revision -> the commit it names now (one commit per run)
    base = materialize_model(model, recipe.registration.tracking_uri)
    calibration = (
        materialize_data(recipe.calibration)
        if recipe.calibration is not None and recipe.needs_calibration()
        else None
    )
    training_data = (
        materialize_data(recipe.training)
        if recipe.training is not None and recipe.needs_training()
        else None
    )
    evaluation_data = materialize_data(recipe.evaluation.data)

    current = base
    stages: list[StageResult] = []
    for stage in recipe.stages:
        training = training_inputs(
            stage, base, training_data, recipe.training, recipe.registration.tracking_uri
        )
        result = run_stage(
            stage, current, calibration, recipe.calibration, recipe.seed, use_cache=use_cache,
            training=training, device=recipe.device,
        )
        stages.append(result)
        current = result.checkpoint

    settings = recipe.evaluation.model_copy()
    report = evaluate_candidate(base, current, evaluation_data, settings, use_cache=use_cache)
    gates = gate_results(recipe.gates, report.metrics)
    exports = [export_candidate(current, spec.format) for spec in recipe.export]
    data_sha256 = {"evaluation": evaluation_data.sha256}
    if calibration is not None:
        data_sha256["calibration"] = calibration.sha256
    if training_data is not None:
        data_sha256["training"] = training_data.sha256
    record = RunRecord(
        recipe_name=recipe.name,
        recipe=recipe.as_mapping(),
        recipe_sha256=recipe.sha256(),
        model_name=recipe.registration.model_name,
        experiment=recipe.registration.experiment,
        tracking_uri=recipe.registration.tracking_uri,
        alias=recipe.registration.alias,
        base_model=recipe.model.source,
        base_sha256=base.sha256,
        base_revision=model.revision,
        kind=base.kind,
        data_sha256=data_sha256,
        stages=[
            StageRecord(name=s.name, checkpoint_sha256=s.checkpoint.sha256, seconds=s.seconds,
                        metrics=s.metrics, curves=s.curves)
            for s in stages
        ],
        metrics=report.metrics,
        gate_results=gates,
        model_dir=current.path,
        candidate_sha256=current.sha256,
        code_version=code_version(),
        flow_run_id=str(flow_run.get_id() or ""),
        evaluation_tags=report.tags,
        exports=exports,
    )
    return Measured(record=record, stages=stages)

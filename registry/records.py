"""What a finished compression run hands to the registry."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from squeezeflow.compression.exports.base import ExportRecord
from squeezeflow.evaluation.gates import GateResult


class StageRecord(BaseModel):
    name: str
    checkpoint_sha256: str
    seconds: float
    metrics: dict[str, float] = Field(default_factory=dict)
    # training curves: metric -> [(step, value), ...], logged as metric histories by step
    curves: dict[str, list[tuple[int, float]]] = Field(default_factory=dict)


class RunRecord(BaseModel):
    recipe_name: str
    recipe: dict[str, Any]  # the validated recipe, logged flattened as params
    recipe_sha256: str
    model_name: str
    experiment: str
    tracking_uri: str | None
    alias: str
    base_model: str
    base_sha256: str
    base_revision: str | None = None  # the hub commit a hub-id base was pinned to
    kind: str
    data_sha256: dict[str, str]  # "calibration" / "evaluation" -> content hash
    stages: list[StageRecord]
    metrics: dict[str, float]
    gate_results: list[GateResult]
    model_dir: str
    candidate_sha256: str
    code_version: str
    flow_run_id: str | None = None
    # what the evaluation ran on (cpu_capability, cpu_model, torch_version, threads,
    # kernel_mix): tags `squeezeflow.<key>` on the run and the model version
    evaluation_tags: dict[str, str] = Field(default_factory=dict)
    # the recipe's `export:` list, written from the candidate: logged under exports/<format>/,
    # digests tagged on the version (registry/exports.py)
    exports: list[ExportRecord] = Field(default_factory=list)

    @property
    def gates_passed(self) -> bool:
        return all(result.passed for result in self.gate_results)


class RegisteredVersion(BaseModel):
    model_name: str
    version: str
    run_id: str
    aliases: list[str]
    gates_passed: bool
    tracking_uri: str

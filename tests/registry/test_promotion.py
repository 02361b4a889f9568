"""Promotion: gates, champion alias, tags, rollback and refusals against a real `mlflow
server` (slow); comparability and registry errors on a local SQLite registry (fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from typer.testing import CliRunner

from squeezeflow.cli import app
from squeezeflow.evaluation.gates import PromotionGates
from squeezeflow.registry.promotion import HISTORY_TAG, PromotionError, promote, rollback
from squeezeflow.registry.store import experiment_id

MODEL = "promo-bert"


@pytest.fixture(scope="module")
def three_candidates(mlflow_server: str, tiny_bert_dir: Path, text_files: dict[str, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> str:
    """Versions 1-3 of MODEL on the server: int8, int4 g32, int2 g64 (worst)."""
    from squeezeflow.flows.compress import compress

    folder = tmp_path_factory.mktemp("promotion")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.setenv("SQUEEZEFLOW_HOME", str(folder / ".squeezeflow"))
        patch.chdir(folder)
        for bits, group in ((8, None), (4, 32), (2, 64)):
            raw = {
                "name": f"bert-int{bits}",
                "model": {"source": str(tiny_bert_dir)},
                "evaluation": {"data": {"source": str(text_files["evaluation"]),
                                        "num_samples": 32},
                               "max_length": 32, "suites": ["quality", "size"]},
                "stages": [{"name": "q", "steps": [
                    {"kind": "rtn", "bits": bits, "group_size": group}]}],
                "gates": [{"metric": "compression_ratio", "min": 1.0}],
                "registration": {"model_name": MODEL},
            }
            path = folder / f"int{bits}.yaml"
            path.write_text(yaml.safe_dump(raw))
            assert compress(str(path)).registered.gates_passed
    return mlflow_server


def aliases(client: MlflowClient) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(MODEL).aliases.items()}


def fidelity(client: MlflowClient, version: str) -> float:
    run_id = client.get_model_version(MODEL, version).run_id
    return float(client.get_run(run_id).data.metrics["fidelity_cosine"])


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_promotion_rollback_and_refusals(three_candidates: str) -> None:
    server = three_candidates
    client = MlflowClient(tracking_uri=server, registry_uri=server)
    assert fidelity(client, "1") > fidelity(client, "2") > fidelity(client, "3")
    drop_2, drop_3 = 1.0 - fidelity(client, "2"), 1.0 - fidelity(client, "3")
    assert drop_3 > 2 * drop_2  # int2 really is worse, so a gate between them rejects it
    gate = (drop_2 + drop_3) / 2

    # missing metric: these runs measured no latency, so a speed gate cannot pass
    outcome = promote(MODEL, PromotionGates(min_speedup=0.5), tracking_uri=server)
    assert not outcome.promoted and "champion" not in aliases(client)
    assert client.get_model_version(MODEL, "1").tags["promotion.gates"].startswith(
        "fail: speedup >= 0.5 (missing)")

    # first promotion: the int2 candidate fails the quality gate; the best passing wins
    outcome = promote(MODEL, PromotionGates(max_quality_drop=gate), tracking_uri=server,
                      decided_by="test")
    assert outcome.promoted and outcome.champion == "1" and outcome.previous_champion is None
    assert aliases(client)["champion"] == "1"
    v1, v3 = client.get_model_version(MODEL, "1"), client.get_model_version(MODEL, "3")
    assert v1.tags["promotion.result"] == "promoted" and v1.tags["promotion.by"] == "test"
    assert v1.tags["promotion.against"] == "base" and v1.tags["promotion.at"]
    assert v3.tags["promotion.result"] == "rejected"
    assert "fail: quality_drop_vs_base" in v3.tags["promotion.gates"]

    # the failing candidate never becomes champion, even when asked for by version
    outcome = promote(MODEL, PromotionGates(max_quality_drop=gate), version="3", tracking_uri=server)
    assert not outcome.promoted and aliases(client)["champion"] == "1"

    # version 2 against champion 1 with a loose gate: promoted; the history remembers 1
    outcome = promote(MODEL, PromotionGates(max_quality_drop=0.5), version="2", tracking_uri=server)
    assert outcome.champion == "2" and outcome.previous_champion == "1"
    assert client.get_model_version(MODEL, "2").tags["promotion.previous_champion"] == "1"
    assert client.get_model_version(MODEL, "2").tags["promotion.against"] == "1"

    restored = rollback(MODEL, tracking_uri=server)
    assert restored.champion == "1" and aliases(client)["champion"] == "1"
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(MODEL, tracking_uri=server)
    assert aliases(client)["champion"] == "1"

    # refusals change nothing
    with pytest.raises(PromotionError, match="no registered model named 'nope'; known models: "):
        promote("nope", PromotionGates(max_quality_drop=0.5), tracking_uri=server)
    with pytest.raises(PromotionError, match="has no alias 'staging'"):
        promote(MODEL, PromotionGates(max_quality_drop=0.5), alias="staging", tracking_uri=server)
    with pytest.raises(PromotionError, match="no promotion gates"):
        promote(MODEL, PromotionGates(), tracking_uri=server)
    assert aliases(client)["champion"] == "1"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_cli_promote_exit_codes(three_candidates: str) -> None:
    from tests.conftest import free_port

    runner = CliRunner()
    unreachable = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["promote", MODEL, "--max-quality-drop", "0.5",
                                 "--tracking-uri", unreachable])
    assert result.exit_code == 2 and "unreachable" in result.output
    result = runner.invoke(app, ["promote", MODEL, "--max-size-mb", "0.000001",
                                 "--tracking-uri", three_candidates])
    assert result.exit_code == 3, result.output
    assert "no candidate passed every gate" in result.output


# --- comparability and registry errors, on a local SQLite registry ----------------------

UNIT = "unit-model"
DATA_A, DATA_B = "a" * 64, "9" * 64  # evaluation data hashes
BASE_A, BASE_B = "b" * 64, "8" * 64  # base model hashes
LOOSE = PromotionGates(max_quality_drop=0.5)


def add_version(client: MlflowClient, fidelity: float, data: str = DATA_A,
                base: str = BASE_A) -> str:
    """A registered version whose run measured `fidelity`, tagged like `squeeze run` does."""
    run = client.create_run(experiment_id(client, "promotion-unit"))
    client.log_metric(run.info.run_id, "fidelity_cosine", fidelity)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{UNIT}'"):
        client.create_registered_model(UNIT)
    version = client.create_model_version(
        UNIT, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
        tags={"gate": "passed", "squeezeflow.evaluation_sha256": data,
              "squeezeflow.base_sha256": base},
    )
    return str(version.version)


@pytest.fixture
def champion_1(workdir: Path) -> MlflowClient:
    """Version 1 (fidelity 0.95, data A, base A) is the champion."""
    client = MlflowClient()
    add_version(client, 0.95)
    outcome = promote(UNIT, LOOSE, version="1", decided_by="test")
    assert outcome.champion == "1"
    return client


def champion(client: MlflowClient) -> str | None:
    number = client.get_registered_model(UNIT).aliases.get("champion")
    return None if number is None else str(number)


def promotion_tags(client: MlflowClient, version: str) -> dict[str, str]:
    tags = client.get_model_version(UNIT, version).tags
    return {k: v for k, v in tags.items() if k.startswith("promotion.")}


def test_a_candidate_evaluated_on_other_data_or_base_is_refused(champion_1: MlflowClient) -> None:
    client = champion_1
    other_data = add_version(client, 0.99, data=DATA_B)  # better, but on other data
    with pytest.raises(PromotionError, match=f"evaluation_sha256: {DATA_B} vs {DATA_A}"):
        promote(UNIT, LOOSE, version=other_data)
    other_base = add_version(client, 0.99, base=BASE_B)
    with pytest.raises(PromotionError, match=f"base_sha256: {BASE_B} vs {BASE_A}"):
        promote(UNIT, LOOSE, version=other_base)
    assert champion(client) == "1"
    assert promotion_tags(client, other_data) == {} and promotion_tags(client, other_base) == {}

    result = CliRunner().invoke(app, ["promote", UNIT, "--version", other_data,
                                      "--max-quality-drop", "0.5"])
    assert result.exit_code == 2, result.output
    assert "not comparable" in result.output and champion(client) == "1"


def test_among_candidates_only_comparable_ones_compete(champion_1: MlflowClient) -> None:
    client = champion_1
    other_data = add_version(client, 0.999, data=DATA_B)  # the best figure, not comparable
    same_data = add_version(client, 0.97)
    outcome = promote(UNIT, LOOSE)
    assert outcome.promoted and outcome.champion == same_data and champion(client) == same_data
    refused = {d.version: d.refused for d in outcome.decisions}
    assert refused[same_data] is None and DATA_B in (refused[other_data] or "")
    assert promotion_tags(client, other_data)["promotion.result"].startswith("refused: ")


# Each registry read promotion makes; a failure in any of them must abort it.
READS = ["get_registered_model", "get_model_version", "get_run", "search_model_versions"]


@pytest.mark.parametrize("read", READS)
def test_a_registry_error_while_reading_moves_no_alias_and_exits_2(
    champion_1: MlflowClient, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    client = champion_1
    candidate = add_version(client, 0.97)  # would be promoted if the reads succeeded
    original = getattr(MlflowClient, read)
    calls: list[int] = []

    def failing(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if read == "get_registered_model" and len(calls) == 1:
            return original(self, *args, **kwargs)  # the existence check passes
        raise MlflowException(f"injected {read} failure", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, read, failing)
    # the champion read by alias, as the old code did: a failure must not mean "none"
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", failing)
    result = CliRunner().invoke(app, ["promote", UNIT, "--max-quality-drop", "0.5"])
    monkeypatch.undo()

    assert result.exit_code == 2, result.output
    assert "registry error while reading" in result.output and "no alias moved" in result.output
    assert champion(client) == "1" and promotion_tags(client, candidate) == {}


def test_a_failed_write_puts_the_champion_back(champion_1: MlflowClient,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client = champion_1
    candidate = add_version(client, 0.97)

    def failing(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        raise MlflowException("injected history write failure",
                              error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", failing)
    with pytest.raises(PromotionError, match=r"no alias moved \(champion is version 1\)"):
        promote(UNIT, LOOSE, version=candidate)
    monkeypatch.undo()
    assert champion(client) == "1"
    assert client.get_registered_model(UNIT).tags[HISTORY_TAG] == '["1"]'


def test_a_champion_moved_meanwhile_is_not_overwritten(champion_1: MlflowClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    client = champion_1
    candidate, rival = add_version(client, 0.97), add_version(client, 0.96)
    original = MlflowClient.set_model_version_tag

    def rival_promotes_first(self: MlflowClient, *args: Any, **kwargs: Any) -> None:
        if champion(client) == "1":  # another promotion lands while this one records
            client.set_registered_model_alias(UNIT, "champion", rival)
        original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", rival_promotes_first)
    with pytest.raises(PromotionError, match=f"moved to {rival} while"):
        promote(UNIT, LOOSE, version=candidate)
    assert champion(client) == rival

"""Promotion against a real `mlflow server`: gates, champion alias, tags, rollback, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from squeezeflow.cli import app
from squeezeflow.evaluation.gates import PromotionGates
from squeezeflow.registry.promotion import PromotionError, promote, rollback

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

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

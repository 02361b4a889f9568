"""End to end: the compress flow on tiny models made here, checked through the MLflow API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from squeezeflow.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def write_recipe(folder: Path, model_dir: Path, text_files: dict[str, Path], stages: list,
                 gates: list, name: str) -> Path:
    raw = {
        "name": name,
        "model": {"source": str(model_dir)},
        "calibration": {"source": str(text_files["calibration"]), "num_samples": 16},
        "evaluation": {
            "data": {"source": str(text_files["evaluation"]), "num_samples": 32},
            "max_length": 32,
            "latency": {"warmup": 1, "repeats": 3, "batch_size": 4},
        },
        "stages": stages,
        "gates": gates,
        "registration": {"model_name": name},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_causal_lm_end_to_end(workdir: Path, trained_llama_dir: Path,
                              text_files: dict[str, Path]) -> None:
    from squeezeflow.flows.compress import compress

    stages = [
        {"name": "prune", "steps": [{"kind": "magnitude", "sparsity": 0.2}]},
        {"name": "quantize", "steps": [{"kind": "rtn", "bits": 4, "group_size": 32}]},
    ]
    gates = [{"metric": "perplexity_ratio", "max": 1.5}, {"metric": "compression_ratio", "min": 1.5}]
    path = write_recipe(workdir, trained_llama_dir, text_files, stages, gates, "tiny-llama-q4")
    result = compress(str(path))

    client = MlflowClient()
    version = client.get_model_version("tiny-llama-q4", result.registered.version)
    assert version.aliases == ["candidate"]
    assert version.tags["gate"] == "passed"
    assert len(version.tags["squeezeflow.recipe_sha256"]) == 64
    assert len(version.tags["squeezeflow.evaluation_sha256"]) == 64
    # what the speeds were measured on travels with the version
    assert version.tags["squeezeflow.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert version.tags["squeezeflow.torch_version"] == torch.__version__
    assert version.tags["squeezeflow.cpu_model"]
    assert sum(json.loads(version.tags["squeezeflow.kernel_mix"]).values()) > 0  # packed layers ran
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    # the base was trained (chance is ~280), and the compressed model stays close to it
    assert metrics["base_perplexity"] < 10
    assert metrics["perplexity"] != metrics["base_perplexity"]
    assert metrics["perplexity"] < 1.5 * metrics["base_perplexity"]
    assert metrics["compression_ratio"] > 1.5
    assert metrics["weights_mb"] < metrics["base_weights_mb"]
    for name in ("latency_p50_ms", "latency_p95_ms", "peak_memory_mb", "base_peak_memory_mb",
                 "speedup", "parameters", "decode_tokens_per_s", "base_decode_tokens_per_s",
                 "decode_speedup"):
        assert metrics[name] > 0, name
    assert run.data.params["stages.1.steps.0.bits"] == "4"
    for tag in ("base_model", "base_sha256", "code_version", "flow_run_id", "model_sha256",
                "cpu_capability", "cpu_model", "threads", "kernel_mix"):
        assert run.data.tags[f"squeezeflow.{tag}"], tag
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(c.data.tags["mlflow.runName"] for c in children) == [
        "stage 0: prune", "stage 1: quantize"]
    prune = next(c for c in children if c.data.tags["mlflow.runName"] == "stage 0: prune")
    assert prune.data.metrics["0.magnitude.mean_sparsity"] == pytest.approx(0.2, abs=1e-3)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "report.json", "model_card.md", "comparison.md", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/quality_vs_size.png", "plots/quality_vs_latency.png"}
    png = Path(client.download_artifacts(run.info.run_id, "plots/quality_vs_size.png", str(workdir)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    comparison = Path(client.download_artifacts(run.info.run_id, "comparison.md", str(workdir)))
    assert "| perplexity |" in comparison.read_text()
    card = Path(client.download_artifacts(run.info.run_id, "model_card.md", str(workdir)))
    assert f"{metrics['perplexity']:.6g}" in card.read_text()
    assert f"({torch.backends.cpu.get_cpu_capability()}, " in card.read_text()

    # the same comparison is a Prefect artifact of the flow run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-llama-q4-comparison"])))
    assert found and "perplexity" in str(found[0].data)
    with get_client(sync_client=True) as prefect:
        links = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["tiny-llama-q4-quality-vs-size"])))
    assert links and "plots/quality_vs_size.png" in str(links[0].data)

    # the registered model loads back and generates
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model("models:/tiny-llama-q4@candidate")
    generated = loaded.predict(["The robot"], params={"max_new_tokens": 3})
    assert generated[0].startswith("The robot") and len(generated[0]) > len("The robot")


def test_encoder_end_to_end_and_list(workdir: Path, tiny_bert_dir: Path,
                                     text_files: dict[str, Path]) -> None:
    from squeezeflow.compression.artifact import load_compressed
    from squeezeflow.flows.compress import compress
    from squeezeflow.registry.runs import download_model

    stages = [{"name": "quantize", "steps": [{"kind": "rtn", "bits": 8}]}]
    # an impossible gate: the version is registered, but gets no alias
    gates = [{"metric": "fidelity_cosine", "min": 0.9}, {"metric": "speedup", "min": 100.0}]
    path = write_recipe(workdir, tiny_bert_dir, text_files, stages, gates, "tiny-bert-q8")
    result = compress(str(path))
    assert result.registered.gates_passed is False
    client = MlflowClient()
    version = client.get_model_version("tiny-bert-q8", result.registered.version)
    assert version.aliases == [] and version.tags["gate"] == "failed"
    assert version.tags["gate.1"].startswith("fail: speedup >= 100")
    assert version.tags["squeezeflow.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    metrics = client.get_run(version.run_id).data.metrics
    assert "decode_tokens_per_s" not in metrics  # decoding is timed for causal LMs only
    assert metrics["fidelity_cosine"] > 0.99
    assert 0.9 < metrics["fidelity_spearman"] <= 1.0
    assert 0.5 < metrics["fidelity_topk"] <= 1.0

    # the artifact loads back through squeezeflow's loader and produces the same embeddings
    folder = download_model(f"models:/tiny-bert-q8/{version.version}")
    loaded = load_compressed(folder)
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(f"models:/tiny-bert-q8/{version.version}")
    embeddings = np.asarray(pyfunc.predict(["The robot repaired the garden fence."]))
    assert embeddings.shape == (1, 64)
    batch = loaded.tokenizer(["The robot repaired the garden fence."], return_tensors="pt")
    from squeezeflow import load_compressed as load_packed
    from squeezeflow.compression.models import mean_pooled_embeddings

    packed = load_packed(str(folder))  # what the pyfunc serves: the packed int8 runtime
    with torch.no_grad():
        direct = mean_pooled_embeddings(packed.model, batch["input_ids"], batch["attention_mask"])
        dense = mean_pooled_embeddings(loaded.model, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(embeddings, direct.numpy(), atol=1e-6)
    np.testing.assert_allclose(direct.numpy(), dense.numpy(), atol=1e-3)  # kernels vs fp32

    listing = CliRunner().invoke(app, ["list", "tiny-bert-q8", "--json"])
    assert listing.exit_code == 0, listing.output
    rows = json.loads(listing.output)
    assert [(r["name"], r["version"], r["tags"]["gate"]) for r in rows] == [
        ("tiny-bert-q8", 1, "failed")]
    assert rows[0]["metrics"]["fidelity_cosine"] == metrics["fidelity_cosine"]
    table = CliRunner().invoke(app, ["list", "tiny-bert-q8"])
    assert table.exit_code == 0 and "tiny-bert-q8" in table.output and "failed" in table.output

"""`squeeze export` and the recipe's `export:` list: what is verified first, what is
recorded on the version, and that the export loads in the client it is meant for."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from squeezeflow.cli import app
from squeezeflow.compression.exports import NotExportableError, export_formats, export_model
from squeezeflow.compression.integrity import IntegrityError, verify_folder
from squeezeflow.recipe import RecipeError, parse_recipe

MODEL = "tiny-llama-gptq-export"
GPTQ_TAG = "squeezeflow.export.gptq.sha256"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _recipe(folder: Path, model_dir: Path, text_files: dict[str, Path], export: list[dict]) -> Path:
    raw = {
        "name": MODEL,
        "model": {"source": str(model_dir)},
        "calibration": {"source": str(text_files["calibration"]), "num_samples": 16, "max_length": 32},
        "evaluation": {
            "data": {"source": str(text_files["evaluation"]), "num_samples": 16},
            "max_length": 32,
            "latency": {"warmup": 1, "repeats": 2, "batch_size": 4},
        },
        "stages": [{"name": "quantize",
                    "steps": [{"kind": "gptq", "bits": 4, "group_size": 32, "symmetric": True}]}],
        "registration": {"model_name": MODEL},
        "export": export,
    }
    path = folder / f"{MODEL}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path, prefect_server: None,
               trained_llama_dir: Path, text_files: dict[str, Path]) -> Iterator[dict[str, str]]:
    """One recipe run (gptq 4-bit g32 on the tiny Llama, `export: [gptq]`) shared by the
    slow tests of this module, in its own working directory and MLflow store."""
    folder = tmp_path_factory.mktemp("export-flow")
    shutil.copy(mlflow_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("SQUEEZEFLOW_HOME", str(folder / ".squeezeflow"))
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        from squeezeflow.flows.compress import compress

        exports = [{"format": "gptq"}, {"format": "compressed-tensors"}]
        result = compress(str(_recipe(folder, trained_llama_dir, text_files, exports)))
        yield {"version": result.registered.version, "run_id": result.registered.run_id,
               "model_dir": result.model_dir, "folder": str(folder), "base_dir": str(trained_llama_dir)}


def _logits(model: torch.nn.Module, tokenizer, text: str = "the cat sat on the mat") -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0]  # (tokens, vocab)


def _assert_gptq_folder_matches(folder: Path, model_dir: Path, base_dir: Path) -> None:
    """The GPTQ checkpoint loads in transformers (gptqmodel) and gives our packed model's
    logits: their difference is far below what quantization changed."""
    pytest.importorskip("gptqmodel", reason="the [gptq] extra is not installed")
    from transformers import AutoModelForCausalLM

    from squeezeflow.compression.artifact import load_compressed

    ours = load_compressed(model_dir, runtime="packed")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = _logits(ours.model, ours.tokenizer)
    quantization_change = float((expected - _logits(base, ours.tokenizer)).abs().max())
    export_change = float((expected - _logits(theirs, ours.tokenizer)).abs().max())
    # GPTQ loaders keep scales in fp16 (we keep fp32): a small difference, not a wrong code
    assert export_change < 0.1 * quantization_change, (export_change, quantization_change)


# ----- fast: no flow, no registry ----------------------------------------------------


def test_unknown_format_exits_2_naming_the_valid_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", "models:/m/1", "--format", "onnx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "'onnx'" in result.output
    for name in ("gguf", "compressed-tensors", "gptq"):
        assert name in result.output
    assert not (tmp_path / "o").exists()


def test_a_uri_that_is_neither_a_version_nor_a_folder_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(tmp_path / "absent"), "--format", "gptq",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "neither a registered version" in result.output


def test_recipe_export_list_is_validated() -> None:
    raw = {
        "name": "r",
        "evaluation": {"data": {"source": "data/evaluation.txt"}},
        "stages": [{"name": "q", "steps": [{"kind": "rtn", "bits": 8}]}],
        "registration": {"model_name": "r"},
    }
    assert [spec.format for spec in parse_recipe(raw | {"export": [{"format": "gptq"}]}).export] == ["gptq"]
    with pytest.raises(RecipeError) as unknown:
        parse_recipe(raw | {"export": [{"format": "onnx"}]})
    assert "export.0.format" in str(unknown.value) and "compressed-tensors" in str(unknown.value)
    with pytest.raises(RecipeError, match="export.0: unknown key .fromat.; valid keys: format"):
        parse_recipe(raw | {"export": [{"fromat": "gguf"}]})
    with pytest.raises(RecipeError, match="repeated: gptq"):
        parse_recipe(raw | {"export": [{"format": "gptq"}, {"format": "gptq"}]})


def _rtn_folder(kind: str, folder: Path) -> Path:
    from squeezeflow.compression.artifact import save_compressed
    from squeezeflow.compression.quantization.rtn.step import RTNConfig, RTNStep
    from squeezeflow.compression.runners import run_stage_steps
    from squeezeflow.testing import tiny_bert, tiny_llama

    model, tokenizer = tiny_bert() if kind == "encoder" else tiny_llama()
    run_stage_steps(model, [RTNStep(RTNConfig(bits=4, group_size=32))], [])
    return save_compressed(model, tokenizer, kind, folder)  # type: ignore[arg-type]


def test_a_local_folder_is_verified_and_its_digest_is_the_export_manifest(tmp_path: Path) -> None:
    source = _rtn_folder("causal-lm", tmp_path / "source")
    record = export_model(source, "gptq", tmp_path / "gptq")
    assert record.sha256 == verify_folder(tmp_path / "gptq")  # the manifest covers every file
    assert record.figures == {"quantized_layers": 14.0, "bits": 4.0}  # 7 Linears x 2 blocks
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 32, True)

    _flip_byte(source / "model.safetensors")
    result = CliRunner().invoke(app, ["export", str(source), "--format", "gptq", "--out",
                                      str(tmp_path / "again")])
    assert result.exit_code == 2
    assert "model.safetensors" in result.output
    assert not (tmp_path / "again").exists()


def test_a_model_gptq_cannot_hold_is_refused_with_the_reason(tmp_path: Path) -> None:
    encoder = _rtn_folder("encoder", tmp_path / "bert")
    with pytest.raises(NotExportableError, match="encoder model; GPTQ checkpoints are causal-LM"):
        export_model(encoder, "gptq", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written

    from squeezeflow.compression.artifact import save_compressed
    from squeezeflow.testing import tiny_llama

    dense, tokenizer = tiny_llama()
    save_compressed(dense, tokenizer, "causal-lm", tmp_path / "dense")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "dense"), "--format", "gptq",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no integer-quantized Linear layers" in result.output


def test_an_existing_folder_that_is_not_an_export_is_not_overwritten(tmp_path: Path) -> None:
    source = _rtn_folder("causal-lm", tmp_path / "source")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export_model(source, "gptq", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert set(export_formats()) == {"gguf", "compressed-tensors", "gptq"}


# ----- slow: a recipe run registers the version --------------------------------------


@pytest.mark.slow
def test_recipe_export_lands_as_artifacts_and_tags(registered: dict[str, str], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from squeezeflow.registry.exports import download_export

    client = MlflowClient()
    version = client.get_model_version(MODEL, registered["version"])
    assert len(version.tags[GPTQ_TAG]) == 64
    folder = download_export(f"models:/{MODEL}/{registered['version']}", "gptq", tmp_path / "dl")
    assert verify_folder(folder, version.tags[GPTQ_TAG]) == version.tags[GPTQ_TAG]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 32, True)
    run = client.get_run(registered["run_id"])
    assert run.data.metrics["export.gptq.bits"] == 4.0
    assert run.data.metrics["export.gptq.quantized_layers"] == 14.0
    _assert_gptq_folder_matches(folder, Path(registered["model_dir"]), Path(registered["base_dir"]))


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["gptq", "compressed-tensors"])
def test_cli_export_of_a_registered_version_records_its_digest(registered: dict[str, str],
                                                               tmp_path: Path, export_format: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    tag = f"squeezeflow.export.{export_format}.sha256"
    by_recipe = client.get_model_version(MODEL, registered["version"]).tags[tag]
    client.delete_model_version_tag(MODEL, registered["version"], tag)  # recorded anew below
    out = tmp_path / export_format
    result = CliRunner().invoke(app, ["export", f"models:/{MODEL}/{registered['version']}",
                                      "--format", export_format, "--out", str(out)])
    assert result.exit_code == 0, result.output
    digest = verify_folder(out)
    assert client.get_model_version(MODEL, registered["version"]).tags[tag] == digest
    assert digest == by_recipe  # one version, one export digest, wherever it was unpacked
    assert digest in result.output
    logged = {item.path for item in client.list_artifacts(registered["run_id"], f"exports/{export_format}")}
    assert f"exports/{export_format}/model.safetensors" in logged


def test_cli_exports_a_folder_to_gguf_with_exact_q4_0(tmp_path: Path) -> None:
    """`squeeze export DIR --format gguf` on a 4-bit g32 symmetric Llama with a byte-level
    BPE tokenizer: every Linear lands as Q4_0 with the codes it had."""
    import gguf

    from squeezeflow.compression.artifact import save_compressed
    from squeezeflow.compression.quantization.rtn.step import RTNConfig, RTNStep
    from squeezeflow.compression.runners import run_stage_steps
    from squeezeflow.testing import byte_bpe_tokenizer, tiny_llama

    model, tokenizer = tiny_llama(tokenizer=byte_bpe_tokenizer(vocab_size=384))
    run_stage_steps(model, [RTNStep(RTNConfig(bits=4, group_size=32, symmetric=True))], [])
    source = save_compressed(model, tokenizer, "causal-lm", tmp_path / "source")
    result = CliRunner().invoke(app, ["export", str(source), "--format", "gguf", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert verify_folder(tmp_path / "out") in result.output
    [written] = list((tmp_path / "out").glob("*.gguf"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(written).tensors}
    linears = [name for name in types if name.startswith("blk.") and name.endswith(".weight")
               and ("attn_" in name or "ffn_" in name) and "norm" not in name]
    assert len(linears) == 14 and {types[n] for n in linears} == {gguf.GGMLQuantizationType.Q4_0}


@pytest.mark.slow
def test_a_tampered_version_is_refused_before_exporting(registered: dict[str, str], workdir: Path) -> None:
    from mlflow import MlflowClient

    from squeezeflow.registry.lineage import register_folder

    version = register_folder(Path(registered["model_dir"]), "tampered")  # this test's own store
    stored = list((workdir / "mlartifacts").rglob("model.safetensors"))
    assert len(stored) == 1
    _flip_byte(stored[0])
    out = workdir / "out"
    result = CliRunner().invoke(app, ["export", f"models:/tampered/{version}", "--format", "gptq",
                                      "--out", str(out)])
    assert result.exit_code == 2
    assert "does not match its registered hash" in result.output and "model.safetensors" in result.output
    assert not out.exists()
    assert GPTQ_TAG not in MlflowClient().get_model_version("tampered", version).tags
    with pytest.raises(IntegrityError):  # the same download, outside the CLI, is refused too
        from squeezeflow.registry.fetch import download_model

        download_model(f"models:/tampered/{version}", destination=workdir / "dl")

"""A workspace shared by processes: a damaged cached stage is recomputed, two runs of one
stage compute it once, killed writes leave nothing half-written, and a registered
version whose artifact changed is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from squeezeflow.compression.integrity import PARTIAL, IntegrityError
from squeezeflow.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def _recipe(folder: Path, model_dir: Path, texts: dict[str, Path]) -> Path:
    raw = {
        "name": "ws",
        "model": {"source": str(model_dir)},
        "calibration": {"source": str(texts["calibration"]), "num_samples": 8, "max_length": 32},
        "evaluation": {"data": {"source": str(texts["evaluation"]), "num_samples": 8}, "max_length": 32},
        "stages": [{"name": "q", "steps": [{"kind": "gptq", "bits": 4, "group_size": 32}]}],
        "registration": {"model_name": "ws"},
    }
    path = folder / "ws.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_first_stage(recipe: Recipe, use_cache: bool = True):  # type: ignore[no-untyped-def]
    from squeezeflow.tasks.stages import materialize_data, materialize_model, run_stage

    base = materialize_model.fn(recipe.model)
    assert recipe.calibration is not None
    calibration = materialize_data.fn(recipe.calibration)
    return run_stage.fn(recipe.stages[0], base, calibration, recipe.calibration, recipe.seed,
                        use_cache=use_cache)


def _kill_when_ready(process: subprocess.Popen[bytes], ready: Path) -> None:
    """SIGKILL `process` (its whole session) once it has created `ready`."""
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_cached_stage_is_recomputed(workdir: Path, trained_llama_dir: Path,
                                              text_files: dict[str, Path]) -> None:
    recipe = load_recipe(_recipe(workdir, trained_llama_dir, text_files))
    first = _run_first_stage(recipe)
    again = _run_first_stage(recipe)
    assert (first.reused, again.reused) == (False, True)
    assert again.checkpoint.sha256 == first.checkpoint.sha256

    _flip_byte(Path(first.checkpoint.path) / "model.safetensors")
    repaired = _run_first_stage(recipe)
    assert not repaired.reused  # the damaged folder was not trusted
    assert repaired.checkpoint.path == first.checkpoint.path  # same inputs, same place
    from squeezeflow.compression.integrity import verify_folder

    assert verify_folder(Path(repaired.checkpoint.path)) == repaired.checkpoint.sha256
    assert not list((workdir / ".squeezeflow" / "checkpoints").glob(f"{PARTIAL}*"))


def test_two_processes_running_one_stage_compute_it_once(workdir: Path, trained_llama_dir: Path,
                                                         text_files: dict[str, Path]) -> None:
    path = _recipe(workdir, trained_llama_dir, text_files)
    script = (
        "import json, sys\n"
        "from squeezeflow.recipe import load_recipe\n"
        "from tests.flows.test_workspace import _run_first_stage\n"
        "result = _run_first_stage(load_recipe(sys.argv[1]))\n"
        "print('RESULT', json.dumps({'reused': result.reused, 'sha256': result.checkpoint.sha256}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=workdir, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert sorted(r["reused"] for r in results) == [False, True]  # one computed, one waited and reused
    assert results[0]["sha256"] == results[1]["sha256"]


def test_sigkill_during_data_materialization_then_the_next_run_succeeds(
    workdir: Path, text_files: dict[str, Path]
) -> None:
    from squeezeflow.recipe import DataSpec
    from squeezeflow.tasks.stages import materialize_data

    ready = workdir / "ready"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import squeezeflow.compression.integrity as integrity\n"
        "from squeezeflow.recipe import DataSpec\n"
        "from squeezeflow.tasks.stages import materialize_data\n"
        "def pause(*args):\n"
        f"    Path({str(ready)!r}).touch(); time.sleep(60)\n"
        "integrity.os.replace = pause  # the texts are written, not yet renamed into place\n"
        "materialize_data.fn(DataSpec(source=sys.argv[1], num_samples=16))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(text_files["calibration"])],
                               cwd=workdir, start_new_session=True)
    _kill_when_ready(process, ready)
    data = workdir / ".squeezeflow" / "data"
    assert [p.name.startswith(PARTIAL) for p in data.iterdir()] == [True]  # only the leftover

    ref = materialize_data.fn(DataSpec(source=str(text_files["calibration"]), num_samples=16))
    assert len(json.loads(Path(ref.path).read_text())) == ref.count == 16

    Path(ref.path).write_text('["truncat')  # damaged in place (an old-style crash, an edit)
    again = materialize_data.fn(DataSpec(source=str(text_files["calibration"]), num_samples=16))
    assert json.loads(Path(again.path).read_text()) and again.sha256 == ref.sha256


def test_sigkill_during_an_export_then_the_next_export_succeeds(workdir: Path, trained_llama_dir: Path,
                                                                 text_files: dict[str, Path]) -> None:
    recipe = load_recipe(_recipe(workdir, trained_llama_dir, text_files))
    stage = Path(_run_first_stage(recipe).checkpoint.path)
    target = workdir / "gptq-export"
    ready = workdir / "ready"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import squeezeflow.compression.quantization.gptq.export as export\n"
        "from squeezeflow.compression.artifact import load_compressed\n"
        "original = export.save_file\n"
        "def slow(*args, **kwargs):\n"
        "    original(*args, **kwargs)\n"
        f"    Path({str(ready)!r}).touch(); time.sleep(60)  # weights written, config not yet\n"
        "export.save_file = slow\n"
        "loaded = load_compressed(sys.argv[1])\n"
        "export.export_gptq(loaded.model, loaded.tokenizer, Path(sys.argv[2]))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(stage), str(target)],
                               cwd=workdir, start_new_session=True)
    _kill_when_ready(process, ready)
    assert not target.exists()  # no half export under the real name

    from squeezeflow.compression.artifact import load_compressed
    from squeezeflow.compression.quantization.gptq.export import export_gptq

    loaded = load_compressed(stage)
    export_gptq(loaded.model, loaded.tokenizer, target)
    config = json.loads((target / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4
    from squeezeflow.compression.integrity import verify_folder

    verify_folder(target)


@pytest.mark.slow
def test_a_registered_version_whose_artifact_changed_is_refused(workdir: Path, trained_llama_dir: Path,
                                                                text_files: dict[str, Path]) -> None:
    import mlflow

    import squeezeflow
    from squeezeflow.registry.lineage import register_folder

    recipe = load_recipe(_recipe(workdir, trained_llama_dir, text_files))
    stage = Path(_run_first_stage(recipe).checkpoint.path)
    version = register_folder(stage, "ws-model")
    loaded = squeezeflow.load_compressed(f"models:/ws-model/{version}")  # intact: loads
    assert loaded.kind == "causal-lm"

    stored = list((workdir / "mlartifacts").rglob("model.safetensors"))
    assert len(stored) == 1
    logged_model = stored[0].parents[2]
    assert (logged_model / "MLmodel").exists() and not list(logged_model.rglob("*.pkl"))  # code, no pickle
    pyfunc = mlflow.pyfunc.load_model(f"models:/ws-model/{version}")
    assert len(pyfunc.predict(["the cat"], params={"max_new_tokens": 2})) == 1

    _flip_byte(stored[0])
    with pytest.raises(IntegrityError, match="model.safetensors"):
        squeezeflow.load_compressed(f"models:/ws-model/{version}")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        mlflow.pyfunc.load_model(f"models:/ws-model/{version}")

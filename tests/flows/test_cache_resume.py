"""Stage caching by content hash, --no-cache, and resume after SIGKILL inside a stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from squeezeflow.compression.catalog import CATALOG
from tests.flows import sleepstep

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture
def sleep_step() -> Iterator[None]:
    sleepstep.register()
    yield
    CATALOG.remove("test-sleep")


@pytest.fixture
def count_executions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each stage that really ran its steps (a cache hit runs none)."""
    import squeezeflow.tasks.stages as stages

    executed: list[str] = []
    original = stages.compress_stage

    def counting(source, configs, output, **options):  # type: ignore[no-untyped-def]
        executed.append(",".join(config.kind for config in configs))
        return original(source, configs, output, **options)

    monkeypatch.setattr(stages, "compress_stage", counting)
    return executed


def write_recipe(folder: Path, model_dir: Path, evaluation: Path, second_step: dict,
                 name: str = "cache-test") -> Path:
    raw = {
        "name": name,
        "model": {"source": str(model_dir)},
        "evaluation": {"data": {"source": str(evaluation), "num_samples": 16}, "max_length": 32,
                       "suites": ["quality", "size"]},
        "stages": [
            {"name": "prune", "steps": [{"kind": "magnitude", "sparsity": 0.3}]},
            {"name": "second", "steps": [second_step]},
        ],
        "registration": {"model_name": name},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_rerun_hits_the_cache_for_every_stage(
    workdir: Path, trained_llama_dir: Path, text_files: dict[str, Path], count_executions: list[str]
) -> None:
    from squeezeflow.flows.compress import compress

    path = write_recipe(workdir, trained_llama_dir, text_files["evaluation"],
                        {"kind": "rtn", "bits": 8})
    first = compress(str(path))
    assert count_executions == ["magnitude", "rtn"]
    assert [s.reused for s in first.stages] == [False, False]

    second = compress(str(path))
    assert count_executions == ["magnitude", "rtn"]  # nothing recomputed
    assert [s.reused for s in second.stages] == [True, True]
    assert second.model_dir == first.model_dir
    assert second.registered.version == "2"  # still measured and registered

    # a changed second stage reuses the first, recomputes only itself
    changed = write_recipe(workdir, trained_llama_dir, text_files["evaluation"],
                           {"kind": "rtn", "bits": 4})
    third = compress(str(changed))
    assert count_executions == ["magnitude", "rtn", "rtn"]
    assert [s.reused for s in third.stages] == [True, False]

    compress(str(path), use_cache=False)  # --no-cache recomputes everything
    assert count_executions == ["magnitude", "rtn", "rtn", "magnitude", "rtn"]


def test_sigkill_inside_stage_two_resumes_after_stage_one(
    workdir: Path, trained_llama_dir: Path, text_files: dict[str, Path],
    sleep_step: None, count_executions: list[str],
) -> None:
    from prefect.settings import PREFECT_API_URL

    marker = workdir / "inside-stage-2"
    path = write_recipe(workdir, trained_llama_dir, text_files["evaluation"],
                        {"kind": "test-sleep", "seconds": 120, "marker": str(marker)})
    script = (
        "import sys; from tests.flows import sleepstep; sleepstep.register(); "
        "from squeezeflow.cli import app; sys.argv = ['squeeze', 'run', sys.argv[1]]; app()"
    )
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=workdir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, process.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the run never reached stage 2"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    checkpoints = workdir / ".squeezeflow" / "checkpoints"
    finished = [d for d in checkpoints.iterdir() if (d / "stage.json").exists()]
    assert len(finished) == 1  # stage 1 finished; stage 2 left nothing complete
    client = MlflowClient()
    assert client.search_model_versions("name = 'cache-test'") == []  # no partial version

    from squeezeflow.flows.compress import compress

    resumed = path.read_text().replace("seconds: 120", "seconds: 0")
    path.write_text(resumed.replace(f"marker: {marker}", "marker: ''"))
    result = compress(str(path))
    assert [s.reused for s in result.stages] == [True, False]
    assert count_executions == ["test-sleep"]  # stage 1 was not recomputed
    assert [int(v.version) for v in client.search_model_versions("name = 'cache-test'")] == [1]


KILL_AT_BLOCK = """
import os, signal, sys
import squeezeflow.compression.streaming as streaming
original, calls = streaming._run_block, []

def killing(*args, **kwargs):  # SIGKILL as block 7 of 12 starts: blocks 1-6 are saved
    if len(calls) == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(1)
    return original(*args, **kwargs)

streaming._run_block = killing
from squeezeflow.cli import app
sys.argv = ["squeeze", "run", sys.argv[1]]
app()
"""


def test_squeeze_run_killed_inside_a_streamed_stage_resumes_at_its_block(
    workdir: Path, text_files: dict[str, Path], count_executions: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hashlib
    import json

    from prefect.settings import PREFECT_API_URL

    import squeezeflow.compression.streaming as streaming
    from squeezeflow.flows.compress import compress
    from squeezeflow.testing import save_model, tiny_llama

    model, tokenizer = tiny_llama(layers=12)
    source = save_model(model, tokenizer, workdir / "llama12")
    raw = {
        "name": "resume-blocks", "model": {"source": str(source)},
        "calibration": {"source": str(text_files["calibration"]), "num_samples": 8, "max_length": 32},
        "evaluation": {"data": {"source": str(text_files["evaluation"]), "num_samples": 8},
                       "max_length": 32, "suites": ["size"]},
        "stages": [{"name": "q", "steps": [{"kind": "gptq", "bits": 4, "group_size": 32}]}],
        "registration": {"model_name": "resume-blocks"},
    }
    path = workdir / "resume-blocks.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_BLOCK, str(path)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    [blocks] = list((workdir / ".squeezeflow" / "blocks").iterdir())
    assert json.loads((blocks / "progress.json").read_text())["next_block"] == 6

    def checkpoint_sha256() -> str:
        [folder] = [d for d in (workdir / ".squeezeflow" / "checkpoints").iterdir() if d.is_dir()
                    and (d / "stage.json").exists()]
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    original, ran = streaming._run_block, []
    monkeypatch.setattr(streaming, "_run_block", lambda *a, **k: ran.append(1) or original(*a, **k))
    resumed = compress(str(path))
    assert len(ran) == 6  # blocks 7-12 only
    assert not blocks.exists()  # the finished stage no longer needs its blocks
    resumed_sha = checkpoint_sha256()
    compress(str(path), use_cache=False)  # from scratch: nothing kept from the killed run
    assert len(ran) == 6 + 12
    assert count_executions == ["gptq", "gptq"]
    assert checkpoint_sha256() == resumed_sha
    assert [s.reused for s in resumed.stages] == [False]

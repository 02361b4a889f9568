"""Streaming block-wise stages: same weights as the in-memory runners, resumable per block."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from squeezeflow import sampledata
from squeezeflow.compression.artifact import FORMAT_FILE, load_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.changes import UnchangedStageError
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.executor import compress_stage
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.shards import INDEX_FILE, SINGLE_FILE, weight_map
from squeezeflow.compression.streaming import resolve_device, stream_stage, streaming_blocker
from squeezeflow.testing import save_model, tiny_bert, tiny_llama

BLOCKWISE = ["rtn", "gptq", "sparsegpt", "wanda", "magnitude", "smoothquant", "w8a8",
             "finequant", "float4"]


def _config(kind: str, **fields: Any) -> Any:
    return CATALOG.entry(kind).config_cls(kind=kind, **fields)


def _batches(folder: Path, count: int = 8) -> list[dict[str, torch.Tensor]]:
    tokenizer = load_compressed(folder).tokenizer
    return list(tokenized_batches(sampledata.sentences(count, seed=1), tokenizer,
                                  batch_size=4, max_length=32))


def _in_memory(folder: Path, kind: str, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    model = load_compressed(folder).model
    torch.manual_seed(0)
    run_stage_steps(model, [CATALOG.build(_config(kind))], batches)
    return model.state_dict()


def _formats(folder: Path) -> dict[str, Any]:
    description = json.loads((folder / FORMAT_FILE).read_text())
    return {k: v for k, v in description.items() if k != "metadata"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = tiny_llama(layers=3)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("stream") / "llama")


@pytest.mark.parametrize("kind", BLOCKWISE)
def test_streamed_stage_writes_the_weights_the_in_memory_runner_makes(
    kind: str, llama_dir: Path, tmp_path: Path
) -> None:
    batches = _batches(llama_dir)
    expected = _in_memory(llama_dir, kind, batches)
    torch.manual_seed(0)
    reports = stream_stage(llama_dir, [CATALOG.build(_config(kind))], batches, tmp_path / "out")
    streamed = load_compressed(tmp_path / "out").model.state_dict()
    assert set(streamed) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name
    assert reports[0].metrics["modules"] == 21  # 7 Linears in each of 3 blocks


@pytest.mark.parametrize("kind", ["gptq", "smoothquant"])
def test_streaming_an_encoder_matches_too(kind: str, tmp_path: Path) -> None:
    model, tokenizer = tiny_bert(layers=3)
    folder = save_model(model, tokenizer, tmp_path / "bert")
    batches = _batches(folder)
    expected = _in_memory(folder, kind, batches)
    torch.manual_seed(0)
    stream_stage(folder, [CATALOG.build(_config(kind))], batches, tmp_path / "out")
    streamed = load_compressed(tmp_path / "out").model.state_dict()
    for name, tensor in expected.items():
        if not name.startswith("pooler."):  # not in the checkpoint: initialized at random
            assert torch.equal(streamed[name], tensor), name


def test_sharded_bf16_input_and_sharded_output(llama_dir: Path, tmp_path: Path) -> None:
    """A hub-style checkpoint (bf16, several shards + index) streams block by block, and
    an output above `single_file_bytes` stays one shard per block + the rest, with index."""
    model = load_compressed(llama_dir).model.to(torch.bfloat16)
    source = tmp_path / "sharded"
    model.save_pretrained(source, max_shard_size="100KB")
    load_compressed(llama_dir).tokenizer.save_pretrained(source)
    assert (source / INDEX_FILE).exists() and len(set(weight_map(source).values())) > 2
    output = tmp_path / "out"
    stream_stage(source, [CATALOG.build(_config("rtn"))], [], output, single_file_bytes=0)
    assert (output / INDEX_FILE).exists() and not (output / SINGLE_FILE).exists()
    assert len(set(weight_map(output).values())) == 4  # 3 blocks + embeddings, norm, head
    merged = tmp_path / "merged"
    stream_stage(source, [CATALOG.build(_config("rtn"))], [], merged)
    assert (merged / SINGLE_FILE).exists() and not (merged / INDEX_FILE).exists()
    a, b = load_compressed(output).model.state_dict(), load_compressed(merged).model.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert _formats(output) == _formats(merged)
    # the source's bf16 weights were read as fp32 and quantized: the result is on the grid
    reference = model.model.layers[0].mlp.down_proj.weight.float()
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], reference)


def test_a_stage_that_selects_nothing_is_refused(llama_dir: Path, tmp_path: Path) -> None:
    step = CATALOG.build(_config("rtn", targets=("*no_such_layer*",)))
    with pytest.raises(UnchangedStageError, match="selected no module"):
        stream_stage(llama_dir, [step], [], tmp_path / "out")


def test_the_executor_streams_block_wise_stages_and_loads_the_others(llama_dir: Path, tmp_path: Path) -> None:
    assert streaming_blocker([CATALOG.build(_config("gptq"))], llama_dir) is None
    lowrank = CATALOG.build(_config("lowrank", rank=8))
    assert "structure" in (streaming_blocker([lowrank], llama_dir) or "")
    scored = CATALOG.build(_config("bitstack", importance="perplexity"))
    assert "whole model" in (streaming_blocker([scored], llama_dir) or "")  # ranks model-wide
    assert streaming_blocker([CATALOG.build(_config("bitstack", importance="output_error"))],
                             llama_dir) is None
    batches = _batches(llama_dir)
    compress_stage(llama_dir, [_config("lowrank", rank=8)], tmp_path / "lowrank",
                   calibration=batches)
    assert json.loads((tmp_path / "lowrank" / FORMAT_FILE).read_text())["factorized"]
    with pytest.raises(ValueError, match="cannot stream"):
        compress_stage(llama_dir, [_config("lowrank", rank=8)], tmp_path / "forced",
                       calibration=batches, stream=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_on_cuda_matches_cpu_within_tolerance(llama_dir: Path, tmp_path: Path) -> None:
    batches = _batches(llama_dir)
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        stream_stage(llama_dir, [CATALOG.build(_config("gptq"))], batches, tmp_path / device,
                     device=device)
    cpu = load_compressed(tmp_path / "cpu").model.state_dict()
    cuda = load_compressed(tmp_path / "cuda").model.state_dict()
    for name, tensor in cpu.items():
        close = torch.isclose(cuda[name], tensor, rtol=1e-3, atol=1e-3).float().mean()
        assert close > 0.99, name  # a few weights may round to the neighbouring grid point


RUN_STAGE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from squeezeflow.compression.catalog import CATALOG
    from squeezeflow.compression.data import tokenized_batches
    from squeezeflow.compression.models import load_tokenizer
    from squeezeflow.compression.streaming import stream_stage
    from squeezeflow import sampledata

    source, output, work, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.manual_seed(0)
    batches = list(tokenized_batches(sampledata.sentences(8, seed=1), load_tokenizer(source),
                                     batch_size=4, max_length=32))
    done = []

    def progress(message):
        done.append(message)
        print(message, flush=True)
        if len(done) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    config = CATALOG.entry("gptq").config_cls(kind="gptq", bits=4, group_size=32)
    stream_stage(source, [CATALOG.build(config)], batches, output, work=work, progress=progress)
""")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_killed_stage_resumes_at_its_block_and_gives_identical_output(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(layers=12)
    source = save_model(model, tokenizer, tmp_path / "llama12")
    script = tmp_path / "run_stage.py"
    script.write_text(RUN_STAGE)

    def run(output: str, kill_after: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), str(source), str(tmp_path / output),
             str(tmp_path / f"{output}.work"), str(kill_after)],
            capture_output=True, text=True, timeout=600,
        )

    whole = run("whole", 0)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run("resumed", 6)
    assert killed.returncode == -9  # SIGKILL after block 6 was saved
    progress = json.loads((tmp_path / "resumed.work" / "progress.json").read_text())
    assert progress["next_block"] == 6
    resumed = run("resumed", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    blocks = [line for line in resumed.stdout.splitlines() if line.startswith("block ")]
    assert blocks[0] == "block 7/12 done" and len(blocks) == 6  # only the blocks not done
    assert not (tmp_path / "resumed.work").exists()  # removed once the output is whole
    for name in (SINGLE_FILE, FORMAT_FILE):
        assert _sha256(tmp_path / "resumed" / name) == _sha256(tmp_path / "whole" / name), name

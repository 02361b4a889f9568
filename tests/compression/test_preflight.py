"""Memory preflight: exact estimates on a hand-built shape, shapes read from safetensors
headers, the inversion that says what fits, and `squeeze run` refusing before any load."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.preflight import (
    FP32,
    RUNTIME_BYTES,
    DataSize,
    ModelShape,
    Plan,
    available_memory,
    estimate_stage,
    parse_bytes,
)

H, MLP, V, HEADS, BLOCKS = 64, 128, 8000, 4, 3  # a Llama-like shape, small enough to reason about


def llama_shape(blocks: int = BLOCKS, disk_bytes: int = 0) -> ModelShape:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H),
                                          "lm_head.weight": (V, H), "model.norm.weight": (H,)}
    for b in range(blocks):
        p = f"model.layers.{b}"
        shapes |= {f"{p}.self_attn.{n}_proj.weight": (H, H) for n in "qkvo"}
        shapes |= {f"{p}.mlp.gate_proj.weight": (MLP, H), f"{p}.mlp.up_proj.weight": (MLP, H),
                   f"{p}.mlp.down_proj.weight": (H, MLP), f"{p}.input_layernorm.weight": (H,)}
    config = {"hidden_size": H, "intermediate_size": MLP, "vocab_size": V, "num_attention_heads": HEADS}
    return ModelShape.from_config(shapes, config, disk_bytes)


GPTQ = CATALOG.parse({"kind": "gptq", "bits": 4, "group_size": 32})
RTN = CATALOG.parse({"kind": "rtn", "bits": 4, "group_size": 32})


def test_rtn_stage_is_the_model_codes_and_serialized_output() -> None:
    shape = llama_shape(disk_bytes=12345)
    linear = BLOCKS * (4 * H * H + 3 * H * MLP)
    P = 2 * V * H + BLOCKS * H + H + linear
    assert shape.parameters == P
    estimate = estimate_stage("q", [RTN], shape, None, None, stream=False)
    packed = linear * 4 // 8 + linear // 32 * 4  # 4-bit codes + fp16 scale and zero per group
    assert estimate.model == P * FP32 + 12345 + linear  # fp32, the mapped file, uint8 codes
    assert estimate.saving == (P - linear) * FP32 + 2 * packed  # packed tensors + their bytes
    assert (estimate.activations, estimate.hessians, estimate.optimizer) == (0, 0, 0)
    assert estimate.total == estimate.model + estimate.saving + RUNTIME_BYTES


def test_the_peak_holds_calibration_or_saving_not_both() -> None:
    shape = llama_shape()
    small = estimate_stage("q", [GPTQ], shape, DataSize(2, 8, 1), None, stream=False)
    assert small.saving > small.activations + small.hessians
    assert small.total == small.model + small.saving + RUNTIME_BYTES
    large = estimate_stage("q", [GPTQ], shape, DataSize(512, 256, 8), None, stream=False)
    assert large.activations + large.hessians > large.saving
    assert large.total == large.model + large.activations + large.hessians + RUNTIME_BYTES


def test_gptq_hessians_are_per_linear_of_one_block_and_activations_per_token() -> None:
    shape = llama_shape()
    data = DataSize(num_samples=16, max_length=32, batch_size=4)
    estimate = estimate_stage("q", [GPTQ], shape, data, None, stream=False)
    # q, k, v, o, gate, up read H features; down reads MLP; + the solve of the larger of
    # the H-wide Linears (rows 4H + 2 MLP) and down (rows H, width MLP)
    solve = max(3 * H * H + 4 * (4 * H + 2 * MLP) * H, 3 * MLP * MLP + 4 * H * MLP) * FP32
    assert estimate.hessians == (6 * H * H + MLP * MLP) * FP32 + solve
    tokens = 16 * 32
    kept = (tokens * (H + 2 * (H // HEADS)) + 16 * 32 * 32) * FP32  # hidden, cos/sin, mask
    one_batch = (4 * 32 * (6 * H + 3 * MLP) + 4 * HEADS * 32 * 32) * FP32
    assert estimate.activations == 2 * kept + one_batch
    # true-sequential: every batch's forward is alive, paused before down_proj at worst
    sequential = CATALOG.parse({"kind": "gptq", "bits": 4, "group_size": 32, "sequential": True})
    for stream in (False, True):
        paused = estimate_stage("q", [sequential], shape, data, None, stream=stream).activations
        plain = estimate_stage("q", [GPTQ], shape, data, None, stream=stream).activations
        assert paused - plain == tokens * (2 * H + MLP) * FP32


def test_estimate_grows_with_samples_length_and_parameters() -> None:
    shape = llama_shape()
    base = DataSize(num_samples=16, max_length=32, batch_size=4)

    def stage(data: DataSize, model: ModelShape = shape) -> tuple[int, int, int]:
        estimate = estimate_stage("q", [GPTQ], model, data, None, stream=False)
        return estimate.activations, estimate.hessians, estimate.model

    activations, hessians, model = stage(base)
    more_samples = stage(DataSize(32, 32, 4))
    # twice the samples: the kept block inputs (x2, current and next) double, nothing else
    kept = (16 * 32 * (H + 2 * (H // HEADS)) + 16 * 32 * 32) * FP32
    assert more_samples == (activations + 2 * kept, hessians, model)
    longer = stage(DataSize(16, 64, 4))
    assert longer[0] > activations and longer[1:] == (hessians, model)
    deeper = stage(base, llama_shape(blocks=2 * BLOCKS))
    assert deeper[2] > model and deeper[:2] == (activations, hessians)  # depth: weights only


def test_training_stage_holds_gradients_adam_and_teacher() -> None:
    shape = llama_shape()
    distill = CATALOG.parse({"kind": "distill", "teacher": "base"})
    estimate = estimate_stage("d", [distill], shape, None, DataSize(8, 32, 4))
    assert estimate.optimizer == shape.parameters * FP32 * (1 + 2) + shape.parameters * FP32


def test_fitting_settings_invert_the_estimate() -> None:
    plan = Plan(shape=llama_shape(), stages=(("q", (GPTQ,)),),
                calibration=DataSize(4096, 512, 8), training=None,
                evaluation=DataSize(64, 128, 16))
    phase = "stage q"
    limit = RUNTIME_BYTES + 80 * 2**20  # room for the model and about a tenth of the data
    assert plan.estimates()[0].activations > 1000 * 2**20  # the data is what does not fit
    assert plan.total(phase) > limit
    fits = {fit.setting: fit for fit in plan.fitting_settings(phase, limit)}
    assert set(fits) == {"calibration.num_samples", "calibration.max_length", "calibration.batch_size"}
    assert fits["calibration.batch_size"].value is None  # one batch's share is too small to matter
    samples = fits["calibration.num_samples"].value
    assert samples is not None and 1 <= samples < 4096
    at = Plan(shape=plan.shape, stages=plan.stages, training=None, evaluation=plan.evaluation,
              calibration=DataSize(samples, 512, 8))
    above = Plan(shape=plan.shape, stages=plan.stages, training=None, evaluation=plan.evaluation,
                 calibration=DataSize(samples + 1, 512, 8))
    assert at.total(phase) <= limit < above.total(phase)  # the largest value that fits
    nothing = plan.fitting_settings(phase, 2**20)  # 1 MB: below the runtime itself
    assert nothing and all(fit.value is None for fit in nothing)


def test_shapes_from_safetensors_headers_match_the_model(tmp_path: Path) -> None:
    from squeezeflow.compression.models import skeleton
    from squeezeflow.testing import tiny_llama

    model, _ = tiny_llama(hidden=64, layers=3, intermediate=128)
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards and an index
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    shape = ModelShape.from_folder(tmp_path)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.disk_bytes == sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    built = ModelShape.from_module(skeleton(model.config), model.config.to_dict())
    assert built.parameters == shape.parameters
    assert sorted(built.block_linears()) == sorted(shape.block_linears())
    assert len(shape.block_linears()) == 7  # q, k, v, o, gate, up, down of block 0


def test_parse_bytes_and_available_memory() -> None:
    assert parse_bytes("8GB") == 8 * 2**30 and parse_bytes("1.5g") == 3 * 2**29
    assert parse_bytes("512M") == 512 * 2**20 and parse_bytes("1MB") == 2**20
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("8 parsecs")
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert 0 < available_memory() <= total


def _header_only(folder: Path) -> None:
    """Cut each weights file to its header: shapes stay readable, any load fails."""
    for file in folder.glob("*.safetensors"):
        data = file.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        file.write_bytes(data[: 8 + length])


def _recipe(folder: Path, model_dir: Path, texts: Path, num_samples: int) -> Path:
    recipe = {
        "name": "preflight", "model": {"source": str(model_dir)},
        "calibration": {"source": str(texts), "num_samples": num_samples, "max_length": 256},
        "evaluation": {"data": {"source": str(texts), "num_samples": 16}},
        "stages": [{"name": "quantize", "steps": [{"kind": "gptq", "bits": 4, "group_size": 32}]}],
        "registration": {"model_name": "preflight"},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_refuses_before_loading_weights(tmp_path: Path) -> None:
    from squeezeflow.compression.artifact import load_compressed
    from squeezeflow.testing import save_model, tiny_llama, write_texts

    model_dir = save_model(*tiny_llama(hidden=64, layers=2, intermediate=128), tmp_path / "model")
    _header_only(model_dir)
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises: it cannot load
        load_compressed(model_dir)
    texts = write_texts(tmp_path / "texts.txt", 64, seed=0)
    recipe = _recipe(tmp_path, model_dir, texts, num_samples=2048)
    work = tmp_path / "work"
    work.mkdir()
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache"), "COLUMNS": "200"}
    env.pop("SQUEEZEFLOW_HOME", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    script = ("import sys; from squeezeflow.cli import app; sys.argv = ['squeeze', *sys.argv[1:]]\n"
              "try:\n    app()\nfinally:\n"
              "    print('MODULES', sorted(m for m in ('prefect', 'mlflow') if m in sys.modules))")

    def squeeze(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", script, "run", str(recipe), *args], cwd=work,
                              env=env, capture_output=True, text=True, timeout=300)

    done = squeeze("--memory-limit", "1MB")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "not enough memory for stage quantize" in output and "limit 1.00 MB" in output
    assert "no data setting fits: the overhead alone exceeds the limit" in output
    assert "MODULES []" in output  # neither Prefect nor MLflow was started
    assert sorted(p.name for p in work.iterdir()) == []  # no mlflow.db, workspace or .prefect
    # a limit that the 2048 x 256 calibration tokens exceed, but fewer samples meet
    shape = ModelShape.from_folder(model_dir)
    calibration = DataSize(2048, 256, 8)
    stage = estimate_stage("quantize", [GPTQ], shape, calibration, None)
    limit = stage.total - stage.activations // 2
    done = squeeze("--memory-limit", str(limit))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "stage quantize" in output and "mostly" in output
    line = next(line for line in output.splitlines() if "would fit:" in line)
    samples = int(line.split("calibration.num_samples <= ")[1].split()[0])
    assert 1 <= samples < 2048
    plan = Plan(shape=shape, stages=(("quantize", (GPTQ,)),), training=None,
                calibration=DataSize(samples, 256, 8), evaluation=DataSize(16, 128, 16))
    assert plan.total("stage quantize") <= limit
    assert sorted(p.name for p in work.iterdir()) == []


def test_generous_limit_passes_and_validate_prints_each_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console
    from typer.testing import CliRunner

    from squeezeflow.cli import app
    from squeezeflow.cli_preflight import preflight_or_exit
    from squeezeflow.recipe import load_recipe
    from squeezeflow.testing import save_model, tiny_llama, write_texts

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model_dir = save_model(*tiny_llama(hidden=64, layers=2, intermediate=128), tmp_path / "model")
    recipe_path = _recipe(tmp_path, model_dir, write_texts(tmp_path / "t.txt", 8, seed=0), 8)
    preflight_or_exit(load_recipe(recipe_path), "1000GB", Console(stderr=True))  # returns: nothing refused
    result = CliRunner().invoke(app, ["validate", str(recipe_path)])
    assert result.exit_code == 0, result.output
    memory = [line.strip() for line in result.output.splitlines() if line.strip().startswith("memory")]
    assert [line.split(":")[0] for line in memory] == ["memory stage quantize", "memory evaluation"]
    assert all("overhead" in line and "model" in line for line in memory)
    assert "hessians" in memory[0]  # gptq keeps one per Linear of the block
    json.dumps(memory)  # plain text, no markup objects


def test_streamed_stage_holds_one_block_or_the_outside_whatever_the_depth() -> None:
    shape = llama_shape()
    block = 4 * H * H + 3 * H * MLP + H  # q k v o, gate up down, one norm
    linear = 4 * H * H + 3 * H * MLP
    outside = 2 * V * H + H  # embeddings, head, final norm
    assert shape.block_parameters() == (block, BLOCKS)
    data = DataSize(num_samples=16, max_length=32, batch_size=4)
    streamed = estimate_stage("q", [GPTQ], shape, data, None)
    working = 6 * MLP * H * FP32  # copies of the largest Linear (gate, up, down) while it changes
    assert streamed.model == max(block * FP32 + linear, outside * FP32) + working
    in_memory = estimate_stage("q", [GPTQ], shape, data, None, stream=False)
    assert streamed.hessians == in_memory.hessians  # one block's, both ways
    assert streamed.total < in_memory.total
    deeper = estimate_stage("q", [GPTQ], llama_shape(blocks=8 * BLOCKS), data, None)
    assert deeper.total == streamed.total  # depth costs disk, not memory
    distill = CATALOG.parse({"kind": "distill", "teacher": "base"})
    assert estimate_stage("d", [distill], shape, None, data).model == shape.parameters * FP32


def test_an_8b_llama_fits_24_gb_only_when_streamed() -> None:
    h, mlp, vocab, kv = 4096, 14336, 32000, 1024
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h),
                                          "lm_head.weight": (vocab, h), "model.norm.weight": (h,)}
    for b in range(32):
        p = f"model.layers.{b}"
        shapes |= {f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.o_proj.weight": (h, h),
                   f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.v_proj.weight": (kv, h),
                   f"{p}.mlp.gate_proj.weight": (mlp, h), f"{p}.mlp.up_proj.weight": (mlp, h),
                   f"{p}.mlp.down_proj.weight": (h, mlp), f"{p}.input_layernorm.weight": (h,),
                   f"{p}.post_attention_layernorm.weight": (h,)}
    config = {"hidden_size": h, "intermediate_size": mlp, "vocab_size": vocab,
              "num_attention_heads": 32, "num_key_value_heads": 8}
    shape = ModelShape.from_config(shapes, config, disk_bytes=16 * 10**9)
    assert 7.2e9 < shape.parameters < 7.3e9  # Llama-3-8B blocks with a 32000 vocabulary
    data = DataSize(num_samples=32, max_length=128, batch_size=8)
    streamed = estimate_stage("q", [GPTQ], shape, data, None)
    assert streamed.total < 10 * 2**30  # measured 8B gptq streamed: see benchmarks/README.md "Scale"
    assert estimate_stage("q", [GPTQ], shape, data, None, stream=False).total > 24 * 2**30

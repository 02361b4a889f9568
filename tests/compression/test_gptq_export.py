"""Standard GPTQ checkpoints: our export and the gptqmodel backend load in transformers.

Needs the `[gptq]` extra (gptqmodel + optimum), which CI installs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from squeezeflow import sampledata
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.quantization.gptq.export import export_gptq, pack_int32
from squeezeflow.compression.quantization.gptq.step import GPTQConfig, GPTQStep
from squeezeflow.compression.quantization.rtn.step import RTNConfig, RTNStep
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.testing import save_model, tiny_llama


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_int32_is_a_little_endian_bit_stream(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 3), generator=generator)  # (n, m)
    packed = pack_int32(values, bits)
    assert packed.shape == (64 * bits // 32, 3) and packed.dtype == torch.int32
    for column in range(3):
        stream = sum(int(v) << (bits * i) for i, v in enumerate(values[:, column]))
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(packed.shape[0])]
        assert [int(x) & 0xFFFFFFFF for x in packed[:, column]] == words


def quantized_tiny_llama(config: GPTQConfig, seed: int = 0, positive_row: bool = False):  # type: ignore[no-untyped-def]
    model, tokenizer = tiny_llama(hidden=128, layers=2, intermediate=256, seed=seed)
    if positive_row:  # an all-positive group gets an asymmetric zero point of 0
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0].abs_()
    calibration = list(tokenized_batches(sampledata.sentences(32, seed=11), tokenizer,
                                         batch_size=16, max_length=64))
    run_stage_steps(model, [GPTQStep(config)], calibration)
    return model, tokenizer


def load_gptq(folder: Path) -> nn.Module:
    pytest.importorskip("gptqmodel", reason="the [gptq] extra is not installed")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "positive_row", "checkpoint_format"),
    [
        # act_order without static groups: a permuted g_idx (desc_act), v1 zero points
        (GPTQConfig(bits=4, group_size=64, act_order=True), False, "gptq"),
        # asymmetric with a zero point of 0, which v1 (zero - 1) cannot store: v2
        (GPTQConfig(bits=8, group_size=128, symmetric=False), True, "gptq_v2"),
    ],
)
def test_export_loads_with_transformers_and_gives_the_same_logits(
    config: GPTQConfig, positive_row: bool, checkpoint_format: str, tmp_path: Path
) -> None:
    model, tokenizer = quantized_tiny_llama(config, positive_row=positive_row)
    folder = export_gptq(model, tokenizer, tmp_path / "gptq")
    settings = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert settings["checkpoint_format"] == checkpoint_format
    assert settings["desc_act"] == (config.act_order and not config.static_groups)
    loaded = load_gptq(folder)
    ours = dict(model.named_modules())
    quant_layers = {n: m for n, m in loaded.named_modules() if hasattr(m, "qweight")}
    assert len(quant_layers) == 14  # 7 Linears in each of 2 blocks
    for name, module in quant_layers.items():
        # GPTQModel dequantizes in fp16: the codes are right iff the fp16 values are equal
        theirs = module.dequantize_weight().T.to(torch.float16)
        assert torch.equal(theirs, ours[name].weight.detach().to(torch.float16)), name
    batch = tokenizer(sampledata.sentences(4, seed=3), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, logits = model(**batch).logits, loaded(**batch).logits
    # same weights; the CPU kernel rounds activations to bf16 (8 mantissa bits), so
    # logits agree to bf16 precision, not bit for bit (measured max |diff| 4e-4 .. 4e-3)
    assert float((logits - expected).norm() / expected.norm()) < 1e-2
    assert float((logits - expected).abs().max()) < 2e-2


def test_export_refuses_what_the_format_cannot_hold(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(hidden=128, layers=2, intermediate=256)
    with pytest.raises(ValueError, match="no quantized Linear"):
        export_gptq(model, tokenizer, tmp_path / "none")
    run_stage_steps(model, [RTNStep(RTNConfig(bits=4, group_size=64, targets=("*self_attn*",)))])
    run_stage_steps(model, [RTNStep(RTNConfig(bits=8, group_size=64, targets=("*mlp*",)))])
    with pytest.raises(ValueError, match=r"one bits/group_size/sym for all layers.*bits \[4, 8\]"):
        export_gptq(model, tokenizer, tmp_path / "mixed")


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from squeezeflow.compression.quantization.gptq import gptqmodel_backend

    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install squeezeflow\[gptq\]"):
        gptqmodel_backend.require_gptqmodel()


def test_gptqmodel_console_output_is_captured_warnings_passed_on_and_shown_on_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from squeezeflow.compression.quantization.gptq import gptqmodel_backend as backend

    class Saved:
        model = torch.nn.Module()

        def save(self, folder: str) -> None:
            print("INFO  saving shards")
            (Path(folder) / "quant_log.csv").write_text("layer,module,loss\n0,mlp.up_proj,0.5\n")

    def chatty(config: GPTQConfig, source: Path, calibration: list, batch_size: int = 8) -> Saved:
        for index in range(300):
            print(f"INFO  progress line {index}")
        print("WARN  Calibration dataset size should be more than 256")
        return Saved()

    monkeypatch.setattr(backend, "require_gptqmodel", lambda: None)
    monkeypatch.setattr(backend, "load_and_quantize", chatty)
    with caplog.at_level("WARNING"):
        report = backend.quantize_with_gptqmodel(GPTQConfig(backend="gptqmodel"), tmp_path, [],
                                                 tmp_path / "out")
    assert "progress line" not in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "GPTQModel: WARN  Calibration dataset size should be more than 256"]
    assert report.per_module == {"0.mlp.up_proj": {"gptq_loss": 0.5}}

    def failing(config: GPTQConfig, source: Path, calibration: list, batch_size: int = 8) -> Saved:
        print("INFO  layer 3: Cholesky failed")
        raise RuntimeError("quantization failed")

    monkeypatch.setattr(backend, "load_and_quantize", failing)
    caplog.clear()
    with pytest.raises(RuntimeError, match="quantization failed"):
        backend.quantize_with_gptqmodel(GPTQConfig(backend="gptqmodel"), tmp_path, [], tmp_path / "out2")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "layer 3: Cholesky failed" in errors[0]


def test_checkpoint_writer_must_be_alone_in_its_stage() -> None:
    from squeezeflow.compression.executor import checkpoint_writer

    writer = GPTQStep(GPTQConfig(backend="gptqmodel"))
    assert checkpoint_writer([writer]) is writer
    assert checkpoint_writer([GPTQStep(GPTQConfig())]) is None
    with pytest.raises(ValueError, match="gptq writes the stage's whole checkpoint"):
        checkpoint_writer([writer, RTNStep(RTNConfig())])


@pytest.mark.slow
def test_gptqmodel_backend_stage_writes_a_checkpoint_transformers_loads(workdir: Path) -> None:
    pytest.importorskip("gptqmodel", reason="the [gptq] extra is not installed")
    from squeezeflow.compression.artifact import load_compressed
    from squeezeflow.recipe import DataSpec, StageSpec
    from squeezeflow.tasks.refs import CheckpointRef, DataRef, folder_sha256
    from squeezeflow.tasks.stages import run_stage

    model, tokenizer = tiny_llama(hidden=128, layers=2, intermediate=256)
    base = save_model(model, tokenizer, workdir / "base")
    texts = sampledata.sentences(32, seed=11)
    data_file = workdir / "calibration.json"
    data_file.write_text(json.dumps(texts))
    stage = StageSpec.model_validate({"name": "gptq", "steps": [
        {"kind": "gptq", "backend": "gptqmodel", "bits": 4, "group_size": 64}]})
    result = run_stage.fn(
        stage,
        CheckpointRef(path=str(base), sha256=folder_sha256(base), kind="causal-lm"),
        DataRef(path=str(data_file), sha256="calibration", count=len(texts)),
        DataSpec(source=str(data_file), batch_size=16, max_length=64),
        seed=0,
    )
    folder = Path(result.checkpoint.path)
    settings = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (settings["quant_method"], settings["bits"], settings["group_size"]) == ("gptq", 4, 64)
    # per-layer GPTQ loss of all 14 block Linears, as stage metrics
    losses = [k for k in result.metrics if k.startswith("0.gptq.model.layers.") and k.endswith("gptq_loss")]
    assert len(losses) == 14
    # transformers loads it with quantized layers; the stage's own loader does too
    loaded = load_gptq(folder)
    assert hasattr(loaded.model.layers[0].self_attn.q_proj, "qweight")
    assert hasattr(load_compressed(folder).model.model.layers[1].mlp.down_proj, "qweight")
    batch = tokenizer(sampledata.sentences(4, seed=3), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, logits = model(**batch).logits, loaded(**batch).logits
    # measured 0.105 (random weights, 4 bits); packing or zero-point errors give > 1
    assert float((logits - expected).norm() / expected.norm()) < 0.2

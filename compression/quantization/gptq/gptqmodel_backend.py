"""The `gptqmodel` backend of the `gptq` step: GPTQModel quantizes a causal LM and
writes a standard Hugging Face GPTQ checkpoint (qweight/qzeros/scales/g_idx and a
`quantization_config` in config.json) that `transformers` loads.

GPTQModel is an optional dependency (the `[gptq]` extra) imported on use. It
replaces the whole model, so the step runs alone in its stage and writes the
stage's checkpoint folder itself (`Step.write_checkpoint`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.step import StepReport, summarize

if TYPE_CHECKING:
    from squeezeflow.compression.quantization.gptq.step import GPTQConfig

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install squeezeflow[gptq]"
TAIL = 8000  # characters of GPTQModel's console output logged when it fails


def require_gptqmodel() -> ModuleType:
    """Import gptqmodel, or fail with the extra that provides it."""
    # GPTQModel refuses to start on small CPU-only machines unless told its worker count.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    try:
        import gptqmodel
    except ImportError as error:
        raise ImportError(
            f"gptq backend 'gptqmodel' needs GPTQModel and optimum: {EXTRA_HINT} ({error})"
        ) from error
    return gptqmodel


def gptqmodel_quantize_config(config: GPTQConfig) -> Any:
    """The GPTQModel QuantizeConfig with the same algorithm settings as our own GPTQ."""
    gptqmodel = require_gptqmodel()
    return gptqmodel.QuantizeConfig(
        bits=config.bits,
        group_size=-1 if config.group_size is None else config.group_size,  # -1: per row
        sym=config.symmetric,
        desc_act=config.act_order,
        act_group_aware=False,  # GPTQModel's own reordering: off, to run plain GPTQ
        static_groups=config.static_groups,
        damp_percent=config.damp,
        true_sequential=config.sequential,  # GPTQModel's default is True; ours False
        offload_to_disk=False,  # small models: no temporary shards on disk
    )


def calibration_samples(calibration: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Padded batches -> one unpadded sample per text, the input GPTQModel expects."""
    samples = []
    for batch in calibration:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        for ids, keep in zip(batch["input_ids"], mask.bool(), strict=True):
            tokens = ids[keep]  # (tokens,)
            samples.append({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})
    return samples


def load_and_quantize(
    config: GPTQConfig, source: Path, calibration: Sequence[dict[str, Tensor]],
    batch_size: int = 8,
) -> Any:
    """A GPTQModel model loaded from `source` and quantized in memory."""
    gptqmodel = require_gptqmodel()
    model = gptqmodel.GPTQModel.load(
        str(source), gptqmodel_quantize_config(config), device="cpu",
        dtype=torch.float32,  # GPTQModel picks bf16 on CPU; calibrate at the precision we do
    )
    model.quantize(
        calibration_samples(calibration),
        batch_size=batch_size,
        calibration_data_min_length=1,  # keep short calibration texts; we chose the data
    )
    return model


def quantize_with_gptqmodel(
    config: GPTQConfig, source: Path, calibration: Sequence[dict[str, Tensor]], output: Path
) -> StepReport:
    """Quantize the causal LM in `source` with GPTQModel and save it to `output`."""
    require_gptqmodel()
    output.mkdir(parents=True, exist_ok=True)
    log.info("quantizing with GPTQModel (its console output is shown only on failure)")
    # GPTQModel prints hundreds of banner, table and progress lines per model: captured;
    # its warnings are passed on, and on failure the end of the transcript is logged.
    transcript = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as scratch, \
                contextlib.redirect_stdout(transcript), contextlib.redirect_stderr(transcript):
            model = load_and_quantize(config, _plain_hf_folder(source, Path(scratch)), calibration)
            model.save(str(output))
    except Exception:
        log.error("GPTQModel failed; the end of its output:\n%s", transcript.getvalue()[-TAIL:])
        raise
    for line in transcript.getvalue().splitlines():
        if line.lstrip().startswith(("WARN", "ERROR")):
            log.warning("GPTQModel: %s", line.strip())
    per_module = _quant_log(output / "quant_log.csv", model)
    return StepReport(kind=config.kind, metrics=summarize(per_module), per_module=per_module)


def _plain_hf_folder(source: Path, scratch: Path) -> Path:
    """GPTQModel reads standard HF folders; a packed squeezeflow folder is written dense."""
    from squeezeflow.compression.artifact import FORMAT_FILE, load_compressed

    if not (source / FORMAT_FILE).exists():
        return source
    loaded = load_compressed(source)
    dense = scratch / "dense"
    loaded.model.save_pretrained(dense)
    loaded.tokenizer.save_pretrained(dense)
    return dense


def _quant_log(path: Path, model: Any) -> dict[str, dict[str, float]]:
    """GPTQModel's per-layer loss (its GPTQ objective) keyed by full module name."""
    if not path.exists():
        log.warning("GPTQModel wrote no %s; no per-module metrics", path.name)
        return {}
    # the blocks now hold QuantLinear modules: the largest ModuleList is the block list
    lists = [(len(m), n) for n, m in model.model.named_modules() if isinstance(m, nn.ModuleList)]
    prefix = max(lists)[1] if lists else ""
    per_module = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            name = ".".join(part for part in (prefix, row["layer"], row["module"]) if part)
            per_module[name] = {"gptq_loss": float(row["loss"])}
    return per_module
